"""The step-by-step two-model decoding engine against an independent, cache-free, one-sequence reference.

Models are tiny random Qwen2s in float64, so cached vs. uncached forwards agree to ~1e-15 and
token-for-token comparisons are meaningful. The reference re-runs each model on the whole prefix
at every step and implements nucleus sampling, the criteria, Eq. 7 and the official top-k
approximation with NumPy; it shares only the random streams (`rng`, tested on its own).
"""

import copy
import random

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import Qwen2Config, Qwen2ForCausalLM

from verl_ext.core import rng
from verl_ext.decoding import engine
from verl_ext.decoding.engine import Request, TwoModelDecoder, compaction_index, replace_ratio
from verl_ext.decoding.sampler import DecodingRule

EOS, PAD = 1, 0


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_models(vocab=40, seed=0, eos_boost=6.0, perturb=0.6):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    base = Qwen2ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(8.0)  # peaked enough that top-p and the criteria bite
        base.lm_head.weight[EOS] += eos_boost * base.model.norm.weight  # EOS is likely at some steps
    rl = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(perturb * p.std() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return base, rl


@pytest.fixture(scope="module")
def models():
    return make_models()


# ----------------------------------------------------------------------------- reference


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_nucleus(p, top_p):
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    keep, mass = np.zeros(len(p), dtype=bool), 0.0
    for i in order:
        if mass >= top_p:
            break
        keep[i], mass = True, mass + p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def np_draw(p, u):
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return min(i, int(np.nonzero(p > 0)[0][-1]))


def np_score(name, lb, lr, y_hat, u, top_k):
    """(score, fired-direction) with NumPy; on the base top-k view when top_k > 0."""
    delta = lr[y_hat] - lb[y_hat]
    if top_k:
        ids = np.argsort(-lb, kind="stable")[:top_k]
        rl_ids = np.argsort(-lr, kind="stable")[:top_k]
        rl_min = lr[rl_ids].min()
        b = lb[ids] - np.log(np.exp(lb[ids]).sum())
        r = np.where(np.isin(ids, rl_ids), lr[ids], rl_min)
        r = r - np.log(np.exp(r).sum())
        delta = (lr[y_hat] if y_hat in rl_ids else rl_min) - lb[y_hat]
        lb, lr = b, r
    P, Q = np.exp(lb), np.exp(lr)
    return {
        "entropy_base": -(P * lb).sum(),
        "entropy_rl": -(Q * lr).sum(),
        "kl_rl_base": (Q * (lr - lb)).sum(),
        "kl_base_rl": (P * (lb - lr)).sum(),
        "avg_kl": 0.5 * ((Q * (lr - lb)).sum() + (P * (lb - lr)).sum()),
        "delta_logp": delta,
        "random": u,
        "none": np.nan,
        "all": np.nan,
    }[name]


def np_fires(name, s, tau):
    if name in ("none", "all"):
        return name == "all"
    return s < tau if name in ("delta_logp", "random") else s > tau


def np_resample(lb, lr, y_hat, u, rule):
    """y ~ q where the gate fired on ŷ: a fresh inverse-CDF draw (independent), or ŷ kept with
    probability min(1, q(ŷ)/p_F(ŷ)) and else a draw from (q − p_F)₊ (maximal)."""
    k, gamma = rule.base_top_k_approximation, rule.resample_gamma
    q = np.zeros(len(lb))
    if k:
        ids = np.argsort(-lb, kind="stable")[:k]
        rl_ids = np.argsort(-lr, kind="stable")[:k]
        b = lb[ids] - np.log(np.exp(lb[ids]).sum())
        r = np.where(np.isin(ids, rl_ids), lr[ids], lr[rl_ids].min())
        r = r - np.log(np.exp(r).sum())
        q[ids] = np_nucleus(np_softmax(((1 + gamma) * r - gamma * b) / rule.temperature), rule.top_p)
        delta = np.where(np.isin(np.arange(len(lb)), rl_ids), lr, lr[rl_ids].min()) - lb
    else:
        with np.errstate(divide="ignore"):
            q0 = np.log(np_softmax((1 + gamma) * lr - gamma * lb))
        q = np_nucleus(np_softmax(q0 / rule.temperature), rule.top_p)
        delta = lr - lb
    if rule.coupling == "independent":
        return np_draw(q, u)
    p = np_nucleus(np_softmax((lb if rule.propose_from == "base" else lr) / rule.temperature), rule.top_p)
    if rule.criterion == "delta_logp":
        p = p * (delta < rule.threshold)
    p = p / p.sum()
    accept = min(1.0, q[y_hat] / p[y_hat])
    residual = np.clip(q - p, 0, None)
    if u < accept or residual.sum() <= 0:
        return y_hat
    return np_draw(residual, (u - accept) / (1 - accept))


def reference_decode(base, rl, prompt, stream_id, seed, rule, max_new):
    key = rng.sequence_keys(seed, torch.tensor([stream_id]))
    seq, tokens, fired, scores = list(prompt), [], [], []
    for t in range(max_new):
        with torch.no_grad():
            lb = torch.log_softmax(base(torch.tensor([seq])).logits[0, -1], -1).numpy()
            lr = torch.log_softmax(rl(torch.tensor([seq])).logits[0, -1], -1).numpy()
        u0, ug, ur = (rng.uniforms(key, torch.tensor([t]), s).item() for s in range(3))
        prop = lb if rule.propose_from == "base" else lr
        y = np_draw(np_nucleus(np_softmax(prop / rule.temperature), rule.top_p), u0)
        s = np_score(rule.criterion, lb, lr, y, ug, rule.base_top_k_approximation)
        g = bool(np_fires(rule.criterion, s, rule.threshold))
        if g:
            y = np_resample(lb, lr, y, ur, rule)
        seq.append(y)
        tokens.append(y)
        fired.append(g)
        scores.append(s)
        if y == EOS:
            break
    return tokens, fired, scores


def decoder(base, rl, rule, **kw):
    kw.setdefault("max_new_tokens", 10)
    return TwoModelDecoder(base, rl, rule, eos_token_ids=[EOS], pad_token_id=PAD, **kw)


PROMPTS = [[5, 6, 7], [9], [3, 4, 11, 12, 13, 2], [20, 21], [8, 8, 8, 8], [30]]
REQUESTS = [Request(p, stream_id=100 + i) for i, p in enumerate(PROMPTS)]

RULES = {
    "delta_logp": DecodingRule("delta_logp", -0.4, top_p=0.8),
    "avg_kl-extrapolate": DecodingRule("avg_kl", 0.8, "extrapolate", gamma=0.3, temperature=0.9, top_p=0.9),
    "entropy_base": DecodingRule("entropy_base", 1.2, top_p=1.0),
    "kl_rl_base": DecodingRule("kl_rl_base", 1.0, top_p=0.9),
    "random": DecodingRule("random", 0.3, "extrapolate", gamma=0.5, top_p=0.9),
    "table1-rl-proposal": DecodingRule("delta_logp", 0.5, "extrapolate", gamma=0.4, propose_from="rl", top_p=0.9),
    "official-top5": DecodingRule("delta_logp", -0.3, "extrapolate", gamma=0.2, top_p=0.7, base_top_k_approximation=5),
    "all-gamma0": DecodingRule("all", 0.0, "extrapolate", gamma=0.0, top_p=0.8),
    # every other criterion, and the gates decided from the proposer alone in each setting
    "entropy_rl": DecodingRule("entropy_rl", 1.2, top_p=0.9),
    "kl_base_rl": DecodingRule("kl_base_rl", 0.8, "extrapolate", gamma=0.2, top_p=0.9),
    "random-replace": DecodingRule("random", 0.25, top_p=0.8),
    "entropy_rl-rl-proposal": DecodingRule("entropy_rl", 1.2, "extrapolate", gamma=0.3, propose_from="rl", top_p=0.9),
    "entropy_base-top5": DecodingRule("entropy_base", 1.0, top_p=0.8, base_top_k_approximation=5),
    "none": DecodingRule("none", 0.0, top_p=0.8),
    "independent-coupling": DecodingRule("avg_kl", 0.8, top_p=0.9, coupling="independent"),
    "official-top5-independent": DecodingRule("delta_logp", -0.3, "extrapolate", gamma=0.2, top_p=0.7,
                                              base_top_k_approximation=5, coupling="independent"),
}
PROPOSER_ONLY = {"entropy_base", "random", "all-gamma0", "random-replace", "entropy_rl-rl-proposal",
                 "entropy_base-top5"}


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
    base, rl = models
    rule = RULES["delta_logp"]
    alone = [decoder(base, rl, rule, seed=3, max_batch_size=1).generate([r])[0] for r in REQUESTS]
    shuffled = REQUESTS[:]
    random.Random(0).shuffle(shuffled)
    for batch, admit in ((2, 1), (6, None), (4, 3)):
        res = decoder(base, rl, rule, seed=3, max_batch_size=batch, admit_min=admit).generate(shuffled)
        by_stream = {r.stream_id: x for r, x in zip(shuffled, res)}
        for req, ref in zip(REQUESTS, alone):
            got = by_stream[req.stream_id]
            assert (got.tokens, got.replaced) == (ref.tokens, ref.replaced)
            np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-9, atol=1e-12)


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


def _sequence_histograms(results_a, results_b, key=lambda r: tuple(r.tokens)):
    a, b = [key(r) for r in results_a], [key(r) for r in results_b]
    keys = sorted(set(a) | set(b))
    ca = np.array([a.count(k) for k in keys])
    cb = np.array([b.count(k) for k in keys])
    big = (ca + cb) >= 10  # pool rare sequences into one bin
    return np.stack([np.append(ca[big], ca[~big].sum()), np.append(cb[big], cb[~big].sum())])


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
