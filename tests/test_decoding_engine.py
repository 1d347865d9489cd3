"""The two-model decoding engine against an independent, cache-free, one-sequence reference.

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

from verl_ext.decoding import engine, rng
from verl_ext.decoding.engine import (
    AdaptiveDraftLen,
    Request,
    TwoModelDecoder,
    compaction_index,
    expected_tokens,
    replace_ratio,
    speculative_speed_bound,
)
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
    """Step loop (k = 1), speculative rounds (k = 3, 6) and the adaptive k all emit the reference's
    tokens, flags and scores, for every criterion."""
    base, rl = models
    rule = RULES[name]
    expected = [reference_decode(base, rl, r.prompt_ids, r.stream_id, 11, rule, 10) for r in REQUESTS]
    for draft_len in (1, 3, 6, "auto"):
        dec = decoder(base, rl, rule, seed=11, draft_len=draft_len, max_draft_len=5, max_batch_size=4, admit_min=1)
        assert dec.early_gate == (name in PROPOSER_ONLY)
        for req, res, (tokens, fired, scores) in zip(REQUESTS, dec.generate(REQUESTS), expected):
            assert res.tokens == tokens, (name, draft_len, req)
            assert res.replaced == fired
            np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6)
            assert res.finish_reason == ("eos" if tokens[-1] == EOS else "length")
    n_fired, n_tokens = sum(sum(f) for _, f, _ in expected), sum(len(t) for t, _, _ in expected)
    if name == "none":
        assert n_fired == 0 and dec.stats.scoring_forwards == 0  # `none` never needs the other model
    elif name != "all-gamma0":
        assert 0 < n_fired < n_tokens  # the gate matters in every case
    assert any(t[-1] == EOS for t, _, _ in expected) or name == "all-gamma0"


def test_scorer_without_a_split_lm_head_gives_the_same_tokens(models, monkeypatch):
    """A proposer-only gate projects the scorer's hidden states at the fired positions only; an
    architecture not known to be `lm_head(h)` takes the full-logits path: same results."""
    base, rl = models
    reqs = [Request(PROMPTS[i % 6], stream_id=i) for i in range(12)]
    for name in ("random", "entropy_base-top5"):
        split = decoder(base, rl, RULES[name], seed=4, draft_len=3).generate(reqs)
        monkeypatch.setattr(engine, "_PLAIN_LM_HEAD", frozenset())
        full = decoder(base, rl, RULES[name], seed=4, draft_len=3).generate(reqs)
        monkeypatch.undo()
        assert [(r.tokens, r.replaced) for r in split] == [(r.tokens, r.replaced) for r in full]
        assert any(any(r.replaced) for r in split)


@pytest.mark.parametrize(
    "rule",
    [DecodingRule("all", 0.0, top_p=0.9), DecodingRule("avg_kl", -1.0, top_p=0.2)],
    ids=["all", "avg_kl < 0 fires everywhere"],
)
def test_a_round_goes_on_past_fired_positions_whose_resample_equals_the_draft(rule):
    """Every position fires; a round still keeps several of them when y equals the drafted token,
    and stays token-identical to the step loop. (Cutting at every fired position would give exactly
    one token per row and round.)"""
    base, rl = make_models(seed=3, eos_boost=0.0, perturb=0.15)
    reqs = [Request(PROMPTS[i % 6], stream_id=i) for i in range(16)]
    step = decoder(base, rl, rule, seed=8, draft_len=1, max_new_tokens=16).generate(reqs)
    spec_dec = decoder(base, rl, rule, seed=8, draft_len=4, max_new_tokens=16)
    spec = spec_dec.generate(reqs)
    assert [(r.tokens, r.replaced) for r in step] == [(r.tokens, r.replaced) for r in spec]
    assert replace_ratio(spec) == 1.0
    st = spec_dec.stats
    assert st.tokens / st.row_rounds > 1.3, (st.tokens, st.row_rounds)
    assert 0 < st.mismatches < st.row_rounds


def test_speculative_equals_step_by_step_in_every_statistic(models):
    base, rl = models
    reqs = [Request(PROMPTS[i % 6], stream_id=i) for i in range(24)]
    for name in ("delta_logp", "avg_kl-extrapolate", "table1-rl-proposal"):
        step = decoder(base, rl, RULES[name], seed=5, draft_len=1, max_batch_size=8, max_new_tokens=24)
        spec = decoder(base, rl, RULES[name], seed=5, draft_len=5, max_batch_size=8, max_new_tokens=24)
        a, b = step.generate(reqs), spec.generate(reqs)
        for x, y in zip(a, b):
            assert (x.tokens, x.replaced, x.finish_reason) == (y.tokens, y.replaced, y.finish_reason)
            np.testing.assert_allclose(x.scores, y.scores, rtol=1e-9, atol=1e-12)
        assert replace_ratio(a) == replace_ratio(b) and 0 < replace_ratio(a) < 1
        assert (step.stats.tokens, step.stats.fired) == (spec.stats.tokens, spec.stats.fired)
        assert spec.stats.scoring_forwards <= step.stats.scoring_forwards  # one scoring pass per round
        if replace_ratio(a) < 0.3:
            assert spec.stats.scoring_forwards < step.stats.scoring_forwards / 2
        assert spec.stats.compactions > 0  # rolled-back columns were re-packed at least once


def test_batched_equals_unbatched_whatever_the_batch(models):
    base, rl = models
    rule = RULES["delta_logp"]
    alone = [decoder(base, rl, rule, seed=3, draft_len=3, max_batch_size=1).generate([r])[0] for r in REQUESTS]
    shuffled = REQUESTS[:]
    random.Random(0).shuffle(shuffled)
    for batch, admit in ((2, 1), (6, None), (4, 3)):
        res = decoder(base, rl, rule, seed=3, draft_len=3, max_batch_size=batch, admit_min=admit).generate(shuffled)
        by_stream = {r.stream_id: x for r, x in zip(shuffled, res)}
        for req, ref in zip(REQUESTS, alone):
            got = by_stream[req.stream_id]
            assert (got.tokens, got.replaced) == (ref.tokens, ref.replaced)
            np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-9, atol=1e-12)


def test_limits_none_is_base_sampling_and_gamma0_is_replacement(models):
    base, rl = models
    reqs = [Request(PROMPTS[i % 6], stream_id=i) for i in range(12)]
    plain = decoder(base, None, DecodingRule("none", 0.0, top_p=0.8), seed=2).generate(reqs)
    none_dec = decoder(base, rl, DecodingRule("none", 0.0, top_p=0.8), seed=2, draft_len=3)
    none = none_dec.generate(reqs)
    assert [r.tokens for r in plain] == [r.tokens for r in none]
    assert not any(any(r.replaced) for r in none)
    assert none_dec.stats.scoring_forwards == 0 and none_dec.models == [base]
    rep = decoder(base, rl, DecodingRule("delta_logp", -0.4, top_p=0.8), seed=2, draft_len=2).generate(reqs)
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


def test_speculative_and_all_gamma0_match_in_distribution():
    """Different random streams: speculative vs step loop, and `all` (γ=0) vs RL sampling, over whole sequences."""
    base, rl = make_models(vocab=6, seed=7, eos_boost=1.0, perturb=0.8)
    n = 3000
    rule = DecodingRule("delta_logp", -0.3, top_p=0.95)
    step = decoder(base, rl, rule, seed=1, draft_len=1, max_batch_size=256, max_new_tokens=3)
    spec = decoder(base, rl, rule, seed=2, draft_len=3, max_batch_size=256, max_new_tokens=3)
    reqs = [Request([2, 3], stream_id=i) for i in range(n)]
    a, b = step.generate(reqs), spec.generate(reqs)
    table = _sequence_histograms(a, b)
    assert table.shape[1] > 10
    assert stats.chi2_contingency(table).pvalue > 1e-3
    ra, rb = replace_ratio(a), replace_ratio(b)
    assert 0.05 < ra < 0.95 and abs(ra - rb) < 0.04
    every = decoder(base, rl, DecodingRule("all", 0.0, "extrapolate", gamma=0.0, top_p=0.95), seed=3,
                    draft_len=2, max_batch_size=256, max_new_tokens=3).generate(reqs)
    rl_only = decoder(rl, None, DecodingRule("none", 0.0, top_p=0.95), seed=4, max_batch_size=256,
                      max_new_tokens=3).generate(reqs)
    assert stats.chi2_contingency(_sequence_histograms(every, rl_only)).pvalue > 1e-3
    assert replace_ratio(every) == 1.0
    # a clearly different process is told apart by the same test (the test has power)
    base_only = decoder(base, None, DecodingRule("none", 0.0, top_p=0.95), seed=4, max_batch_size=256,
                        max_new_tokens=3).generate(reqs)
    assert stats.chi2_contingency(_sequence_histograms(base_only, rl_only)).pvalue < 1e-6


@pytest.mark.parametrize(
    "rule",
    [DecodingRule("delta_logp", -0.3, top_p=0.95), DecodingRule("random", 0.3, "extrapolate", gamma=0.5, top_p=0.9),
     DecodingRule("entropy_base", 1.5, top_p=0.95)],
    ids=["delta_logp", "random-extrapolate", "entropy_base"],
)
def test_scorer_drafted_rounds_match_the_step_loop_in_distribution(rule):
    """`draft_model="scorer"`: the RL model drafts, the base verifies against the step's law and the
    flags/scores are drawn given the tokens. Tokens with their flags, and the scores, follow the
    step loop's law (chi-square over whole sequences; two-sample KS on the scores)."""
    base, rl = make_models(vocab=6, seed=7, eos_boost=1.0, perturb=0.8)
    n = 3000
    reqs = [Request([2, 3], stream_id=i) for i in range(n)]
    step = decoder(base, rl, rule, seed=1, draft_len=1, max_batch_size=256, max_new_tokens=3).generate(reqs)
    spec_dec = decoder(base, rl, rule, seed=2, draft_len=3, max_batch_size=256, max_new_tokens=3, draft_model="scorer")
    spec = spec_dec.generate(reqs)
    assert spec_dec.scorer_drafts and spec_dec.stats.tokens / spec_dec.stats.row_rounds > 1.2  # rounds keep drafts
    table = _sequence_histograms(step, spec, key=lambda r: (tuple(r.tokens), tuple(r.replaced)))
    assert table.shape[1] > 10
    assert stats.chi2_contingency(table).pvalue > 1e-3
    ra, rb = replace_ratio(step), replace_ratio(spec)
    assert 0.05 < ra < 0.95 and abs(ra - rb) < 0.04
    if rule.criterion != "entropy_base":  # (a function of the prefix: covered by the sequences)
        sa = [s for r in step for s in r.scores]
        sb = [s for r in spec for s in r.scores]
        assert stats.ks_2samp(sa, sb).pvalue > 1e-3
    for r in spec:  # each flag is the gate on its recorded score
        for fired, score in zip(r.replaced, r.scores):
            assert fired == bool(np_fires(rule.criterion, score, rule.threshold))


