"""Pure parts of two-model decoding: random streams, criteria, the two-stage sampler, and the step law
the experimental π_RL-drafted rounds verify against (`experimental.step_law`, `latent_gate`, `verify_drafts`).

Every check compares against an independent computation (plain Python / NumPy formulas), or
against the sampling law p(y) = p_prop(y)(1 − g(y)) + [Σ p_prop g]·q(y) with a chi-square test.
"""

import math

import numpy as np
import pytest
import torch
from decoding_reference import np_nucleus, np_softmax
from scipy import stats

from verl_ext.core import rng
from verl_ext.core.sampling import sample_from_log_probs
from verl_ext.decoding.criteria import CRITERIA, GateInputs, can_fire, criterion_score, gate, gate_reads, get_criterion
from verl_ext.decoding.experimental import latent_gate, step_law, support_columns, verify_drafts
from verl_ext.decoding.sampler import (
    DecodingRule,
    base_top_k_view,
    evaluate_gate,
    evaluate_gate_on_proposer,
    gate_and_resample,
    gate_reads_proposer_only,
    resample,
    sampling_log_probs,
    speculative_accept,
    two_stage_step,
)

M64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- references


def py_splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def law_two_stage(lb, lr, g, rule):
    """p(y) = p_prop(y)(1 − g(y)) + [Σ_y' p_prop(y') g(y')] q(y), all from NumPy formulas."""
    lb, lr = np.log(np_softmax(lb)), np.log(np_softmax(lr))
    prop_logits = lb if rule.propose_from == "base" else lr
    p_prop = np_nucleus(np_softmax(prop_logits / rule.temperature), rule.top_p)
    gamma = rule.gamma if rule.action == "extrapolate" else 0.0
    q0 = np.log(np_softmax((1 + gamma) * lr - gamma * lb))
    q = np_nucleus(np_softmax(q0 / rule.temperature), rule.top_p)
    return p_prop * (1 - g) + (p_prop * g).sum() * q


def draw_many(lb, lr, rule, n=30_000, seed=0):
    logp_b = torch.log_softmax(torch.tensor(lb, dtype=torch.float64), -1).expand(n, -1)
    logp_r = torch.log_softmax(torch.tensor(lr, dtype=torch.float64), -1).expand(n, -1)
    keys = rng.sequence_keys(seed, torch.arange(n))
    pos = torch.zeros(n, dtype=torch.long)
    u = [rng.uniforms(keys, pos, s) for s in (rng.STREAM_PROPOSAL, rng.STREAM_GATE, rng.STREAM_RESAMPLE)]
    return two_stage_step(logp_b, logp_r, *u, rule)


def assert_matches_law(tokens, law, alpha=1e-3):
    counts = np.bincount(tokens.numpy(), minlength=len(law))
    assert counts[law == 0].sum() == 0, "sampled a token of probability 0"
    support = law > 0
    expected = law[support] * counts.sum()
    p_value = stats.chisquare(counts[support], expected).pvalue
    assert p_value > alpha, (counts, expected, p_value)


LB = np.array([1.2, 0.9, 0.1, -0.4, -1.0, -2.5, 0.6])
LR = np.array([0.2, 1.8, 0.4, -0.3, -3.0, -0.5, 0.6])


# ----------------------------------------------------------------------------- rng


def test_splitmix64_known_values_and_python_reference():
    # SplitMix64 seeded with 0: state advances by φ each call; first outputs are published constants.
    outs = rng.splitmix64(torch.tensor([0, rng._GOLDEN, rng._signed((2 * 0x9E3779B97F4A7C15) & M64)]))
    assert [int(o) & M64 for o in outs] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    xs = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)
    got = rng.splitmix64(torch.from_numpy(xs))
    assert [int(g) & M64 for g in got] == [py_splitmix64(int(x) & M64) for x in xs]


