"""The step-by-step two-model decoding engine against an independent, cache-free, one-sequence reference
(`decoding_reference`).

Models are tiny random Qwen2s in float64, so cached vs. uncached forwards agree to ~1e-15 and
token-for-token comparisons are meaningful.
"""

import numpy as np
import pytest
import torch
from decoding_reference import (
    EOS,
    PROMPTS,
    PROPOSER_ONLY,
    REQUESTS,
    RULES,
    _sequence_histograms,
    check_batched_equals_unbatched,
    decoder,
    make_models,
    reference_decode,
)
from scipy import stats

from verl_ext.decoding import engine
from verl_ext.decoding.engine import Request, compaction_index, replace_ratio
from verl_ext.decoding.sampler import DecodingRule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return make_models()


@pytest.mark.parametrize("name", list(RULES))
def test_engine_matches_cache_free_reference(models, name):
    """The step loop emits the reference's tokens, flags and scores, for every criterion."""
    base, rl = models
    rule = RULES[name]
    expected = [reference_decode(base, rl, r.prompt_ids, r.stream_id, 11, rule, 10) for r in REQUESTS]
    dec = decoder(base, rl, rule, seed=11, max_batch_size=4, admit_min=1)
    assert dec.early_gate == (name in PROPOSER_ONLY)
    for req, res, (tokens, fired, scores) in zip(REQUESTS, dec.generate(REQUESTS), expected):
        assert res.tokens == tokens, (name, req)
        assert res.replaced == fired
        np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6)
        assert res.finish_reason == ("eos" if tokens[-1] == EOS else "length")
    n_fired, n_tokens = sum(sum(f) for _, f, _ in expected), sum(len(t) for t, _, _ in expected)
    assert dec.stats.tokens == n_tokens and dec.stats.fired == n_fired
    if name == "none":
        assert n_fired == 0 and dec.stats.scoring_forwards == 0  # `none` never needs the other model
    elif name != "all-gamma0":
        assert 0 < n_fired < n_tokens  # the gate matters in every case
    assert any(t[-1] == EOS for t, _, _ in expected) or name == "all-gamma0"


def test_scorer_without_a_split_lm_head_gives_the_same_tokens(models, monkeypatch):
    """A proposer-only gate projects the scorer's hidden states at the fired rows only; an
    architecture not known to be `lm_head(h)` takes the full-logits path: same results."""
    base, rl = models
    reqs = [Request(PROMPTS[i % 6], stream_id=i) for i in range(12)]
    for name in ("random", "entropy_base-top5"):
        split = decoder(base, rl, RULES[name], seed=4).generate(reqs)
        monkeypatch.setattr(engine, "_PLAIN_LM_HEAD", frozenset())
        full = decoder(base, rl, RULES[name], seed=4).generate(reqs)
        monkeypatch.undo()
        assert [(r.tokens, r.replaced) for r in split] == [(r.tokens, r.replaced) for r in full]
        assert any(any(r.replaced) for r in split)


def test_batched_equals_unbatched_whatever_the_batch(models):
    check_batched_equals_unbatched(lambda rule, **kw: decoder(*models, rule, **kw))


def test_caches_are_repacked_when_finished_rows_leave_pad_columns():
    """A long prompt next to short ones: once it finishes (at 7 tokens for this seed), the others
    (one runs to 23 tokens) sit behind its pad columns, which re-packing drops; the tokens are
    those of each request decoded alone."""
    base, rl = make_models(eos_boost=3.0)
    rule = RULES["delta_logp"]
    reqs = [Request(list(range(2, 38)), stream_id=0)] + [Request([5 + i], stream_id=1 + i) for i in range(3)]
    alone = [decoder(base, rl, rule, seed=10, max_new_tokens=30, max_batch_size=1).generate([r])[0] for r in reqs]
    dec = decoder(base, rl, rule, seed=10, max_new_tokens=30, max_batch_size=4, compact_slack=0.0)
    together = dec.generate(reqs)
    assert [(r.tokens, r.replaced) for r in together] == [(r.tokens, r.replaced) for r in alone]
    assert dec.stats.compactions > 0


def test_limits_none_is_base_sampling_and_gamma0_is_replacement(models):
    base, rl = models
    reqs = [Request(PROMPTS[i % 6], stream_id=i) for i in range(12)]
    plain = decoder(base, None, DecodingRule("none", 0.0, top_p=0.8), seed=2).generate(reqs)
    none_dec = decoder(base, rl, DecodingRule("none", 0.0, top_p=0.8), seed=2)
    none = none_dec.generate(reqs)
    assert [r.tokens for r in plain] == [r.tokens for r in none]
    assert not any(any(r.replaced) for r in none)
    assert none_dec.stats.scoring_forwards == 0 and none_dec.models == [base]
    rep = decoder(base, rl, DecodingRule("delta_logp", -0.4, top_p=0.8), seed=2).generate(reqs)
    ext = decoder(base, rl, DecodingRule("delta_logp", -0.4, "extrapolate", gamma=0.0, top_p=0.8), seed=2).generate(reqs)
    assert [(r.tokens, r.replaced) for r in rep] == [(r.tokens, r.replaced) for r in ext]
    assert any(any(r.replaced) for r in rep)


def test_all_gamma0_matches_rl_sampling_in_distribution():
    """Different random streams: `all` (γ=0) vs RL sampling, over whole sequences (chi-square)."""
    base, rl = make_models(vocab=6, seed=7, eos_boost=1.0, perturb=0.8)
    reqs = [Request([2, 3], stream_id=i) for i in range(3000)]
    every = decoder(base, rl, DecodingRule("all", 0.0, "extrapolate", gamma=0.0, top_p=0.95), seed=3,
                    max_batch_size=256, max_new_tokens=3).generate(reqs)
    rl_only = decoder(rl, None, DecodingRule("none", 0.0, top_p=0.95), seed=4, max_batch_size=256,
                      max_new_tokens=3).generate(reqs)
    table = _sequence_histograms(every, rl_only)
    assert table.shape[1] > 10
    assert stats.chi2_contingency(table).pvalue > 1e-3
    assert replace_ratio(every) == 1.0
    # a clearly different process is told apart by the same test (the test has power)
    base_only = decoder(base, None, DecodingRule("none", 0.0, top_p=0.95), seed=4, max_batch_size=256,
                        max_new_tokens=3).generate(reqs)
    assert stats.chi2_contingency(_sequence_histograms(base_only, rl_only)).pvalue < 1e-6


def test_compaction_index_right_aligns_kept_columns():
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0]])
    idx = compaction_index(mask)
    assert mask.gather(1, idx).tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    kept = [[c for c in row if mask[i, c]] for i, row in enumerate(idx.tolist())]
    assert kept == [[1, 3, 4], [0, 1, 2, 5], [4]]


def test_clear_errors(models):
    base, rl = models
    with pytest.raises(ValueError, match="empty prompt"):
        decoder(base, rl, RULES["delta_logp"]).generate([Request([], 0)])
    with pytest.raises(ValueError, match="criterion 'none'"):
        decoder(base, None, RULES["delta_logp"])
    with pytest.raises(ValueError, match="valid criteria: entropy_base"):
        decoder(base, rl, DecodingRule("delta", -0.3))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        decoder(base, rl, RULES["delta_logp"], max_new_tokens=0)