def test_scorer_drafted_rounds_do_not_depend_on_the_batch_or_chunking(models, monkeypatch):
    base, rl = models
    rule = RULES["delta_logp"]
    alone = [decoder(base, rl, rule, seed=3, draft_len=3, max_batch_size=1, draft_model="scorer").generate([r])[0]
             for r in REQUESTS]
    together = decoder(base, rl, rule, seed=3, draft_len=3, max_batch_size=4, admit_min=1,
                       draft_model="scorer").generate(REQUESTS)
    assert [(r.tokens, r.replaced) for r in alone] == [(r.tokens, r.replaced) for r in together]
    assert any(any(r.replaced) for r in alone)
    monkeypatch.setattr(engine, "LAW_CHUNK_ROWS", 5)  # the step law built in chunks of positions: same results
    chunked = decoder(base, rl, rule, seed=3, draft_len=3, max_batch_size=4, admit_min=1,
                      draft_model="scorer").generate(REQUESTS)
    assert [(r.tokens, r.replaced, r.scores) for r in chunked] == [(r.tokens, r.replaced, r.scores) for r in together]
    # replacing: q is the law π_RL drafted from, reused instead of recomputed; the same results either way
    recomputed = decoder(base, rl, rule, seed=3, draft_len=3, max_batch_size=4, admit_min=1, draft_model="scorer")
    assert recomputed.draft_law_is_q
    recomputed.draft_law_is_q = False
    assert [(r.tokens, r.replaced, r.scores) for r in recomputed.generate(REQUESTS)] == \
        [(r.tokens, r.replaced, r.scores) for r in together]
    extrapolating = DecodingRule("delta_logp", rule.threshold, "extrapolate", gamma=0.5, top_p=rule.top_p)
    assert not decoder(base, rl, extrapolating, draft_model="scorer").draft_law_is_q  # q = π_Extra's law there
    # `none` cannot fire: nothing to verify, the proposer drafts as usual
    none = decoder(base, rl, DecodingRule("none", 0.0, top_p=0.8), seed=3, draft_len=3, draft_model="scorer")
    assert not none.scorer_drafts and none.stats.scoring_forwards == 0
    with pytest.raises(ValueError, match="unknown draft_model 'rl'; valid: proposer, scorer"):
        decoder(base, rl, rule, draft_model="rl")


