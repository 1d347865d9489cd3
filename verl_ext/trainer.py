"""verl v1 trainer `dapo_reweight`: verl's synchronous PPO trainer plus the driver-side half of
the weighting hook (see `verl_ext.policy_loss`).

After verl's own advantage computation (GRPO group normalisation) it reads the step's
`old_log_probs`, `response_mask`, `uid` and `advantages`, logs exact global weight statistics
under `actor/reweight/`, and for the response-level `ppl` scheme writes Ã = w_i·Â back. When
the rollout returned log-probs it also logs the mass a top-p rollout cut (`rollout/top_p_*`).
Selected with `trainer.v1.trainer_mode=dapo_reweight`. Checkpoints are written right after the
step's metrics are logged (verl writes them before the step's validation), so a resumed run never
lacks the metrics of the step it resumes from. `replay_buffer_poll_s` (recipe config)
sets how often the replay buffer checks for finished rollouts.

verl decides between its synchronous and asynchronous semantics by `trainer_mode == "sync"`
(replay buffer class, gen_batch_size, TransferQueue checkpoints); under the registered name
`dapo_reweight` it would pick the asynchronous ones (off-policy groups up to 8 steps stale), so
this trainer reports "sync": DAPO's on-policy batches, over-generate, drain and discard.

With `actor_rollout_ref.rollout.full_determinism=true` the batches are also reproducible:
prompts get uids in dataloader order, the replay buffer (`OrderedReplayBuffer`) decides on
evictions and refills only once no generation is in flight, selects groups in uid order and
materialises rows in a canonical order. Together with the rollout's per-request random streams
(`verl_ext.cpu.rollout`) a rerun with the same seed trains on the same responses.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import response_to_nested

from verl_ext.policy_loss import TRAINER_MODE, reweight_metrics, weighting_spec_from
from verl_ext.rollout_metrics import truncation_metrics
from verl_ext.weighting import token_weights


def canonical_order(keys: list[str], prompts: list[list[int]], responses: list[list[int]]) -> list[int]:
    """Row order of a batch that does not depend on timing: by prompt tokens, prompt uid (keys are
    `{uid}_{session}_{index}`), response tokens, key. Prompts first: verl draws validation uids at
    random. Which session of a group drew which response depends on arrival order (the n samples of
    a prompt are identical requests), so the response, not the session, orders rows in a group."""
    return sorted(range(len(keys)), key=lambda i: (prompts[i], keys[i].split("_")[0], responses[i], keys[i]))


class OrderedReplayBuffer(ReplayBuffer):
    """verl's synchronous replay buffer with every decision independent of timing.

    verl's buffer evicts, refills and selects on whatever has finished at each poll, and picks among
    equal-step groups in set order; here each poll waits until nothing is pending or running, groups
    are taken in (global step, uid) order and rows in `canonical_order`. It costs the overlap of
    refills with generation still in flight, and one read of the batch's tokens.
    """

    def _sync_metadata_from_transfer_queue(self):
        while True:
            super()._sync_metadata_from_transfer_queue()
            if not any(self.pending_keys.values()) and not any(self.running_keys.values()):
                return
            time.sleep(self.poll_interval)

    def _select_prompt_uids(self, partition_id: str, sampleable_keys: set[str], batch_size: int):
        # verl sorts by global step with a stable sort: presorting by uid breaks its ties by uid
        return super()._select_prompt_uids(partition_id, sorted(sampleable_keys), batch_size)

    def _materialize_batch(self, partition_id: str, selected_prompt_uids: list[str], partition_snapshot: dict):
        meta = super()._materialize_batch(partition_id, selected_prompt_uids, partition_snapshot)
        if not meta.keys:
            return meta
        data = tq.kv_batch_get(keys=meta.keys, partition_id=partition_id, select_fields=["prompts", "responses"])
        prompts, responses = ([r.tolist() for r in data[name].unbind()] for name in ("prompts", "responses"))
        order = canonical_order(meta.keys, prompts, responses)
        return KVBatchMeta(
            keys=[meta.keys[i] for i in order], tags=[meta.tags[i] for i in order], partition_id=meta.partition_id,
            fields=meta.fields, extra_info=meta.extra_info,
        )


@register_trainer(TRAINER_MODE)
class DapoReweightTrainer(PPOTrainerSync):
    """PPOTrainerSync with response-level advantage weighting and weight metrics."""

    @property
    def trainer_mode(self) -> str:
        return "sync"  # verl's synchronous semantics under the registered name (see the module docstring)

    @trainer_mode.setter
    def trainer_mode(self, registered: str) -> None:
        self.registered_trainer_mode = registered

    @property
    def deterministic(self) -> bool:
        return bool(self.config.actor_rollout_ref.rollout.get("full_determinism", False))

    def _build_replay_buffer(self):
        buffer = super()._build_replay_buffer()
        if self.deterministic and type(buffer) is ReplayBuffer:  # not a user's custom sampler
            buffer.__class__ = OrderedReplayBuffer  # same state, ordered decisions
        poll_s = self.config.get("replay_buffer_poll_s")
        if poll_s is not None:  # validated by recipe.dapo_reweight.main.prepare_config
            buffer.poll_interval = float(poll_s)
        return buffer

    def _save_checkpoint(self):
        """Deferred until the step's metrics are logged (`on_train_begin`).

        verl saves inside the step, before the step's validation runs and its metrics are logged: a
        run stopped in between resumes after a step whose metrics exist nowhere (console, log, wandb).
        Saving right after the log call makes every checkpointed step one whose metrics were logged."""
        self._checkpoint_due = True

    def on_train_begin(self):
        super().on_train_begin()
        self.logger.log = self._log_then_save(self.logger.log)

    def _log_then_save(self, log):
        def log_then_save(data, step, *args, **kwargs):
            log(data, step, *args, **kwargs)
            if getattr(self, "_checkpoint_due", False):
                self._checkpoint_due = False
                PPOTrainerSync._save_checkpoint(self)

        return log_then_save

    def _fetch_one_gen_batch(self):
        batch = super()._fetch_one_gen_batch()
        if self.deterministic:  # uids in dataloader order instead of uuid4: the buffer's order is reproducible
            if not hasattr(self, "_uid_counter"):
                self._uid_counter = itertools.count()
            tu.assign_non_tensor_stack(batch, "uid", [f"{next(self._uid_counter):012d}" for _ in batch["uid"]])
        return batch

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
