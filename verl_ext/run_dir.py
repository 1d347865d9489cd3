"""A training run's directory: resume only what is the same experiment.

verl's `trainer.resume_mode=auto` resumes from whatever checkpoint is in `trainer.default_local_dir`,
so a rerun with another learning rate, data set, seed or rollout correction silently continued
from another configuration's weights. Here every run writes `run.json` next to its checkpoints:
the settings that decide its trajectory (`TRAJECTORY_KEYS`), its wandb run id and one line per
launch. Before Ray starts, a launch compares its own settings with the recorded ones:

| checkpoints in the folder | recorded settings | `run.on_mismatch` | what happens |
| --- | --- | --- | --- |
| none | any | any | train from step 0 (run.json rewritten) |
| yes | same | any | resume from the latest checkpoint; "nothing to train" if it is at total_training_steps |
| yes | different, or no run.json | `refuse` (default) | exit 2, naming every differing key `old -> new` |
| yes | different, or no run.json | `resume` | resume anyway; run.json records the new settings |
| yes | different, or no run.json | `fresh` | the old folder is moved aside (`<dir>.replaced-<time>`), train from step 0 |

`trainer.resume_mode=disable` also starts from step 0 with the old folder moved aside (verl
would otherwise write new checkpoints between the old ones); `resume_mode=resume_path` is the
user's explicit choice and is not checked. Steps, epochs, checkpoint / validation frequency, loggers
and other settings that do not change what the model sees are not recorded, so a finished run
continues with a higher `trainer.total_training_steps`. (A learning-rate schedule that depends on
the total steps, e.g. warmup as a ratio or cosine decay, is then stretched: verl's own behaviour.)
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verl_ext.core.atomic_io import atomic_write_bytes
from verl_ext.core.checks import ConfigError, check_choice

RUN_FILE = "run.json"
FORMAT = 1
ON_MISMATCH = ("refuse", "resume", "fresh")

# What decides the trajectory: the data and its order, the model, the optimiser and loss, sampling,
# the advantage estimator and filters, the reward. Dotted paths; a subtree is recorded leaf by leaf.
TRAJECTORY_KEYS = (
    "data.train_files",
    "data.val_files",
    "data.prompt_key",
    "data.train_batch_size",
    "data.gen_batch_size",
    "data.max_prompt_length",
    "data.max_response_length",
    "data.filter_overlong_prompts",
    "data.truncation",
    "data.shuffle",
    "data.seed",
    "data.apply_chat_template_kwargs",
    "actor_rollout_ref.model.path",
    "actor_rollout_ref.model.tokenizer_path",
    "actor_rollout_ref.model.override_config",
    "actor_rollout_ref.actor.optim",
    "actor_rollout_ref.actor.policy_loss",
    "actor_rollout_ref.actor.clip_ratio",
    "actor_rollout_ref.actor.clip_ratio_low",
    "actor_rollout_ref.actor.clip_ratio_high",
    "actor_rollout_ref.actor.clip_ratio_c",
    "actor_rollout_ref.actor.loss_agg_mode",
    "actor_rollout_ref.actor.ppo_mini_batch_size",
    "actor_rollout_ref.actor.ppo_epochs",
    "actor_rollout_ref.actor.shuffle",
    "actor_rollout_ref.actor.grad_clip",
    "actor_rollout_ref.actor.entropy_coeff",
    "actor_rollout_ref.actor.use_kl_loss",
    "actor_rollout_ref.actor.kl_loss_coef",
    "actor_rollout_ref.actor.kl_loss_type",
    "actor_rollout_ref.rollout.name",
    "actor_rollout_ref.rollout.n",
    "actor_rollout_ref.rollout.temperature",
    "actor_rollout_ref.rollout.top_p",
    "actor_rollout_ref.rollout.top_k",
    "actor_rollout_ref.rollout.dtype",
    "actor_rollout_ref.rollout.calculate_log_probs",
    "actor_rollout_ref.rollout.full_determinism",
    "actor_rollout_ref.rollout.val_kwargs",
    "algorithm",
    "reward.reward_manager",
    "reward.custom_reward_function",
    "reward.reward_kwargs",
    "trainer.use_v1",
    "trainer.v1.trainer_mode",
)


def _plain(value: Any) -> Any:
    """A JSON-comparable copy (OmegaConf containers to dicts / lists; NaN kept as the string 'nan')."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _get(config: Mapping, dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) and not hasattr(node, "get") or part not in node:
            return False, None
        node = node[part]
    return True, node


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{dotted key: leaf} of a nested mapping (lists are leaves)."""
    if isinstance(value, Mapping) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def trajectory_config(config: Mapping, root: str | os.PathLike | None = None, keys=TRAJECTORY_KEYS) -> dict[str, Any]:
    """The settings of `config` that decide the run's trajectory, flat: {dotted key: value}.

    Strings that are paths under `root` (the repository) are recorded relative to it, so the same
    experiment launched from another checkout of the project is still the same experiment.
    """
    prefix = str(Path(root).resolve()) + os.sep if root else None
    out: dict[str, Any] = {}
    for key in keys:
        found, value = _get(config, key)
        if found:
            out.update(flatten(_plain(value), key))
    if prefix:
        out = {k: _relative(v, prefix) for k, v in out.items()}
    return out


def _relative(value: Any, prefix: str) -> Any:
    if isinstance(value, str) and value.startswith(prefix):
        return value[len(prefix):]
    if isinstance(value, list):
        return [_relative(v, prefix) for v in value]
    return value


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key: old -> new` for every key whose value differs (absent on one side: `<unset>`), sorted."""
    unset = "<unset>"
    return [
        f"{key}: {json.dumps(old.get(key, unset))} -> {json.dumps(new.get(key, unset))}"
        for key in sorted(set(old) | set(new))
        if old.get(key, unset) != new.get(key, unset)
    ]