@pytest.mark.parametrize(
    ("rule", "draft_model"),
    [(DecodingRule("entropy_base", 3.42, top_p=0.9), "proposer"), (DecodingRule("delta_logp", -0.3, top_p=0.9), "scorer")],
    ids=["H(π_B) gate, π_B drafts", "Δlog p gate, π_RL drafts"],
)
def test_rounds_are_cut_at_the_total_variation_to_the_step_law(rule, draft_model):
    """A draft from law d is kept with probability at most 1 − TV(d, m) (m: the step's output law);
    the engine attains it: its cuts per checked position match the mean of TV(d, m) along the
    sequences it produced (d = p_prop for proposer drafts, π_RL's sampling law for scorer drafts),
    well below the fire rate that a fresh resample would cut at."""
    from verl_ext.decoding.sampler import sampling_log_probs, step_law

    base, rl = make_models(seed=3, eos_boost=0.0, perturb=0.3)
    reqs = [Request(PROMPTS[i % 6], stream_id=i) for i in range(120)]
    dec = decoder(base, rl, rule, seed=6, draft_len=4, max_new_tokens=12, max_batch_size=64, draft_model=draft_model)
    results = dec.generate(reqs)
    tvs = []
    for req, res in zip(reqs, results):
        ids = torch.tensor([list(req.prompt_ids) + res.tokens[:-1]])
        n = len(req.prompt_ids)
        with torch.no_grad():
            lb = torch.log_softmax(base(ids).logits[0, n - 1 :], -1)
            lr = torch.log_softmax(rl(ids).logits[0, n - 1 :], -1)
        law = step_law(lb, lr, rule)
        d = law.proposal if draft_model == "proposer" else sampling_log_probs(lr, rule.temperature, rule.top_p).exp()
        tvs.append(0.5 * (d - law.emitted).abs().sum(-1))
    predicted = float(torch.cat(tvs).mean())
    st = dec.stats
    measured = st.mismatches / st.checked
    print(f"cuts per checked position {measured:.4f}, mean TV {predicted:.4f}, fire rate {replace_ratio(results):.3f}")
    assert abs(measured - predicted) < 4 * (predicted / st.checked) ** 0.5 + 0.005, (measured, predicted, st.checked)
    assert measured < 0.75 * replace_ratio(results), (measured, replace_ratio(results))


