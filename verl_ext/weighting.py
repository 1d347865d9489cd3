"""Advantage-weighting schemes compared in the paper, as pure functions on tensors.

All schemes turn the group-normalised advantage Â into Ã = w·Â with a weight w computed from
π_old, the policy that produced the rollout (verl's `old_log_probs`), detached from the graph:

- `lowprob`  (the paper's Eq. 8): w_{i,t} = 1 + α·(1 − π_old(o_{i,t}))        w ∈ [1, 1+α]
- `dominate` (Yang et al. 2025):  w_{i,t} = α·π_old(o_{i,t}) + (1 − α)          w ∈ [1−α, 1]
- `ppl`      (Deng et al. 2025):  w_i = clamp(1 − α·z_i, lo, hi), z_i the z-score of the
  response's log-perplexity within its prompt group (response-level)
- `none`:                          w = 1

Shapes: `old_log_probs` and `response_mask` are [batch, response_len]; positions where the
mask is 0 (padding) always get weight 1 and never produce NaN or inf, whatever their log-prob.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WEIGHTING_SCHEMES = ("lowprob", "ppl", "dominate", "none")
TOKEN_LEVEL_SCHEMES = ("lowprob", "dominate", "none")
# α has one home: `default_alpha` in configs/dapo_reweight.yaml (the paper's values, documented
# there; presets override it), which the recipe copies into policy_loss.alpha when that is null.
HIGH_WEIGHT_THRESHOLD = 1.05


@dataclass(frozen=True)
class WeightingSpec:
    """A validated weighting choice. Build it with `WeightingSpec.create` to get the checks."""

    scheme: str
    alpha: float
    ppl_clamp: tuple[float, float] = (0.8, 1.2)
    ppl_iqr_filter: bool = False

    @classmethod
    def create(
        cls,
        scheme: str,
        alpha: float | None,
        ppl_clamp: tuple[float, float] = (0.8, 1.2),
        ppl_iqr_filter: bool = False,
    ) -> WeightingSpec:
        """Validate and fill defaults; raises ValueError naming the bad value and the valid choices."""
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown weighting scheme {scheme!r}; valid choices: {', '.join(WEIGHTING_SCHEMES)}")
        if alpha is None:
            raise ValueError(
                f"weighting {scheme!r}: alpha is not set (actor_rollout_ref.actor.policy_loss.alpha=null takes "
                "default_alpha[weighting] of configs/dapo_reweight.yaml; give a number when calling this directly)"
            )
        alpha = float(alpha)
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"weighting alpha must be a finite number >= 0, got {alpha!r} (scheme {scheme!r})")
        if scheme == "dominate" and alpha >= 1:
            raise ValueError(f"dominate needs 0 <= alpha < 1 (weight alpha*p + 1 - alpha must stay > 0), got {alpha}")
        if not isinstance(ppl_iqr_filter, bool):  # bool("no") would be True
            raise ValueError(f"ppl_iqr_filter must be true or false, got {ppl_iqr_filter!r}")  # noqa: TRY004 (a config error, as above)
        low, high = (float(v) for v in ppl_clamp)
        if not low <= high:
            raise ValueError(f"ppl clamp needs low <= high, got low={low}, high={high}")
        if low <= 0:
            raise ValueError(f"ppl clamp low must be > 0 so no advantage flips sign or vanishes, got {low}")
        return cls(scheme=scheme, alpha=alpha, ppl_clamp=(low, high), ppl_iqr_filter=ppl_iqr_filter)


def _affine_in_prob(old_log_probs: torch.Tensor, response_mask: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """w = a·π_old + b on valid positions, 1 on padding (detached).

    Written as few passes over memory as possible (exp, fused multiply-add, select): it runs
    in the loss on every micro-batch. Log-probs are ≤ 0, so π_old ∈ [0, 1]; −inf gives 0 and
    NaN at padding is replaced by the select.
    """
    w = old_log_probs.detach().exp().mul_(a).add_(b)
    return torch.where(response_mask.bool(), w, 1.0)


def lowprob_token_weights(old_log_probs: torch.Tensor, response_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 8: w_{i,t} = 1 + α(1 − π_old(o_{i,t})) = (1 + α) − α·π_old(o_{i,t}); 1 on padding."""
    return _affine_in_prob(old_log_probs, response_mask, -alpha, 1.0 + alpha)


