"""verl_ext.core.distributions against plain-Python sums over the vocabulary."""

import math

import pytest
import torch

from verl_ext.core.distributions import (
    averaged_kl,
    entropy,
    extrapolated_log_softmax,
    kl_divergence,
    log_softmax,
    top_p_log_softmax,
    top_p_mask,
)


def rand_logp(n=5, vocab=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale)


def test_entropy_and_kls_match_naive_sums():
    lp, lq = rand_logp(seed=0), rand_logp(seed=1)
    for i in range(lp.shape[0]):
        p = [math.exp(v) for v in lp[i].tolist()]
        q = [math.exp(v) for v in lq[i].tolist()]
        h = -sum(pi * math.log(pi) for pi in p)
        kl_pq = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        kl_qp = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
        assert entropy(lp)[i].item() == pytest.approx(h, rel=1e-12)
        assert kl_divergence(lp, lq)[i].item() == pytest.approx(kl_pq, rel=1e-12)
        assert averaged_kl(lp, lq)[i].item() == pytest.approx(0.5 * (kl_pq + kl_qp), rel=1e-12)


def test_zero_mass_tokens_contribute_nothing():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    lq = torch.log(torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64))
    assert entropy(lp).item() == pytest.approx(math.log(2))
    assert kl_divergence(lp, lq).item() == pytest.approx(math.log(2))
    assert math.isinf(kl_divergence(lq, lp).item())  # q puts mass where p has none


def test_bounds_and_identity():
    lp = rand_logp(n=50, vocab=13, seed=2)
    assert torch.all(entropy(lp) <= math.log(13) + 1e-12) and torch.all(entropy(lp) >= 0)
    assert torch.all(kl_divergence(lp, rand_logp(n=50, vocab=13, seed=3)) >= 0)
    assert torch.allclose(kl_divergence(lp, lp), torch.zeros(50, dtype=torch.float64))


def test_extrapolation_eq7():
    lrl, lb = rand_logp(seed=4), rand_logp(seed=5)
    assert torch.equal(extrapolated_log_softmax(lrl, lb, 0.0), lrl)
    gamma = 0.3
    out = extrapolated_log_softmax(lrl, lb, gamma)
    for i in range(lrl.shape[0]):
        unnorm = [math.exp(a) ** (1 + gamma) / math.exp(b) ** gamma for a, b in zip(lrl[i].tolist(), lb[i].tolist())]
        z = sum(unnorm)
        for v, u in enumerate(unnorm):
            assert out[i, v].item() == pytest.approx(math.log(u / z), rel=1e-10)