def test_uniforms_are_uniform_and_streams_independent():
    keys = rng.sequence_keys(7, torch.arange(4000))
    pos = torch.arange(4000) % 13
    u0, u1 = rng.uniforms(keys, pos, 0), rng.uniforms(keys, pos, 1)
    assert u0.dtype == torch.float64 and float(u0.min()) >= 0 and float(u0.max()) < 1
    assert stats.kstest(u0.numpy(), "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u0.numpy(), u1.numpy())[0, 1]) < 0.06
    # the second lane (scorer drafts) is uniform, and independent of every first-lane stream
    u3 = rng.uniforms(keys, pos, rng.STREAM_SCORER_DRAFT)
    assert stats.kstest(u3.numpy(), "uniform").pvalue > 1e-3
    for other in (u0, u1, rng.uniforms(keys, pos, 2), rng.uniforms(keys, pos + 1, 0)):
        assert abs(np.corrcoef(u3.numpy(), other.numpy())[0, 1]) < 0.06
        assert not np.any(u3.numpy() == other.numpy())
    # the same key/position/stream gives the same number whatever it is batched with
    assert rng.uniforms(keys[5:6], pos[5:6], 0).item() == u0[5].item()
    assert rng.sequence_keys(7, torch.tensor([3])).item() != rng.sequence_keys(8, torch.tensor([3])).item()


# ----------------------------------------------------------------------------- inverse CDF


def test_inverse_cdf_matches_python_and_skips_zero_mass():
    p = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    logp = p.log()
    us = torch.tensor([0.0, 0.1, 0.2499, 0.25, 0.5, 0.74, 0.75, 0.999999, 1 - 2**-53], dtype=torch.float64)
    got = sample_from_log_probs(logp.expand(len(us), -1), us).tolist()
    cdf = np.cumsum(p.numpy())
    want = [min(int(np.searchsorted(cdf, u, side="right")), 4) for u in us.tolist()]
    assert got == want
    assert all(p[g] > 0 for g in got)


# ----------------------------------------------------------------------------- criteria


def _probs(seed, n=5, v=9):
    g = torch.Generator().manual_seed(seed)
    return (torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1) for _ in range(2))


def test_criterion_scores_match_numpy():
    lb, lr = _probs(1)
    token = torch.tensor([0, 3, 8, 2, 5])
    u = torch.rand(5, dtype=torch.float64)
    x = GateInputs(lb, lr, lr.gather(1, token[:, None]).squeeze(1) - lb.gather(1, token[:, None]).squeeze(1), u)
    P, Q = lb.exp().numpy(), lr.exp().numpy()
    ent = lambda a: -(a * np.log(a)).sum(1)
    kl = lambda a, b: (a * (np.log(a) - np.log(b))).sum(1)
    want = {
        "entropy_base": ent(P),
        "entropy_rl": ent(Q),
        "kl_rl_base": kl(Q, P),
        "kl_base_rl": kl(P, Q),
        "avg_kl": 0.5 * (kl(P, Q) + kl(Q, P)),
        "delta_logp": np.log(Q[range(5), token]) - np.log(P[range(5), token]),
        "random": u.numpy(),
    }
    for name, w in want.items():
        np.testing.assert_allclose(criterion_score(name, x).numpy(), w, rtol=1e-10, err_msg=name)
    s = torch.tensor([-1.0, 0.5, 2.0])
    assert gate("avg_kl", s, 0.5).tolist() == [False, False, True]
    assert gate("delta_logp", s, 0.5).tolist() == [True, False, False]
    assert gate("none", s, 0.5).tolist() == [False] * 3
    assert gate("all", s, 0.5).tolist() == [True] * 3
    assert set(CRITERIA) == {"entropy_base", "entropy_rl", "kl_rl_base", "kl_base_rl", "avg_kl", "delta_logp",
                             "random", "none", "all"}


