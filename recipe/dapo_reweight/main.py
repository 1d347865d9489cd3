"""Hydra entry point of the DAPO-reweight recipe: verl's PPO trainer with our weighting hook.

    python -m recipe.dapo_reweight.main +preset=qwen2.5-math-7b \
        actor_rollout_ref.actor.policy_loss.weighting=lowprob actor_rollout_ref.actor.policy_loss.alpha=0.2

The config (config/dapo_reweight.yaml) composes verl's own `ppo_trainer` config with the DAPO
settings; presets live in the repository's `configs/preset/`. `dry_run=true` composes and
validates everything, prints the config and exits without starting Ray.

Everything here runs on the driver before Ray starts, so bad input fails fast with a message
naming the bad value or file.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

REPO = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO / "configs" / "preset"
_REMOTE_PREFIXES = ("hdfs://", "s3://", "gs://", "http://", "https://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def default_reward_path() -> str:
    """The file verl loads our `compute_score` from (verl's custom_reward_function takes a path)."""
    import verl_ext

    return str(Path(verl_ext.__file__).resolve().parent / "reward.py")


def check_model_path(path: str, key: str) -> None:
    """A local model directory must exist; a hub id (`org/name`) is left to transformers."""
    if path is None:
        raise ValueError(f"{key} is not set: give a local model directory or a hub id such as Qwen/Qwen2.5-Math-7B")
    if os.path.isdir(path) or path.startswith(_REMOTE_PREFIXES):
        return
    if os.path.isabs(path) or path.startswith(".") or not _HUB_ID.match(path):
        raise FileNotFoundError(f"{key}={path!r}: no such model directory")


def check_data_files(files, key: str) -> None:
    """Every local parquet file must exist, and every row must carry a ground truth."""
    import pyarrow.parquet as pq

    for f in [files] if isinstance(files, str) else list(files):
        if f.startswith(_REMOTE_PREFIXES):
            continue
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{key}: data file {f!r} does not exist")
        table = pq.read_table(f, columns=["reward_model"])
        for i, row in enumerate(table.column("reward_model").to_pylist()):
            if not row or row.get("ground_truth") in (None, ""):
                raise ValueError(f"{key}: {f} row {i} has no reward_model.ground_truth")


def prepare_config(config: DictConfig) -> DictConfig:
    """Fill derived values and validate the composed config (raises before Ray starts)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_ext.policy_loss import LOSS_MODE, TRAINER_MODE, weighting_spec_from
    from verl_ext.weighting import WEIGHTING_SCHEMES

    with open_dict(config):
        if config.reward.custom_reward_function.get("path") is None:
            config.reward.custom_reward_function.path = default_reward_path()
    policy_loss = config.actor_rollout_ref.actor.policy_loss
    if policy_loss.loss_mode == LOSS_MODE:
        scheme = policy_loss.get("weighting")
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown weighting scheme {scheme!r}; valid choices: {', '.join(WEIGHTING_SCHEMES)}")
        if policy_loss.get("alpha") is None:
            with open_dict(config):
                policy_loss.alpha = config.default_alpha[scheme]
        spec = weighting_spec_from(policy_loss)
        trainer_mode = config.trainer.v1.trainer_mode if config.trainer.use_v1 else None
        if spec.scheme == "ppl" and trainer_mode != TRAINER_MODE:
            raise ValueError(
                f"weighting=ppl needs the group-aware trainer: set trainer.use_v1=true and "
                f"trainer.v1.trainer_mode={TRAINER_MODE} (got use_v1={config.trainer.use_v1}, mode={trainer_mode})"
            )
    poll_s = config.get("replay_buffer_poll_s")
    if poll_s is not None and (isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or poll_s <= 0):
        raise ValueError(
            f"replay_buffer_poll_s={poll_s!r} is invalid; valid: a number of seconds > 0, or null (verl's 2 s)"
        )
    from verl_ext.vllm_cpu import rollout_problems

    problems = rollout_problems(config.actor_rollout_ref.rollout, config.actor_rollout_ref.model.path)
    if problems:
        raise ValueError("; ".join(problems))
    # verl's own validation, which also builds the actor dataclasses (our weighting checks).
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    return config


def check_inputs(config: DictConfig) -> None:
    check_model_path(config.actor_rollout_ref.model.path, "actor_rollout_ref.model.path")
    check_data_files(config.data.train_files, "data.train_files")
    check_data_files(config.data.val_files, "data.val_files")


def run(config: DictConfig) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    try:
        prepare_config(config)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"[dapo_reweight] config error: {err}") from None
    if config.get("dry_run", False):
        try:
            check_inputs(config)
        except (FileNotFoundError, ValueError) as err:
            print(f"[dapo_reweight] warning: a real run would stop here: {err}")
        print(OmegaConf.to_yaml(config, resolve=True))
        print("[dapo_reweight] dry run: config composed and validated; Ray not started.")
        return
    try:
        check_inputs(config)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"[dapo_reweight] input error: {err}") from None
    if config.trainer.use_v1:
        run_ppo(config, task_runner_class=TaskRunnerV1)
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner

        run_ppo(config, task_runner_class=TaskRunner)
    print(run_summary(config))


def run_summary(config: DictConfig) -> str:
    """What was trained and where its checkpoints are, printed when training finishes."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    policy_loss = config.actor_rollout_ref.actor.policy_loss
    ckpt_dir = os.path.abspath(config.trainer.default_local_dir)
    latest = find_latest_ckpt_path(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    lines = [
        (
            f"[dapo_reweight] finished {config.trainer.experiment_name}: preset {config.get('preset_name')}, "
            f"weighting {policy_loss.get('weighting', policy_loss.loss_mode)} (alpha {policy_loss.get('alpha')}), "
            f"model {config.actor_rollout_ref.model.path}"
        ),
        f"  checkpoints: {ckpt_dir} (latest: {latest or 'none saved'})",
        f"  loggers: {', '.join(config.trainer.logger)} (project {config.trainer.project_name})",
    ]
    return "\n".join(lines)


@hydra.main(config_path="config", config_name="dapo_reweight", version_base=None)
def main(config: DictConfig) -> None:
    run(config)


def _add_preset_searchpath(argv: list[str]) -> list[str]:
    """Let `+preset=NAME` find configs/preset/NAME.yaml without the user naming the folder."""
    if any(a.startswith("hydra.searchpath") for a in argv):
        return argv
    return argv + [f"hydra.searchpath=[pkg://verl.trainer.config,file://{REPO / 'configs'}]"]


if __name__ == "__main__":
    sys.argv = _add_preset_searchpath(sys.argv)
    main()
