"""The weighting schemes against independent, element-by-element computations of their formulas."""

import math
import statistics

import numpy as np
import pytest
import torch

from verl_ext.weighting import (
    WeightingSpec,
    dominate_token_weights,
    lowprob_token_weights,
    ppl_response_weights,
    token_weights,
    weight_metrics,
)


def random_batch(batch=6, length=9, vocab=11, seed=0):
    """Log-probs of sampled tokens under a random softmax policy; padding tail is −inf."""
    g = torch.Generator().manual_seed(seed)
    logp_all = torch.log_softmax(torch.randn(batch, length, vocab, generator=g) * 2, dim=-1)
    tokens = torch.randint(vocab, (batch, length), generator=g)
    old_log_probs = logp_all.gather(-1, tokens[..., None])[..., 0]
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = 0  # one empty response
    mask = torch.arange(length)[None, :] < lengths[:, None]
    old_log_probs = old_log_probs.masked_fill(~mask, float("-inf"))
    old_log_probs[1, -1] = float("nan") if not mask[1, -1] else old_log_probs[1, -1]
    return old_log_probs, mask.to(torch.int64)


def test_lowprob_matches_eq8_elementwise():
    old, mask = random_batch()
    alpha = 0.2
    w = lowprob_token_weights(old, mask, alpha)
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            expected = 1 + alpha * (1 - math.exp(old[i, t].item())) if mask[i, t] else 1.0
            assert w[i, t].item() == pytest.approx(expected, abs=1e-6)
    valid = w[mask.bool()]
    assert torch.all(valid >= 1) and torch.all(valid <= 1 + alpha)
    assert torch.isfinite(w).all()


def test_dominate_matches_formula_elementwise():
    old, mask = random_batch(seed=1)
    alpha = 0.1
    w = dominate_token_weights(old, mask, alpha)
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            expected = alpha * math.exp(old[i, t].item()) + 1 - alpha if mask[i, t] else 1.0
            assert w[i, t].item() == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(w).all()


def _independent_ppl(old, mask, groups, alpha, lo, hi, iqr):
    """Deng et al.'s PPL weights with Python's statistics module, one response at a time."""
    log_ppl = {}
    for i in range(old.shape[0]):
        vals = [old[i, t].item() for t in range(old.shape[1]) if mask[i, t]]
        if vals:
            log_ppl[i] = -sum(vals) / len(vals)
    weights, zs = [], []
    for i in range(old.shape[0]):
        if i not in log_ppl:
            weights.append(1.0)
            zs.append(0.0)
            continue
        members = [j for j in log_ppl if groups[j] == groups[i]]
        xs = [log_ppl[j] for j in members]
        if iqr and len(xs) >= 2:
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
            xs = [x for x in xs if q1 - 1.5 * (q3 - q1) <= x <= q3 + 1.5 * (q3 - q1)]
        mu, sd = statistics.fmean(xs), statistics.pstdev(xs)
        z = 0.0 if sd < 1e-6 else (log_ppl[i] - mu) / sd
        zs.append(z)
        weights.append(min(max(1 - alpha * z, lo), hi))
    return weights, zs


@pytest.mark.parametrize("iqr", [False, True])
def test_ppl_matches_group_zscore_formula(iqr):
    old, mask = random_batch(batch=16, length=12, seed=2)
    old[5] = old[5] * 8  # an outlier response in group "b" (more extreme log-PPL)
    mask[5] = 1
    old[5] = torch.where(torch.isfinite(old[5]), old[5], torch.tensor(-3.0))
    groups = np.array(["a"] * 4 + ["b"] * 6 + ["c"] * 5 + ["d"], dtype=object)
    alpha = 0.3  # large enough that the clamp binds for some responses
    w, z = ppl_response_weights(old, mask, groups, alpha, (0.8, 1.2), iqr_filter=iqr)
    expected_w, expected_z = _independent_ppl(old, mask, groups, alpha, 0.8, 1.2, iqr)
    np.testing.assert_allclose(z.numpy(), expected_z, atol=1e-9)
    np.testing.assert_allclose(w.numpy(), expected_w, atol=1e-6)
    assert w[0] == 1.0 and z[0] == 0.0  # the empty response
    assert z[15] == 0.0  # a group of one has std 0
    if iqr:  # the outlier is left out of group b's statistics, which changes its members' z
        _, z_plain = ppl_response_weights(old, mask, groups, alpha, (0.8, 1.2), iqr_filter=False)
        assert not torch.allclose(z[4:10], z_plain[4:10])
    assert ((w == 0.8) | (w == 1.2)).any()  # the clamp binds somewhere