@dataclass(frozen=True)
class Decision:
    """What a launch does with its run directory.

    action: "start" (no checkpoint: train from step 0), "resume", "fresh" (move the old folder
    aside, train from step 0), "nothing_to_train", "refuse" or "explicit" (resume_mode=resume_path).
    """

    action: str
    message: str
    changed: tuple[str, ...] = field(default=())


def decide(
    recorded: Mapping | None,
    current: Mapping[str, Any],
    latest_step: int | None,
    total_steps: int | None,
    *,
    on_mismatch: str = "refuse",
    resume_mode: str = "auto",
    run_dir: str = "",
) -> Decision:
    """The resume decision (see the module docstring's table); pure.

    `recorded`: the folder's run.json (None if absent); `current`: this launch's `trajectory_config`;
    `latest_step`: the latest checkpointed step (None if none); `total_steps`: trainer.total_training_steps.
    """
    check_choice(on_mismatch, "run.on_mismatch", ON_MISMATCH)
    if resume_mode == "resume_path":
        return Decision("explicit", "trainer.resume_mode=resume_path: resuming from trainer.resume_from_path as asked")
    if latest_step is None:
        return Decision("start", f"no checkpoint in {run_dir}: training from step 0")
    if resume_mode == "disable":
        return Decision(
            "fresh", f"trainer.resume_mode=disable: training from step 0; the checkpoints up to step {latest_step} are moved aside"
        )
    if recorded is None:
        changed = (f"{run_dir} has checkpoints (up to step {latest_step}) but no {RUN_FILE}: which configuration made them is unknown",)
    else:
        changed = tuple(differences(recorded.get("trajectory", {}), current))
    if changed:
        if on_mismatch == "resume":
            return Decision("resume", f"resuming from step {latest_step} although the settings differ (run.on_mismatch=resume)", changed)
        if on_mismatch == "fresh":
            return Decision("fresh", "settings differ: training from step 0 (run.on_mismatch=fresh); the old checkpoints are moved aside", changed)
        lines = "\n".join(f"    {c}" for c in changed)
        return Decision(
            "refuse",
            f"{run_dir} holds checkpoints (up to step {latest_step}) of a different configuration:\n{lines}\n"
            "  Give this run its own trainer.default_local_dir (or trainer.experiment_name), or pass "
            "run.on_mismatch=fresh (move the old checkpoints aside, start over) or run.on_mismatch=resume "
            "(continue from those weights anyway).",
            changed,
        )
    if total_steps is not None and latest_step >= total_steps:
        return Decision(
            "nothing_to_train",
            f"nothing to train: {run_dir} already holds step {latest_step} of trainer.total_training_steps={total_steps}. "
            f"To continue, raise trainer.total_training_steps above {latest_step}; to start over, pass "
            "trainer.resume_mode=disable (the old checkpoints are moved aside).",
        )
    return Decision("resume", f"resuming from step {latest_step} (same settings as recorded in {RUN_FILE})")