def test_gate_reads_is_what_the_scores_look_at():
    """`reads` is checked against the scores themselves: changing a distribution a criterion does
    not read leaves its score unchanged, changing one it reads changes it."""
    lb, lr = _probs(2)
    lb2, lr2 = _probs(3)
    token = torch.tensor([0, 3, 8, 2, 5])
    u = torch.rand(5, dtype=torch.float64)

    def score(name, b, r):
        delta = r.gather(1, token[:, None]).squeeze(1) - b.gather(1, token[:, None]).squeeze(1)
        return criterion_score(name, GateInputs(b, r, delta, u))

    for name in CRITERIA:
        reads = gate_reads(name)
        for side, (b, r) in {"base": (lb2, lr), "rl": (lb, lr2)}.items():
            same = torch.equal(score(name, lb, lr).nan_to_num(7.0), score(name, b, r).nan_to_num(7.0))
            assert same == (side not in reads), (name, side)
    assert gate_reads("entropy_rl", top_k_approximation=5) == {"base", "rl"}  # π̃_RL lives on π_B's top-k
    assert gate_reads("entropy_base", top_k_approximation=5) == {"base"}
    assert [n for n in CRITERIA if not can_fire(n)] == ["none"]


@pytest.mark.parametrize(
    "rule",
    [
        DecodingRule("entropy_base", 1.5, top_p=0.9),
        DecodingRule("random", 0.4, "extrapolate", gamma=0.5, top_p=0.8),
        DecodingRule("all", 0.0, "extrapolate", gamma=0.3, top_p=0.9, base_top_k_approximation=4),
        DecodingRule("entropy_rl", 1.5, propose_from="rl", top_p=0.9),
        DecodingRule("entropy_base", 1.0, top_p=0.9, base_top_k_approximation=4),
    ],
    ids=["entropy_base", "random", "all-topk", "entropy_rl-rl-proposal", "entropy_base-topk"],
)
def test_gate_on_the_proposer_alone_equals_the_two_model_gate(rule):
    lb, lr = _probs(4, n=64)
    prop = lb if rule.propose_from == "base" else lr
    keys = rng.sequence_keys(0, torch.arange(64))
    pos = torch.zeros(64, dtype=torch.long)
    u_prop, u_gate = (rng.uniforms(keys, pos, s) for s in (rng.STREAM_PROPOSAL, rng.STREAM_GATE))
    token = sample_from_log_probs(prop, u_prop)
    assert gate_reads_proposer_only(rule)
    s1, g1 = evaluate_gate_on_proposer(prop, token, u_gate, rule)
    s2, g2 = evaluate_gate(lb, lr, token, u_gate, rule)
    assert torch.equal(g1, g2) and 0 < int(g1.sum()) <= 64
    np.testing.assert_array_equal(s1.numpy(), s2.numpy())


def test_gate_on_the_proposer_refuses_criteria_that_read_the_other_model():
    lb, _ = _probs(5)
    token, u = torch.zeros(5, dtype=torch.long), torch.rand(5, dtype=torch.float64)
    for rule in (DecodingRule("delta_logp", -0.3), DecodingRule("entropy_rl", 1.0), DecodingRule("avg_kl", 0.1),
                 DecodingRule("entropy_base", 1.0, propose_from="rl"),
                 DecodingRule("entropy_rl", 1.0, propose_from="rl", base_top_k_approximation=3)):
        assert not gate_reads_proposer_only(rule)
        with pytest.raises(ValueError, match="reads the other model"):
            evaluate_gate_on_proposer(lb, token, u, rule)


def np_law_of_fired_proposal_and_q(lb, lr, rule):
    """(p_F, q) with NumPy: p_F ∝ p_prop·g over tokens (g(v) = Δlog p(v) < τ for delta_logp, else 1)."""
    lb, lr = np.log(np_softmax(lb)), np.log(np_softmax(lr))
    p = np_nucleus(np_softmax((lb if rule.propose_from == "base" else lr) / rule.temperature), rule.top_p)
    if rule.criterion == "delta_logp":
        p = p * ((lr - lb) < rule.threshold)
    gamma = rule.resample_gamma
    q = np_nucleus(np_softmax(((1 + gamma) * lr - gamma * lb) / rule.temperature), rule.top_p)
    return p / p.sum(), q


