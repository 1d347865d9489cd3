"""How far a truncated (top-p / top-k) rollout is from the full-vocabulary π_old the trainer uses.

The rollout engine samples from the renormalised nucleus π_S(v) = π(v)/Z on the kept set S
(Z = Σ_{u∈S} π(u)) and reports log π_S(y) of the sampled token; verl recomputes π_old(y) = π(y)
over the full vocabulary. Hence, per sampled token, Z = exp(log π_old(y) − log π_rollout(y)):
the probability mass the nucleus kept, and 1 − Z the mass it cut. With top-p = 1 this is 0 up
to the numerical mismatch between the two engines.
"""

from __future__ import annotations

import torch

METRIC_PREFIX = "rollout/top_p_"


def nucleus_kept_mass(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> torch.Tensor:
    """Z_t = exp(log π_old(y_t) − log π_rollout(y_t)), clamped to [0, 1]."""
    return (old_log_probs.double() - rollout_log_probs.double()).exp().clamp(0.0, 1.0)


def truncation_metrics(old_log_probs, rollout_log_probs, response_mask) -> dict[str, float]:
    """Mean and max truncated mass 1 − Z over valid tokens, and the fraction with 1 − Z > 1%."""
    mask = response_mask.bool()
    if not mask.any():
        return {}
    cut = 1.0 - nucleus_kept_mass(old_log_probs, rollout_log_probs)[mask]
    return {
        METRIC_PREFIX + "truncated_mass_mean": float(cut.mean()),
        METRIC_PREFIX + "truncated_mass_max": float(cut.max()),
        METRIC_PREFIX + "frac_tokens_truncated_over_1pct": float((cut > 0.01).double().mean()),
    }