def latest_checkpoint_step(run_dir: str | os.PathLike) -> int | None:
    """The step in verl's `latest_checkpointed_iteration.txt`, if that step's folder exists."""
    tracker = Path(run_dir) / "latest_checkpointed_iteration.txt"
    try:
        step = int(tracker.read_text().strip())
    except (OSError, ValueError):
        return None
    return step if (Path(run_dir) / f"global_step_{step}").is_dir() else None


def read_record(run_dir: str | os.PathLike) -> dict | None:
    """The folder's run.json, None if absent; ConfigError if it cannot be read."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); move it away to start over") from None
    return record if isinstance(record, dict) else None


def new_wandb_id() -> str:
    """A wandb-style run id (8 characters of [0-9a-z])."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def set_aside(run_dir: str | os.PathLike, now: float | None = None) -> Path:
    """Rename the folder to `<dir>.replaced-<UTC time>`; returns the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    target = Path(f"{run_dir}.replaced-{stamp}")
    Path(run_dir).rename(target)
    return target


def write_record(run_dir: str | os.PathLike, record: Mapping) -> Path:
    """run.json, written atomically."""
    return atomic_write_bytes(Path(run_dir) / RUN_FILE, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def updated_record(
    recorded: Mapping | None, decision: Decision, current: Mapping[str, Any], *, experiment: str, launch: Mapping
) -> dict:
    """run.json after this launch: the current settings, the wandb id kept unless training starts
    over, and the launch appended to the history."""
    keep = recorded is not None and decision.action in ("resume", "explicit", "nothing_to_train")
    base = dict(recorded) if keep else {}
    launches = list(base.get("launches", [])) + [dict(launch)]
    return {
        "format": FORMAT,
        "experiment_name": experiment,
        "trajectory": dict(current),
        "wandb_run_id": base.get("wandb_run_id") or new_wandb_id(),
        "launches": launches,
    }


def plan_launch(config, root: str | os.PathLike | None = None) -> tuple[dict | None, dict[str, Any], Decision]:
    """(recorded run.json, this launch's trajectory settings, decision) for a composed training config
    whose `trainer.default_local_dir` is absolute. Reads the folder, changes nothing."""
    run_dir = str(config.trainer.default_local_dir)
    recorded = read_record(run_dir)
    current = trajectory_config(config, root)
    run_cfg = config.get("run") or {}
    decision = decide(
        recorded, current, latest_checkpoint_step(run_dir), config.trainer.get("total_training_steps"),
        on_mismatch=run_cfg.get("on_mismatch", "refuse"), resume_mode=config.trainer.get("resume_mode", "auto"),
        run_dir=run_dir,
    )
    return recorded, current, decision


def start_launch(run_dir: str | os.PathLike, recorded: dict | None, current: Mapping, decision: Decision, *,
                 experiment: str, launch: Mapping) -> tuple[dict, Path | None]:
    """Carry out a decision that trains: move the old folder aside for "fresh", write run.json.
    Returns (the new record, where the old folder went or None)."""
    moved = set_aside(run_dir) if decision.action == "fresh" and Path(run_dir).exists() else None
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    record = updated_record(recorded, decision, current, experiment=experiment, launch=launch)
    write_record(run_dir, record)
    return record, moved