@pytest.mark.parametrize(
    "rule",
    [
        DecodingRule("random", 0.3, "extrapolate", gamma=0.5, top_p=0.9),
        DecodingRule("delta_logp", -0.3, temperature=0.8, top_p=0.95),
        DecodingRule("avg_kl", 0.0, propose_from="rl", top_p=1.0),
    ],
    ids=["random-extrapolate", "delta_logp", "rl-proposal"],
)
def test_maximal_coupling_draws_q_and_keeps_the_proposal_with_probability_one_minus_tv(rule):
    """Given ŷ ~ p_F (the law of ŷ where the gate fired), y = resample(ŷ, u) has law q under both
    couplings; y = ŷ with probability Σ min(p_F, q) = 1 − TV (maximal) or Σ p_F·q (independent)."""
    n = 40_000
    p_f, q = np_law_of_fired_proposal_and_q(LB, LR, rule)
    gen = np.random.default_rng(5)
    y_hat = torch.tensor(gen.choice(len(LB), size=n, p=p_f))
    u = torch.tensor(gen.random(n))
    lb = torch.log_softmax(torch.tensor(LB), -1).expand(n, -1)
    lr = torch.log_softmax(torch.tensor(LR), -1).expand(n, -1)
    keep = {"maximal": np.minimum(p_f, q).sum(), "independent": (p_f * q).sum()}
    for coupling, p_keep in keep.items():
        r = DecodingRule(**{**rule.__dict__, "coupling": coupling})
        y = resample(lb, lr, y_hat, u, r)
        assert_matches_law(y, q)
        kept = (y == y_hat).double().mean().item()
        assert abs(kept - p_keep) < 4 * math.sqrt(p_keep * (1 - p_keep) / n), (coupling, kept, p_keep)
    assert keep["maximal"] >= keep["independent"]
    if rule.criterion != "delta_logp":  # p_F = p_prop, which overlaps q far more than q's own mass on ŷ
        assert keep["maximal"] > keep["independent"] + 0.1


def test_maximal_coupling_keeps_every_proposal_when_q_equals_the_proposal_law():
    """π_RL = π_B and a gate that ignores ŷ: p_F = q, so the resample never changes a token."""
    lb = torch.log_softmax(torch.randn(500, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64), -1)
    rule = DecodingRule("all", 0.0, top_p=0.8)
    y_hat = sample_from_log_probs(torch.log(torch.tensor(np.stack([np_nucleus(np_softmax(r), 0.8) for r in lb.numpy()]))),
                                  torch.rand(500, dtype=torch.float64))
    assert torch.equal(resample(lb, lb, y_hat, torch.rand(500, dtype=torch.float64), rule), y_hat)


@pytest.mark.parametrize(
    "rule",
    [DecodingRule("delta_logp", -0.3, temperature=0.8, top_p=0.95),
     DecodingRule("random", 0.35, "extrapolate", gamma=0.5, top_p=0.9)],
    ids=["delta_logp", "random-extrapolate"],
)
def test_step_law_and_the_gate_drawn_given_the_token_have_the_two_stage_joint_law(rule):
    """`step_law(...).emitted` is the closed form m of the module docstring; y ~ m followed by
    `latent_gate` gives (ŷ, fired, y) the step's joint law p_prop(v)[(1 − G(v))·1[y = v] + G(v)·q(y)]."""
    lb_np, lr_np = np.log(np_softmax(LB)), np.log(np_softmax(LR))
    g = ((lr_np - lb_np) < rule.threshold).astype(float) if rule.criterion == "delta_logp" else np.full(7, rule.threshold)
    m = law_two_stage(LB, LR, g, rule)
    n, v = 60_000, len(LB)
    lb = torch.log_softmax(torch.tensor(LB), -1).expand(n, -1)
    lr = torch.log_softmax(torch.tensor(LR), -1).expand(n, -1)
    law = step_law(lb[:1], lr[:1], rule)
    np.testing.assert_allclose(law.emitted[0].numpy(), m, atol=1e-12)
    gen = np.random.default_rng(3)
    y = torch.tensor(gen.choice(v, size=n, p=m / m.sum()))
    law = step_law(lb, lr, rule)
    fired, y_hat, score = latent_gate(law, y, torch.tensor(gen.random(n)), torch.tensor(gen.random(n)), lb, lr, rule)
    assert torch.equal(fired, gate(rule.criterion, score, rule.threshold))  # each flag is the gate on its score
    assert torch.equal(y_hat[~fired], y[~fired])
    p_prop = np_nucleus(np_softmax(lb_np / rule.temperature), rule.top_p)
    gamma = rule.resample_gamma
    q = np_nucleus(np_softmax(((1 + gamma) * lr_np - gamma * lb_np) / rule.temperature), rule.top_p)
    joint = np.stack([np.diag(p_prop * (1 - g)), np.outer(p_prop * g, q)])  # [fired, ŷ, y]
    cells = (fired.long() * v * v + y_hat * v + y).numpy()
    assert_matches_law(torch.tensor(cells), joint.ravel())


