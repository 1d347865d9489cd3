"""verl adapter for the advantage-weighting hook: a policy-loss config, a policy loss, a trainer.

Select it with hydra (the recipe config does this for you):

    actor_rollout_ref.actor.policy_loss._target_=verl_ext.policy_loss.ReweightPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=dapo_reweight
    +actor_rollout_ref.actor.policy_loss.weighting=lowprob   # lowprob | ppl | dominate | none
    +actor_rollout_ref.actor.policy_loss.alpha=0.2
    trainer.v1.trainer_mode=dapo_reweight

Where each scheme is applied (both places read π_old = verl's `old_log_probs`, fixed for the
whole step, so applying a detached positive weight to Â before or inside the clipped PPO loss
is the same objective):
- token-level schemes (`lowprob`, `dominate`) multiply Â inside the loss, per micro-batch;
- `ppl` needs whole prompt groups (verl's `uid`), which a micro-batch does not hold, so the
  trainer applies it to the advantages on the driver, right after GRPO's group normalisation.
The trainer also logs exact global weight statistics for every scheme under `actor/reweight/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, register_policy_loss
from verl.workers.config import PolicyLossConfig

from verl_ext.weighting import TOKEN_LEVEL_SCHEMES, WeightingSpec, mean_valid_weight, token_weights, weight_metrics

LOSS_MODE = "dapo_reweight"
TRAINER_MODE = "dapo_reweight"
METRIC_PREFIX = "actor/reweight/"


@dataclass
class ReweightPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus the weighting block.

    Args:
        weighting: `lowprob` (the paper's Eq. 8), `ppl`, `dominate` or `none`.
        alpha: strength α; None takes the paper's value for the scheme (0.2, 0.01, 0.1, 0).
        ppl_clamp: [low, high] clamp of the PPL weight (Deng et al.: [0.8, 1.2]).
        ppl_iqr_filter: drop 1.5·IQR outliers before the PPL group statistics.
    """

    loss_mode: str = LOSS_MODE
    weighting: str = "lowprob"
    alpha: float | None = None
    ppl_clamp: list[float] = field(default_factory=lambda: [0.8, 1.2])
    ppl_iqr_filter: bool = False

    def __post_init__(self):
        # Runs when verl's validate_config builds the actor config on the driver: bad input
        # fails here, before Ray starts.
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        clamp = list(self.ppl_clamp)
        if len(clamp) != 2:
            raise ValueError(f"ppl_clamp must be [low, high], got {clamp}")
        # alpha null is filled by the recipe from default_alpha (then checked); 0 is valid for every scheme
        alpha = 0.0 if self.alpha is None else self.alpha
        WeightingSpec.create(self.weighting, alpha, tuple(clamp), self.ppl_iqr_filter)

    def spec(self) -> WeightingSpec:
        return WeightingSpec.create(self.weighting, self.alpha, tuple(self.ppl_clamp), self.ppl_iqr_filter)


def weighting_spec_from(policy_loss_config: Any) -> WeightingSpec:
    """The WeightingSpec of an actor's `policy_loss` config (dataclass or DictConfig)."""
    get = policy_loss_config.get
    if get("weighting", None) is None:
        raise ValueError(
            f"loss_mode={LOSS_MODE} needs actor_rollout_ref.actor.policy_loss._target_="
            f"{ReweightPolicyLossConfig.__module__}.{ReweightPolicyLossConfig.__qualname__} (no `weighting` key found)"
        )
    return WeightingSpec.create(
        get("weighting"), get("alpha", None), tuple(get("ppl_clamp", (0.8, 1.2))), get("ppl_iqr_filter", False)
    )


@register_policy_loss(LOSS_MODE)
def compute_policy_loss_dapo_reweight(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's clipped (dual-clip) PPO loss on reweighted advantages Ã = w·Â.

    w comes from `verl_ext.weighting` for token-level schemes; for `ppl` the trainer has
    already reweighted the advantages and w = 1 here.
    """
    spec = weighting_spec_from(config.policy_loss)
    if spec.scheme in TOKEN_LEVEL_SCHEMES and spec.scheme != "none":
        weights, _ = token_weights(spec, old_log_prob, response_mask)
        advantages = advantages * weights
    else:
        weights = None
    pg_loss, metrics = compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    if weights is not None:
        # Per micro-batch mean of the weight the loss applied (averaged over micro-batches by verl).
        metrics[METRIC_PREFIX + "loss_weight_mean"] = mean_valid_weight(weights, response_mask)
    return pg_loss, metrics


def reweight_metrics(spec: WeightingSpec, old_log_probs, response_mask, group_ids) -> dict[str, float]:
    """Global weight statistics of one training batch, keyed for wandb under actor/reweight/."""
    weights, extras = token_weights(spec, old_log_probs, response_mask, group_ids)
    stats = {**weight_metrics(weights, response_mask), **extras, "alpha": spec.alpha}
    return {METRIC_PREFIX + k: v for k, v in stats.items()}