def test_ppl_token_weights_broadcast_and_metrics():
    old, mask = random_batch(batch=8, seed=3)
    groups = np.repeat(np.array(["g0", "g1"], dtype=object), 4)
    spec = WeightingSpec.create("ppl", alpha=0.5)
    w, extras = token_weights(spec, old, mask, groups)
    w_resp, z = ppl_response_weights(old, mask, groups, 0.5)
    for i in range(8):
        for t in range(old.shape[1]):
            assert w[i, t].item() == pytest.approx(w_resp[i].item() if mask[i, t] else 1.0)
    has = mask.bool().any(-1)
    assert extras["ppl_abs_z_mean"] == pytest.approx(z[has].abs().mean().item())


def test_none_is_identity_and_padding_never_nan():
    old, mask = random_batch(seed=4)
    for scheme in ("none", "lowprob", "dominate"):
        w, _ = token_weights(WeightingSpec.create(scheme, 0.2), old, mask)
        assert torch.isfinite(w).all(), scheme
        assert torch.all(w[~mask.bool()] == 1.0), scheme
    w, _ = token_weights(WeightingSpec.create("none", 0.0), old, mask)
    assert torch.all(w == 1.0)


def test_weight_metrics_by_hand():
    w = torch.tensor([[1.0, 1.1, 1.2], [1.04, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    m = weight_metrics(w, mask)
    assert m["weight_mean"] == pytest.approx((1.0 + 1.1 + 1.2 + 1.04) / 4)
    assert m["weight_min"] == pytest.approx(1.0)
    assert m["weight_max"] == pytest.approx(1.2)
    assert m["frac_weight_above_1.05"] == pytest.approx(0.5)


def test_alpha_defaults_are_the_papers_and_live_in_the_recipe_config_only():
    """α = 0.2 for Qwen2.5-Math-7B (0.1 for Qwen3-8B-Base), Dominate 0.1, PPL 0.01: configs only."""
    from omegaconf import OmegaConf

    from verl_ext.core.paths import config_dir

    recipe = OmegaConf.load(config_dir() / "dapo_reweight.yaml")
    assert OmegaConf.to_container(recipe.default_alpha) == {"lowprob": 0.2, "ppl": 0.01, "dominate": 0.1, "none": 0.0}
    assert OmegaConf.load(config_dir() / "preset" / "qwen3-8b-base.yaml").default_alpha.lowprob == 0.1
    with pytest.raises(ValueError, match="alpha is not set"):
        WeightingSpec.create("lowprob", None)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "lowprobb", "alpha": 0.2}, "unknown weighting scheme 'lowprobb'; valid choices: lowprob, ppl, dominate, none"),
        ({"scheme": "lowprob", "alpha": -0.1}, "got -0.1"),
        ({"scheme": "dominate", "alpha": 1.0}, "dominate needs 0 <= alpha < 1"),
        ({"scheme": "ppl", "alpha": 0.01, "ppl_clamp": (1.2, 0.8)}, "low <= high, got low=1.2, high=0.8"),
        ({"scheme": "ppl", "alpha": float("nan")}, "finite"),
        ({"scheme": "ppl", "alpha": 0.01, "ppl_iqr_filter": "no"}, "ppl_iqr_filter must be true or false, got 'no'"),
    ],
)
def test_bad_weighting_input_names_value_and_choices(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WeightingSpec.create(**kwargs)


def test_lemma_3_1_gradient_norm_of_softmax_logits():
    """Lemma 3.1: for J = r·Â with r = π_θ(o)/π_old(o) un-clipped, ‖∂J/∂z‖₁ = 2|r·Â|(1 − π(o))."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        vocab = 3 + trial
        z = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True)
        z_old = z.detach() + 0.1 * torch.randn(vocab, generator=g, dtype=torch.float64)
        o = int(torch.randint(vocab, (1,), generator=g))
        adv = float(torch.randn(1, generator=g))
        pi = torch.softmax(z, -1)
        r = pi[o] / torch.softmax(z_old, -1)[o]
        (r * adv).backward()
        lhs = z.grad.abs().sum().item()
        rhs = 2 * abs(r.item() * adv) * (1 - pi[o].item())
        assert lhs == pytest.approx(rhs, rel=1e-10)