def test_support_columns_lists_each_rows_tokens_in_order_padded_outside_the_support():
    support = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    columns = support_columns(support)
    assert columns.shape == (4, 5)
    for row, cols in zip(support.tolist(), columns.tolist()):
        ids = [v for v, s in enumerate(row) if s]
        assert cols[: len(ids)] == ids
        assert all(not row[v] for v in cols[len(ids):])


@pytest.mark.parametrize(
    "rule",
    [DecodingRule("delta_logp", -0.3, top_p=0.7), DecodingRule("delta_logp", -0.2, "extrapolate", gamma=0.5, top_p=0.8),
     DecodingRule("entropy_base", 2.0, temperature=0.8, top_p=0.9), DecodingRule("random", 0.3, top_p=0.6),
     DecodingRule("delta_logp", -0.3, top_p=0.9, base_top_k_approximation=6)],
    ids=["delta_logp", "extrapolate", "entropy_base", "random", "top-k approximation"],
)
def test_step_law_on_the_draft_support_is_the_vocabulary_law_restricted(rule):
    """Verifying π_RL's drafts builds the step law on the tokens p_prop, q or the draft law give mass
    to: scattered back it is the law over the vocabulary, and acceptance + latent gate pick the same
    tokens, flags and scores from the same uniforms."""
    gen = torch.Generator().manual_seed(0)
    n, v = 64, 40
    lb = torch.log_softmax(3 * torch.randn(n, v, generator=gen), -1)
    lr = torch.log_softmax(lb + 0.7 * torch.randn(n, v, generator=gen), -1)
    draft_log_law = sampling_log_probs(lr, rule.temperature, rule.top_p)  # π_RL's drafts
    dense = step_law(lb, lr, rule)
    reuse = rule.resample_gamma == 0 and not rule.base_top_k_approximation  # then q is the draft law
    for reused in sorted({False, reuse}):
        sparse = step_law(lb, lr, rule, draft_log_law, reused)
        assert sparse.columns.shape[1] < v  # a few tokens per row, not the vocabulary
        for name in ("proposal", "fired", "kept", "emitted"):
            scattered = torch.zeros(n, v, dtype=torch.float64).scatter_add_(-1, sparse.columns, getattr(sparse, name))
            torch.testing.assert_close(scattered, getattr(dense, name), rtol=0, atol=1e-15)
        scattered = torch.zeros(n, v, dtype=torch.float64).scatter_add_(-1, sparse.columns, sparse.draft)
        torch.testing.assert_close(scattered, draft_log_law.double().exp(), rtol=0, atol=0)
        drafted = sample_from_log_probs(draft_log_law, torch.rand(n, generator=gen, dtype=torch.float64))
        assert torch.equal(sparse.token_of(sparse.column_of(drafted)), drafted)
        u = [torch.rand(n, generator=gen, dtype=torch.float64) for _ in range(3)]
        y_dense = speculative_accept(dense.emitted, draft_log_law.double().exp(), drafted, u[0])
        y_sparse = sparse.token_of(speculative_accept(sparse.emitted, sparse.draft, sparse.column_of(drafted), u[0]))
        assert torch.equal(y_sparse, y_dense)
        gate_dense = latent_gate(dense, y_dense, u[1], u[2], lb, lr, rule)
        gate_sparse = latent_gate(sparse, y_sparse, u[1], u[2], lb, lr, rule)
        assert torch.equal(gate_sparse[0], gate_dense[0]) and torch.equal(gate_sparse[1], gate_dense[1])  # fired, ŷ
        # scores: `random` rescales u by P(fire | y), a ratio of sums taken in another order
        torch.testing.assert_close(gate_sparse[2], gate_dense[2], rtol=0, atol=1e-12, equal_nan=True)
        verified = verify_drafts(lb, lr, rule, draft_log_law, drafted, *u, reused)  # what the engine runs
        assert torch.equal(verified.token, y_dense) and torch.equal(verified.fired, gate_dense[0])
        torch.testing.assert_close(verified.score, gate_dense[2], rtol=0, atol=1e-12, equal_nan=True)
        if rule.criterion == "entropy_base":  # a prefix score, kept from building the law: H(π_B) by hand
            by_hand = torch.tensor([-sum(math.exp(x) * x for x in row) for row in lb.double().tolist()], dtype=torch.float64)
            torch.testing.assert_close(gate_sparse[2].double(), by_hand, rtol=1e-5, atol=1e-5)
            assert torch.equal(gate_sparse[0], gate(rule.criterion, gate_sparse[2], rule.threshold))


