"""How far a truncated (top-p / top-k) rollout is from the full-vocabulary π_old the trainer uses.

The rollout engine samples from the renormalised nucleus π_S(v) = π(v)/Z on the kept set S
(Z = Σ_{u∈S} π(u)) and reports log π_S(y) of the sampled token; verl recomputes π_old(y) = π(y)
over the full vocabulary. Hence, per sampled token, Z = exp(log π_old(y) − log π_rollout(y)):
the probability mass the nucleus kept, and 1 − Z the mass it cut. With top-p = 1 this is 0 up
to the numerical mismatch between the two engines.

That mismatch is not small next to the masses a top-p of 0.95 cuts: a bf16 trainer against an fp32
rollout reads about a thousandth on average, and a few hundredths at worst, at top-p = 1
(docs/benchmarks.md). It is two-sided (d = log π_old − log π_rollout
scatters around 0), while truncation is one-sided (a nucleus only raises π_rollout(y): d <= 0). So
the tokens on the impossible side, d > 0, measure the noise in the same step: `mismatch_floor` =
mean over tokens of max(0, 1 − exp(−d)), the cut mass the same noise reads with its sign flipped.
For noise symmetric in d the raw truncated mass holds the same amount, so
`truncated_mass_net_mean` = truncated_mass_mean − mismatch_floor reads ≈ 0 at top-p = 1 and the
cut mass at top-p < 1 (where a real cut, |log Z| above the noise, adds nothing to the floor).
Logged: `rollout/top_p_truncated_mass_mean|max` (raw), `..._net_mean`, `rollout/top_p_mismatch_floor`,
`rollout/top_p_frac_tokens_truncated_over_1pct`.
"""

from __future__ import annotations

import torch

METRIC_PREFIX = "rollout/top_p_"


def nucleus_kept_mass(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> torch.Tensor:
    """Z_t = exp(log π_old(y_t) − log π_rollout(y_t)), clamped to [0, 1]."""
    return (old_log_probs.double() - rollout_log_probs.double()).exp().clamp(0.0, 1.0)


def mismatch_floor(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> torch.Tensor:
    """max(0, 1 − π_rollout(y)/π_old(y)) per token: nonzero only where π_old > π_rollout, which truncation
    cannot cause (engine noise), valued as the cut mass that noise would read with the opposite sign."""
    return (1.0 - (rollout_log_probs.double() - old_log_probs.double()).exp()).clamp(min=0.0)


def truncation_metrics(old_log_probs, rollout_log_probs, response_mask) -> dict[str, float]:
    """Over valid tokens: mean and max truncated mass 1 − Z, the noise floor, the mean net of it, and
    the fraction of tokens with 1 − Z > 1% (see the module docstring)."""
    mask = response_mask.bool()
    if not mask.any():
        return {}
    cut = 1.0 - nucleus_kept_mass(old_log_probs, rollout_log_probs)[mask]
    floor = mismatch_floor(old_log_probs, rollout_log_probs)[mask].mean()
    return {
        METRIC_PREFIX + "truncated_mass_mean": float(cut.mean()),
        METRIC_PREFIX + "truncated_mass_max": float(cut.max()),
        METRIC_PREFIX + "mismatch_floor": float(floor),
        METRIC_PREFIX + "truncated_mass_net_mean": float(cut.mean() - floor),
        METRIC_PREFIX + "frac_tokens_truncated_over_1pct": float((cut > 0.01).double().mean()),
    }
