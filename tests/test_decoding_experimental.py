"""EXPERIMENTAL speculative rounds (`verl_ext/decoding/experimental.py`) against the step loop.

Proposer-drafted rounds of any length (and the adaptive length) must give the cache-free
reference's tokens, i.e. the step loop's (`decoding_reference.reference_decode`); scorer-drafted
rounds the step loop's law (chi-square over whole sequences). Plus the cost model.
"""

import numpy as np
import pytest
import torch
from decoding_reference import (
    EOS,
    PAD,
    PROMPTS,
    PROPOSER_ONLY,
    REQUESTS,
    RULES,
    _sequence_histograms,
    check_batched_equals_unbatched,
    make_models,
    np_fires,
    reference_decode,
)
from scipy import stats

from verl_ext.decoding import engine, experimental
from verl_ext.decoding.engine import Request, TwoModelDecoder, replace_ratio
from verl_ext.decoding.experimental import (
    AdaptiveDraftLen,
    SpeculativeTwoModelDecoder,
    expected_tokens,
    speculative_speed_bound,
)
from verl_ext.decoding.sampler import DecodingRule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return make_models()


def decoder(base, rl, rule, draft_len=1, **kw):
    """The step loop `TwoModelDecoder` for draft_len=1 without a draft_model, else the rounds."""
    kw.setdefault("max_new_tokens", 10)
    if draft_len == 1 and "draft_model" not in kw:
        return TwoModelDecoder(base, rl, rule, eos_token_ids=[EOS], pad_token_id=PAD, **kw)
    return SpeculativeTwoModelDecoder(base, rl, rule, eos_token_ids=[EOS], pad_token_id=PAD, draft_len=draft_len, **kw)


@pytest.mark.parametrize("name", list(RULES))
def test_rounds_match_cache_free_reference(models, name):
    """Rounds of k = 1, 3, 6 and the adaptive k all emit the reference's tokens, flags and scores,
    for every criterion."""
    base, rl = models
    rule = RULES[name]
    expected = [reference_decode(base, rl, r.prompt_ids, r.stream_id, 11, rule, 10) for r in REQUESTS]
    for draft_len in (1, 3, 6, "auto"):
        dec = SpeculativeTwoModelDecoder(base, rl, rule, eos_token_ids=[EOS], pad_token_id=PAD, max_new_tokens=10,
                                         seed=11, draft_len=draft_len, max_draft_len=5, max_batch_size=4, admit_min=1)
        assert dec.early_gate == (name in PROPOSER_ONLY)
        for req, res, (tokens, fired, scores) in zip(REQUESTS, dec.generate(REQUESTS), expected):
            assert res.tokens == tokens, (name, draft_len, req)
            assert res.replaced == fired
            np.testing.assert_allclose(res.scores, scores, rtol=1e-5, atol=1e-6)
            assert res.finish_reason == ("eos" if tokens[-1] == EOS else "length")
        if name == "none":
            assert dec.stats.scoring_forwards == 0  # `none` never needs the other model


def test_scorer_without_a_split_lm_head_gives_the_same_tokens(models, monkeypatch):
    """A proposer-only gate projects the scorer's hidden states at the fired positions of a round
    only; the full-logits path gives the same results."""
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
    check_batched_equals_unbatched(lambda rule, **kw: decoder(*models, rule, draft_len=3, **kw))


def test_speculative_matches_the_step_loop_in_distribution():
    """Different random streams: speculative rounds vs the step loop, over whole sequences."""
    base, rl = make_models(vocab=6, seed=7, eos_boost=1.0, perturb=0.8)
    rule = DecodingRule("delta_logp", -0.3, top_p=0.95)
    step = decoder(base, rl, rule, seed=1, max_batch_size=256, max_new_tokens=3)
    spec = decoder(base, rl, rule, seed=2, draft_len=3, max_batch_size=256, max_new_tokens=3)
    reqs = [Request([2, 3], stream_id=i) for i in range(3000)]
    a, b = step.generate(reqs), spec.generate(reqs)
    table = _sequence_histograms(a, b)
    assert table.shape[1] > 10
    assert stats.chi2_contingency(table).pvalue > 1e-3
    ra, rb = replace_ratio(a), replace_ratio(b)
    assert 0.05 < ra < 0.95 and abs(ra - rb) < 0.04


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
    monkeypatch.setattr(experimental, "LAW_CHUNK_ROWS", 5)  # the step law built in chunks of positions: same results
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
    from verl_ext.decoding.experimental import step_law
    from verl_ext.decoding.sampler import sampling_log_probs

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
    for bad in (0, "fast", 2.5):
        with pytest.raises(ValueError, match="draft_len must be an int >= 1 or 'auto'"):
            decoder(base, rl, RULES["delta_logp"], draft_len=bad)
    with pytest.raises(ValueError, match="max_draft_len must be >= 1, got 0"):
        decoder(base, rl, RULES["delta_logp"], draft_len="auto", max_draft_len=0)
    with pytest.raises(ValueError, match="criterion 'none'"):  # the step loop's checks still apply
        decoder(base, None, RULES["delta_logp"], draft_len=3)
