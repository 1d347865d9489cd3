"""verl v1 trainer `dapo_reweight`: verl's synchronous PPO trainer plus the driver-side half of
the weighting hook (see `verl_ext.policy_loss`).

After verl's own advantage computation (GRPO group normalisation) it reads the step's
`old_log_probs`, `response_mask`, `uid` and `advantages`, logs exact global weight statistics
under `actor/reweight/`, and for the response-level `ppl` scheme writes Ã = w_i·Â back. When
the rollout returned log-probs it also logs the mass a top-p rollout cut (`rollout/top_p_*`).
Selected with `trainer.v1.trainer_mode=dapo_reweight`. `replay_buffer_poll_s` (recipe config)
sets how often the replay buffer checks for finished rollouts.
"""

from __future__ import annotations

import numpy as np
import transfer_queue as tq
from tensordict import TensorDict
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from verl_ext.policy_loss import TRAINER_MODE, reweight_metrics, weighting_spec_from
from verl_ext.rollout_metrics import truncation_metrics
from verl_ext.weighting import token_weights


@register_trainer(TRAINER_MODE)
class DapoReweightTrainer(PPOTrainerSync):
    """PPOTrainerSync with response-level advantage weighting and weight metrics."""

    def _build_replay_buffer(self):
        buffer = super()._build_replay_buffer()
        poll_s = self.config.get("replay_buffer_poll_s")
        if poll_s is not None:  # validated by recipe.dapo_reweight.main.prepare_config
            buffer.poll_interval = float(poll_s)
        return buffer

    def _compute_advantage(self, batch, metrics: dict):
        batch = super()._compute_advantage(batch, metrics=metrics)
        spec = weighting_spec_from(self.config.actor_rollout_ref.actor.policy_loss)
        fields = ["uid", "response_mask", "old_log_probs", "advantages"]
        if self.config.actor_rollout_ref.rollout.get("calculate_log_probs", False):
            fields.append("rollout_log_probs")
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        nested_mask = data["response_mask"]
        group_ids = np.array(data.pop("uid").tolist(), dtype=object)
        padded = data.to_padded_tensor()
        mask, old_log_probs = padded["response_mask"], padded["old_log_probs"]
        metrics.update(reweight_metrics(spec, old_log_probs, mask, group_ids))
        if "rollout_log_probs" in padded:
            metrics.update(truncation_metrics(old_log_probs, padded["rollout_log_probs"], mask))
        if spec.scheme == "ppl":
            weights, _ = token_weights(spec, old_log_probs, mask, group_ids)
            advantages = padded["advantages"] * weights.to(padded["advantages"].dtype)
            output = TensorDict({"advantages": response_to_nested(advantages, nested_mask)}, batch_size=len(batch))
            batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)
        return batch