def test_compaction_index_right_aligns_kept_columns():
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0]])
    idx = compaction_index(mask)
    assert mask.gather(1, idx).tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    kept = [[c for c in row if mask[i, c]] for i, row in enumerate(idx.tolist())]
    assert kept == [[1, 3, 4], [0, 1, 2, 5], [4]]


def test_expected_tokens_is_the_mean_of_min_geometric_k():
    g = np.random.default_rng(0)
    for r, k in ((0.1, 4), (0.3, 2), (0.02, 8), (0.5, 1)):
        sim = np.minimum(g.geometric(r, 200_000), k).mean()
        assert abs(expected_tokens(r, k) - sim) < 0.02, (r, k)
    assert expected_tokens(0.0, 5) == 5.0 and expected_tokens(1.0, 5) == 1.0
    assert expected_tokens(1e-18, 5) == pytest.approx(5.0)  # no cancellation at tiny r


def test_speculative_speed_bound_is_the_best_tokens_per_cost_over_draft_lengths():
    # r = 0.1, c = 1: E[min(G,k)]/(k+1) = (1 − 0.9^k)/(0.1(k+1)); k=3: 0.6775, k=4: 0.6878, k=5: 0.6825
    ratio, k = speculative_speed_bound(0.1, 1.0, max_len=16)
    assert k == 4 and ratio == pytest.approx((1 - 0.9**4) / 0.5)
    assert speculative_speed_bound(0.0, 0.5, max_len=8) == (8 / 8.5, 8)  # no cuts: the longest draft
    assert speculative_speed_bound(0.1, 1.0, max_len=2)[1] == 2
    # measured per-k costs: a k-token pass costing more than a 1-token one moves the best k down
    assert speculative_speed_bound(0.1, {k: 1.0 for k in range(1, 17)}) == (ratio, 4)
    ratio_k, k = speculative_speed_bound(0.1, {1: 1.0, 2: 1.2, 3: 1.5, 4: 2.5})
    assert k == 3 and ratio_k == pytest.approx((1 - 0.9**3) / 0.1 / 4.5)