@pytest.mark.parametrize("vocab", [9, 300], ids=["small vocab", "nucleus past the partial sort"])
def test_top_p_mask_matches_naive_nucleus(vocab):
    # peaked and flat rows: with 300 tokens some nuclei fit in the partial sort's candidates, some not
    lp = torch.cat([rand_logp(n=10, vocab=vocab, seed=6, scale=s) for s in (0.3, 6.0)])
    lp[::3] = log_softmax(torch.round(lp[::3] * 2))  # many ties, some at the partial sort's boundary
    for top_p in (0.1, 0.5, 0.7, 0.95, 1.0):
        mask = top_p_mask(lp, top_p)
        sizes = []
        for i in range(lp.shape[0]):
            probs = lp[i].exp().tolist()
            order = sorted(range(vocab), key=lambda v: (-probs[v], v))
            surely, maybe, mass = set(), set(), 0.0  # kept for sure / within rounding of the boundary
            for v in order:
                if mass < top_p - 1e-12 or not surely:
                    surely.add(v)
                if mass < top_p + 1e-12 or not maybe:
                    maybe.add(v)
                mass += probs[v]
            got = {v for v in range(vocab) if mask[i, v]}
            assert surely <= got <= maybe
            sizes.append(len(got))
        if vocab == 300 and top_p == 0.7:
            assert min(sizes) < 64 < max(sizes)  # both paths ran
        assert torch.equal(top_p_mask(lp.view(2, 10, vocab), top_p), mask.view(2, 10, vocab))
        renorm = top_p_log_softmax(lp, top_p)
        assert torch.allclose(renorm.exp().sum(-1), torch.ones(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="top_p must be in"):
        top_p_mask(lp, 0.0)


def test_truncated_mass_recovers_the_nucleus_mass():
    """A top-p sampler reports log π_S(y) = log π(y) − log Z; the metric recovers 1 − Z exactly."""
    from verl_ext.rollout_metrics import nucleus_kept_mass, truncation_metrics

    lp = rand_logp(n=30, vocab=11, seed=7)
    for top_p in (1.0, 0.9, 0.5):
        keep = top_p_mask(lp, top_p)
        kept_mass = (lp.exp() * keep).sum(-1)
        token = lp.argmax(-1, keepdim=True)  # always inside the nucleus
        full = lp.gather(-1, token)[:, 0]
        truncated = top_p_log_softmax(lp, top_p).gather(-1, token)[:, 0]
        torch.testing.assert_close(nucleus_kept_mass(full, truncated), kept_mass)
        m = truncation_metrics(full[None], truncated[None], torch.ones(1, 30))
        assert m["rollout/top_p_truncated_mass_mean"] == pytest.approx(float((1 - kept_mass).mean()))
        if top_p == 1.0:
            assert m["rollout/top_p_truncated_mass_max"] == pytest.approx(0.0, abs=1e-12)


def test_truncated_mass_net_of_the_engine_noise_floor():
    """Two-sided engine noise on log π (as bf16 vs fp32) inflates the raw truncated mass; the floor
    (the impossible side, π_old > π_rollout) measures it, and the net mean recovers the true cut mass."""
    from verl_ext.rollout_metrics import truncation_metrics

    gen = torch.Generator().manual_seed(0)
    n = 200_000
    old = -torch.rand(1, n, generator=gen, dtype=torch.float64) * 3
    noise = torch.randn(1, n, generator=gen, dtype=torch.float64) * 0.004
    mask = torch.ones(1, n)
    for true_cut in (0.0, 0.05):  # top-p 1; a nucleus that cuts 5% at every other token (the rest keep all)
        cut = torch.zeros(1, n, dtype=torch.float64)
        cut[:, ::2] = true_cut
        rollout = old - torch.log1p(-cut) + noise
        m = truncation_metrics(old, rollout, mask)
        raw, net, floor = (m[f"rollout/top_p_{k}"] for k in ("truncated_mass_mean", "truncated_mass_net_mean", "mismatch_floor"))
        assert floor > 0.0005  # the noise of the uncut tokens, on the side truncation cannot reach
        assert raw == pytest.approx(true_cut / 2 + floor, abs=2e-4)  # the raw mean reads the noise as a cut
        assert net == pytest.approx(true_cut / 2, abs=2e-4)


def _processed_reference(z, temperature, top_k, top_p):
    """vLLM's processed distribution in plain Python: softmax(z/T), keep the k best (ties by id),
    renormalise, keep tokens while the mass before them (descending, ties by id) is < p, renormalise."""
    if temperature == 0:
        temperature, top_k = 1.0, 1
    p = [math.exp(v / temperature) for v in z]
    order = sorted(range(len(z)), key=lambda v: (-p[v], v))
    kept = order[: top_k] if top_k > 0 else order
    total = sum(p[v] for v in kept)
    nucleus, before = [], 0.0
    for v in kept:
        if before < top_p or not nucleus:
            nucleus.append(v)
        before += p[v] / total
    mass = sum(p[v] for v in nucleus)
    return [p[v] / mass if v in nucleus else 0.0 for v in range(len(z))]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 2, 1.0), (1.0, 0, 0.7), (1.3, 3, 0.6), (0.0, 0, 0.9)]
)
def test_sampling_log_softmax_is_top_k_then_nucleus_of_the_tempered_softmax(temperature, top_k, top_p):
    from verl_ext.core.distributions import sampling_log_softmax

    z = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)], [0.3, -1.0, 2.0, 0.3]])
    got = sampling_log_softmax(z.double(), temperature, top_k, top_p).exp()
    for row in range(z.shape[0]):
        ref = _processed_reference(z[row].double().tolist(), temperature, top_k, top_p)
        assert got[row].tolist() == pytest.approx(ref, abs=1e-12)
    # the two hand-checked cases of the first row: top-2 and nucleus 0.7 (0.5 < 0.7 <= 0.8) keep {0, 1}
    if (top_k, top_p) in ((2, 1.0), (0, 0.7)) and temperature == 1.0:
        assert got[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
