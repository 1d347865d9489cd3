"""vLLM general plugins: what this project changes inside vLLM's own processes.

Registered in setup.py under the entry point group `vllm.general_plugins`; vLLM calls each one in
every process it starts (engine core, workers), possibly more than once. Each is a no-op where it
does not apply and idempotent. `VLLM_PLUGINS=<names>` (vLLM's allow-list) selects among them.

- `keep_cpu_weights_reloadable` (vLLM's CPU build only): see `verl_ext.vllm_cpu`, item 3.
- `report_weight_sync_failures` (vLLM started by verl's rollout): verl's weight push sends the
  trainer's weights bucket by bucket and waits for an acknowledgement after each; when loading a
  bucket raises inside vLLM, verl's receiver stops acknowledging and the trainer waits forever.
  The guard keeps the exchange going (remaining buckets are acknowledged, not loaded) and raises
  the first error once the push is over, which verl's own RPC then carries back to the trainer.
"""

from __future__ import annotations

import functools
import os
import traceback

# vLLM processes started by verl's rollout server inherit this variable (verl sets it there).
VERL_ROLLOUT_ENV = "VERL_REPLICA_RANK"


def keep_cpu_weights_reloadable() -> None:
    """On vLLM's CPU build, keep each linear layer's weight Parameter when its GEMM is repacked."""
    from verl_ext.vllm_cpu import is_cpu_build

    if not is_cpu_build():
        return
    from vllm.model_executor.layers import utils

    dispatch = utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "_keeps_weight", False):
        return

    @functools.wraps(dispatch)
    def dispatch_keeping_weight(layer, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    dispatch_keeping_weight._keeps_weight = True
    # vLLM's linear methods import the function from this module at call time: this is what they call.
    utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


def report_weight_sync_failures() -> None:
    """In vLLM under verl's rollout, a bucket that fails to load ends the weight push with its error."""
    if VERL_ROLLOUT_ENV not in os.environ:
        return
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver

    receive = BucketedWeightReceiver.receive_weights
    if getattr(receive, "_reports_failures", False):
        return

    @functools.wraps(receive)
    def receive_weights(self, on_bucket_received):
        failures: list[str] = []

        def load_unless_failed(weights, is_last):
            if failures:
                return
            try:
                on_bucket_received(weights, is_last)
            except Exception as err:  # noqa: BLE001 - re-raised below, once the sender has every acknowledgement
                failures.append(traceback.format_exc())
                # the frames hold views of verl's shared bucket buffer, which must be closable
                traceback.clear_frames(err.__traceback__)

        receive(self, load_unless_failed)
        if failures:
            raise RuntimeError(f"vLLM could not load the weights pushed by the trainer:\n{failures[0]}")

    receive_weights._reports_failures = True
    BucketedWeightReceiver.receive_weights = receive_weights