def test_unknown_names_raise_with_valid_choices():
    with pytest.raises(ValueError, match="valid criteria: entropy_base, entropy_rl.*delta_logp.*none, all"):
        get_criterion("entropy")
    with pytest.raises(ValueError, match="valid criteria"):
        DecodingRule(criterion="kl")
    with pytest.raises(ValueError, match="valid actions: replace, extrapolate"):
        DecodingRule(action="mix")
    with pytest.raises(ValueError, match="gamma"):
        DecodingRule(action="replace", gamma=0.1)
    with pytest.raises(ValueError, match="top_p"):
        DecodingRule(top_p=0.0)
    with pytest.raises(ValueError, match="unknown coupling 'optimal'; valid: maximal, independent"):
        DecodingRule(coupling="optimal")


# ----------------------------------------------------------------------------- sampling law


@pytest.mark.parametrize(
    "rule",
    [
        DecodingRule("delta_logp", -0.3, temperature=1.0, top_p=0.7),
        DecodingRule("delta_logp", -0.5, "extrapolate", gamma=0.5, temperature=0.8, top_p=0.95),
        DecodingRule("delta_logp", 0.2, "extrapolate", gamma=0.3, propose_from="rl", top_p=1.0),
        DecodingRule("random", 0.35, "extrapolate", gamma=1.0, temperature=1.3, top_p=0.9),
        DecodingRule("delta_logp", -0.3, top_p=0.9, coupling="independent"),
    ],
    ids=["replace", "extrapolate", "table1-rl-proposal", "random", "independent-coupling"],
)
def test_two_stage_sampler_follows_its_law(rule):
    out = draw_many(LB, LR, rule)
    lb, lr = np.log(np_softmax(LB)), np.log(np_softmax(LR))
    if rule.criterion == "delta_logp":
        g = ((lr - lb) < rule.threshold).astype(float)
    else:
        g = np.full(len(LB), rule.threshold)
    assert 0 < (g > 0).sum() < len(g) or rule.criterion == "random"  # the gate matters
    law = law_two_stage(LB, LR, g, rule)
    assert_matches_law(out.token, law)
    # the fired flags agree with g on the proposed token, and the rate with Σ p_prop g
    p_prop = np_nucleus(np_softmax((lb if rule.propose_from == "base" else lr) / rule.temperature), rule.top_p)
    rate = (p_prop * g).sum()
    assert abs(out.fired.double().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / len(out.fired)) + 1e-9