def dominate_token_weights(old_log_probs: torch.Tensor, response_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """Yang et al. 2025: w_{i,t} = α·π_old(o_{i,t}) + (1 − α); 1 on padding."""
    return _affine_in_prob(old_log_probs, response_mask, alpha, 1.0 - alpha)


def log_perplexity(old_log_probs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """logPPL_i = −(1/|o_i|) Σ_t log π_old(o_{i,t}) over the response's valid tokens; 0 if it has none."""
    mask = response_mask.bool()
    logp = torch.where(mask, old_log_probs.detach().double(), torch.zeros((), dtype=torch.float64))
    n_tokens = mask.sum(dim=-1)
    return -logp.sum(dim=-1) / n_tokens.clamp(min=1)


def group_codes(group_ids) -> np.ndarray:
    """Map arbitrary group ids (verl's `uid` strings, ints, ...) to integer codes 0..G-1."""
    return np.unique(np.asarray(group_ids, dtype=object).astype(str), return_inverse=True)[1].reshape(-1)


def iqr_inliers(values: np.ndarray, k: float = 1.5) -> np.ndarray:
    """Tukey's rule: keep values in [Q1 − k·IQR, Q3 + k·IQR] (linear-interpolated quartiles)."""
    q1, q3 = np.quantile(values, [0.25, 0.75])
    return (values >= q1 - k * (q3 - q1)) & (values <= q3 + k * (q3 - q1))


def group_zscores(
    values: torch.Tensor, group_ids, valid: torch.Tensor | None = None, iqr_filter: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """z_i = (x_i − μ_g) / σ_g within each group g (population std).

    μ_g and σ_g are computed over the group's valid members (with `iqr_filter`, over those
    that also pass Tukey's 1.5·IQR rule); a group whose σ_g < eps gets z = 0, and invalid
    members get z = 0.
    """
    x = values.detach().double().cpu().numpy()
    ok = np.ones_like(x, dtype=bool) if valid is None else valid.detach().cpu().numpy().astype(bool)
    z = np.zeros_like(x)
    codes = group_codes(group_ids)
    if codes.shape[0] != x.shape[0]:
        raise ValueError(f"got {codes.shape[0]} group ids for {x.shape[0]} responses")
    for g in np.unique(codes):
        members = np.flatnonzero((codes == g) & ok)
        if members.size == 0:
            continue
        stats_members = members[iqr_inliers(x[members])] if iqr_filter else members
        mu, sigma = x[stats_members].mean(), x[stats_members].std()
        if sigma >= eps:
            z[members] = (x[members] - mu) / sigma
    return torch.from_numpy(z).to(values.device)


def ppl_response_weights(
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids,
    alpha: float,
    clamp: tuple[float, float] = (0.8, 1.2),
    iqr_filter: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deng et al. 2025: w_i = clamp(1 − α·z_i, lo, hi), z_i the group z-score of logPPL_i.

    Returns (w [batch] float32, z [batch] float64). Responses without tokens get w = 1, z = 0.
    """
    has_tokens = response_mask.bool().any(dim=-1)
    z = group_zscores(log_perplexity(old_log_probs, response_mask), group_ids, valid=has_tokens, iqr_filter=iqr_filter)
    w = (1.0 - alpha * z).clamp(clamp[0], clamp[1]).float()
    return torch.where(has_tokens, w, torch.ones_like(w)), z


def token_weights(
    spec: WeightingSpec, old_log_probs: torch.Tensor, response_mask: torch.Tensor, group_ids=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token weights w [batch, response_len] for any scheme, plus scheme-specific extras.

    `ppl` needs `group_ids` (one prompt-group id per response) and broadcasts its response
    weight over the response's tokens; the extras then hold `ppl_abs_z_mean`.
    """
    extras: dict[str, float] = {}
    if spec.scheme == "lowprob":
        w = lowprob_token_weights(old_log_probs, response_mask, spec.alpha)
    elif spec.scheme == "dominate":
        w = dominate_token_weights(old_log_probs, response_mask, spec.alpha)
    elif spec.scheme == "ppl":
        if group_ids is None:
            raise ValueError("the ppl scheme needs the prompt-group id (verl's `uid`) of every response")
        w_resp, z = ppl_response_weights(
            old_log_probs, response_mask, group_ids, spec.alpha, spec.ppl_clamp, spec.ppl_iqr_filter
        )
        has_tokens = response_mask.bool().any(dim=-1)
        extras["ppl_abs_z_mean"] = float(z[has_tokens.to(z.device)].abs().mean()) if has_tokens.any() else 0.0
        w = torch.where(response_mask.bool(), w_resp[:, None].to(old_log_probs.device), 1.0)
    else:
        w = torch.ones_like(old_log_probs, dtype=torch.float32)
    return w.float(), extras


def mean_valid_weight(weights: torch.Tensor, response_mask: torch.Tensor) -> float:
    """Mean of w over valid tokens, for weights that are 1 on padding: (Σw − #pad) / #valid."""
    n_valid = int(response_mask.sum())
    return float((weights.sum() - (weights.numel() - n_valid)) / max(n_valid, 1))


def weight_metrics(weights: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """Mean, min, max of w over valid tokens and the fraction of tokens with w > 1.05."""
    w = weights.detach()[response_mask.bool()].double()
    if w.numel() == 0:
        return {}
    return {
        "weight_mean": float(w.mean()),
        "weight_min": float(w.min()),
        "weight_max": float(w.max()),
        "frac_weight_above_1.05": float((w > HIGH_WEIGHT_THRESHOLD).double().mean()),
    }