def _feed(ad, rest, rate, gain=expected_tokens, rounds=40, rows=100):
    """Observe rounds at every k with draft steps of 1 s, the given rest(k), stop rate and gain."""
    for _ in range(rounds):
        for k in range(1, ad.max_len + 1):
            checked = rows * max(k - 1, 1)
            ad.observe(k, round(rate * checked), checked, gain(rate, k), t_draft=1.0 * k, t_rest=rest(k))


def test_adaptive_draft_len_maximises_measured_tokens_per_second():
    """k* = argmax_k g(k)/T(k) over the measured gains and round times; with gains as the stop
    rate predicts, the argmax of E[min(G,k)] / (k·d + s(k))."""
    cases = [
        (lambda k: 1.0, 0.1, 4),  # scoring costs one draft step whatever k: (1−0.9^k)/0.1/(k+1) peaks at 4
        (lambda k: 1.0 * k, 0.1, 1),  # scoring costs k draft steps: speculation cannot pay
        (lambda k: 0.5, 0.0, 8),  # nothing ever stops a round: the longest draft
        (lambda k: 1.0, 0.5, 1),  # half the positions stop: 1.5/3 < 1/2
    ]
    for rest, rate, want in cases:
        ad = AdaptiveDraftLen(8, explore_every=10**9)
        assert ad.choose() == 4  # no measurement yet: the starting length
        _feed(ad, rest, rate)
        assert abs(ad.stop_rate - rate) < 0.01
        assert ad.choose() == want, (rate, want, [round(ad.tokens_per_second(k), 4) for k in range(1, 9)])
        assert ad.predicted_tokens_per_second(want) == pytest.approx(ad.tokens_per_second(want), rel=0.05)
    # measured gains overrule the prediction: rows that gain one token a round whatever k (e.g. a
    # batch waiting for its slowest row) make k = 1 the fastest although r = 0.1 predicts k = 4
    ad = AdaptiveDraftLen(8, explore_every=10**9)
    _feed(ad, lambda k: 1.0, 0.1, gain=lambda r, k: 1.0)
    assert ad.choose() == 1 and max(range(1, 9), key=ad.predicted_tokens_per_second) == 4


def test_adaptive_draft_len_predicts_untried_lengths_and_explores_neighbours():
    ad = AdaptiveDraftLen(8, explore_every=3)
    for k, t in ((2, 3.0), (3, 4.0)):  # rest(k) = 1 + k: the least-squares line predicts rest(6) = 7
        ad.observe(k, 0, 10, float(k), t_draft=float(k), t_rest=t)
    assert ad._rest_time(6) == pytest.approx(7.0)
    assert ad.tokens_per_second(6) == ad.predicted_tokens_per_second(6)
    ad = AdaptiveDraftLen(8, explore_every=3)
    ad.observe(4, 0, 10_000, 4.0, t_draft=4.0, t_rest=1.0)
    picks = [ad.choose() for _ in range(6)]
    # only k = 4 measured (rest assumed flat), no stops: 8 is predicted best; every third round a
    # neighbour (9 is out of range, so the other side)
    assert picks == [8, 8, 7, 8, 8, 7]


def test_clear_errors(models):
    base, rl = models
    with pytest.raises(ValueError, match="empty prompt"):
        decoder(base, rl, RULES["delta_logp"]).generate([Request([], 0)])
    with pytest.raises(ValueError, match="criterion 'none'"):
        decoder(base, None, RULES["delta_logp"])
    with pytest.raises(ValueError, match="valid criteria: entropy_base"):
        decoder(base, rl, DecodingRule("delta", -0.3))
    for bad in (0, "fast", 2.5):
        with pytest.raises(ValueError, match="draft_len must be an int >= 1 or 'auto'"):
            decoder(base, rl, RULES["delta_logp"], draft_len=bad)