def test_limits_none_is_proposal_all_is_q_and_gamma0_is_replace():
    lb = torch.log_softmax(torch.tensor(LB), -1).expand(500, -1)
    lr = torch.log_softmax(torch.tensor(LR), -1).expand(500, -1)
    keys = rng.sequence_keys(3, torch.arange(500))
    u = [rng.uniforms(keys, torch.zeros(500, dtype=torch.long), s) for s in range(3)]
    proposal = sample_from_log_probs(torch.log(torch.tensor(np_nucleus(np_softmax(LB), 0.7))).expand(500, -1), u[0])
    rl_draw = sample_from_log_probs(torch.log(torch.tensor(np_nucleus(np_softmax(LR), 0.7))).expand(500, -1), u[2])
    none = two_stage_step(lb, lr, *u, DecodingRule("none", 0.0))
    assert torch.equal(none.token, proposal) and not none.fired.any()
    # a fresh draw from q is π_RL sampling token for token (the maximal coupling has its law: see above)
    allx = two_stage_step(lb, lr, *u, DecodingRule("all", 0.0, "extrapolate", gamma=0.0, coupling="independent"))
    assert torch.equal(allx.token, rl_draw) and allx.fired.all()
    rep = two_stage_step(lb, lr, *u, DecodingRule("delta_logp", -0.2))
    ext0 = two_stage_step(lb, lr, *u, DecodingRule("delta_logp", -0.2, "extrapolate", gamma=0.0))
    assert torch.equal(rep.token, ext0.token) and torch.equal(rep.fired, ext0.fired)
    assert 0 < rep.fired.sum() < 500


# ----------------------------------------------------------------------------- official top-k approximation


def test_base_top_k_view_matches_hand_computation():
    lb = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]], dtype=torch.float64), -1)
    lr = torch.log_softmax(torch.tensor([[0.0, 2.5, 3.0, -2.0, 1.0]], dtype=torch.float64), -1)
    view = base_top_k_view(lb, lr, 3)  # base top-3: ids 0, 1, 2;  RL top-3: ids 2, 1, 4
    assert view.ids.tolist() == [[0, 1, 2]]
    b = lb[0, :3].numpy()
    np.testing.assert_allclose(view.logp_base[0].numpy(), b - np.log(np.exp(b).sum()))
    rl_min = float(lr[0, 4])  # RL's smallest returned log-prob; token 0 is missing from RL's top-3
    r = np.array([rl_min, float(lr[0, 1]), float(lr[0, 2])])
    np.testing.assert_allclose(view.logp_rl[0].numpy(), r - np.log(np.exp(r).sum()))
    rule = DecodingRule("delta_logp", 0.0, base_top_k_approximation=3, top_p=1.0, coupling="independent")
    u = torch.tensor([0.5], dtype=torch.float64)
    # proposal 0 is missing from RL's top-3: Δ = min returned RL log-prob − log π_B(0)
    out = gate_and_resample(lb, lr, torch.tensor([0]), u, torch.tensor([0.99], dtype=torch.float64), rule)
    assert out.score.item() == pytest.approx(rl_min - float(lb[0, 0]))
    assert out.fired.item() and out.token.item() == 2  # resampled from the top-3 view: last CDF bin is id 2


def test_top_k_approximation_with_full_support_equals_exact():
    """With k = V nothing is missing or renormalised: same gate, same proposals, same law."""
    lb, lr = _probs(4, n=2000, v=8)
    keys = rng.sequence_keys(0, torch.arange(2000))
    u = [rng.uniforms(keys, torch.zeros(2000, dtype=torch.long), s) for s in range(3)]
    for crit, tau in [("avg_kl", 0.4), ("delta_logp", -0.3), ("entropy_rl", 1.2)]:
        exact = two_stage_step(lb, lr, *u, DecodingRule(crit, tau, "extrapolate", gamma=0.2, top_p=0.8))
        approx = two_stage_step(lb, lr, *u, DecodingRule(crit, tau, "extrapolate", gamma=0.2, top_p=0.8,
                                                          base_top_k_approximation=8))
        assert torch.equal(exact.fired, approx.fired), crit
        torch.testing.assert_close(exact.score, approx.score, rtol=1e-9, atol=1e-12)
        assert torch.equal(exact.token[~exact.fired], approx.token[~approx.fired])
        assert 0 < exact.fired.sum() < 2000
    rule = DecodingRule("delta_logp", -0.3, "extrapolate", gamma=0.5, top_p=0.8, base_top_k_approximation=len(LB))
    lb_, lr_ = np.log(np_softmax(LB)), np.log(np_softmax(LR))
    assert_matches_law(draw_many(LB, LR, rule).token, law_two_stage(LB, LR, ((lr_ - lb_) < -0.3).astype(float), rule))
