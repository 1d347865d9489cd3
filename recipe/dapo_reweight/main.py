"""Hydra entry point of the DAPO-reweight recipe: verl's PPO trainer with our weighting hook.

    python -m recipe.dapo_reweight.main +preset=qwen2.5-math-7b \
        actor_rollout_ref.actor.policy_loss.weighting=lowprob actor_rollout_ref.actor.policy_loss.alpha=0.2

The config (`configs/dapo_reweight.yaml`, found like every command's: `verl_ext.core.paths.config_dir()`)
composes verl's own `ppo_trainer` config with the DAPO settings; presets live next to it in
`configs/preset/`. `dry_run=true` composes and
validates everything, prints the config and exits without starting Ray.

Everything here runs on the driver before Ray starts, so bad input fails fast with a message
naming the bad value or file.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from verl_ext import run_log
from verl_ext.core.checks import REMOTE_PREFIXES, ConfigError, exit_on_config_error
from verl_ext.core.paths import available_presets, config_dir, output_root, source_root
from verl_ext.run_dir import Decision, plan_launch, start_launch

PROG = "dapo_reweight"
# harmless warnings verl repeats on every import (optional engines absent; GRPO has no critic)
HARMLESS_WARNINGS = (r".* engine is not available", r"Disabled critic as algorithm.adv_estimator")
# refused before Ray starts: ours, and the ValueErrors of verl's own config validation
CONFIG_ERRORS = (ConfigError, ValueError, FileNotFoundError)
__all__ = ["available_presets", "main", "prepare_config", "run"]


def _register_resolvers() -> None:
    """`${repo_dir:}`: this repository's root, so default run folders do not depend on the cwd (an
    installed copy: the working directory, `verl_ext.core.paths.output_root`)."""
    if not OmegaConf.has_resolver("repo_dir"):
        OmegaConf.register_new_resolver("repo_dir", lambda: str(output_root()))


_register_resolvers()


def default_reward_path() -> str:
    """The file verl loads our `compute_score` from (verl's custom_reward_function takes a path)."""
    import verl_ext

    return str(Path(verl_ext.__file__).resolve().parent / "reward.py")


def fill_default_alpha(config: DictConfig) -> None:
    """policy_loss.alpha=null takes `default_alpha[weighting]` (the one home of α's defaults)."""
    policy_loss = config.actor_rollout_ref.actor.policy_loss
    if policy_loss.get("alpha") is None and policy_loss.get("weighting") in config.get("default_alpha", {}):
        with open_dict(config):
            policy_loss.alpha = config.default_alpha[policy_loss.weighting]


def prepare_config(config: DictConfig) -> DictConfig:
    """Fill derived values and validate the composed config (raises before Ray starts)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from verl_ext.policy_loss import LOSS_MODE, TRAINER_MODE, weighting_spec_from
    from verl_ext.training_checks import check_training_config
    from verl_ext.weighting import WEIGHTING_SCHEMES

    with open_dict(config):
        if config.reward.custom_reward_function.get("path") is None:
            config.reward.custom_reward_function.path = default_reward_path()
    policy_loss = config.actor_rollout_ref.actor.policy_loss
    if policy_loss.loss_mode == LOSS_MODE:
        scheme = policy_loss.get("weighting")
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"unknown weighting scheme {scheme!r}; valid choices: {', '.join(WEIGHTING_SCHEMES)}")
        fill_default_alpha(config)
        spec = weighting_spec_from(policy_loss)
        trainer_mode = config.trainer.v1.trainer_mode if config.trainer.use_v1 else None
        if spec.scheme == "ppl" and trainer_mode != TRAINER_MODE:
            raise ValueError(
                f"weighting=ppl needs the group-aware trainer: set trainer.use_v1=true and "
                f"trainer.v1.trainer_mode={TRAINER_MODE} (got use_v1={config.trainer.use_v1}, mode={trainer_mode})"
            )
    check_training_config(config)
    from verl_ext.vllm_cpu import rollout_problems

    # the model path may name an env variable only the launch script sets: unresolved, the head_dim check waits
    model_path = OmegaConf.select(config, "actor_rollout_ref.model.path", throw_on_resolution_failure=False)
    problems = rollout_problems(config.actor_rollout_ref.rollout, model_path, on_cpu=config.trainer.device == "cpu")
    if problems:
        raise ValueError("; ".join(problems))
    # verl's own validation, which also builds the actor dataclasses (our weighting checks).
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    return config


def check_inputs(config: DictConfig) -> list[str]:
    """Model, checkpoint directory and data files (ConfigError); returns warnings (prompts verl will drop)."""
    from verl_ext.training_checks import check_training_inputs

    return check_training_inputs(config)


def worker_warning_filters() -> str:
    """PYTHONWARNINGS for Ray's workers: the user's filters, plus ignoring the UserWarnings of verl's
    engine registry (optional engines absent), which each of the ~10 worker processes repeats five times."""
    own = "ignore::UserWarning:verl.workers.engine"
    user = os.environ.get("PYTHONWARNINGS", "")
    return f"{user},{own}" if user else own


def silence_harmless_warnings() -> None:
    import warnings

    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def preflight(config: DictConfig, dry_run: bool) -> list[str]:
    """Every check that needs no Ray, cheapest first (bad values before verl is even imported);
    ConfigError ends the command. Returns warning lines (a dry run turns input errors into warnings)."""
    from verl_ext.training_checks import check_training_config

    with exit_on_config_error(PROG, CONFIG_ERRORS):
        check_training_config(config)  # first, before verl is imported (slow: all of torch and Ray): bad values fail at once
    try:
        warnings = check_inputs(config)
    except CONFIG_ERRORS as err:
        if not dry_run:
            with exit_on_config_error(PROG, CONFIG_ERRORS):
                raise
        warnings = [f"a real run would stop here: {err}"]
    silence_harmless_warnings()
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    with exit_on_config_error(PROG, CONFIG_ERRORS):
        prepare_config(config)
    return warnings


def run(config: DictConfig) -> None:
    """Check everything, decide what the run folder allows (start, resume, refuse, nothing to train),
    then train with the launch's log file taking the output."""
    dry_run = bool(config.get("dry_run", False))
    warnings = preflight(config, dry_run)
    with exit_on_config_error(PROG, CONFIG_ERRORS):
        run_dir = absolute_run_dir(config)
        recorded, current, decision = plan_launch(config, source_root())
    if dry_run:
        for warning in warnings:
            print(f"[{PROG}] warning: {warning}", file=sys.stderr)
        print(OmegaConf.to_yaml(config, resolve=True))
        print(f"[{PROG}] {decision.message}")
        print(f"[{PROG}] dry run: config composed and validated; Ray not started.")
        return
    if decision.action == "refuse":
        print(f"[{PROG}] error: {decision.message}", file=sys.stderr)
        raise SystemExit(2)
    if decision.action == "nothing_to_train":
        print(f"[{PROG}] {decision.message}")
        return
    launch = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": decision.action,
              "changed": list(decision.changed)}
    record, moved = start_launch(run_dir, recorded, current, decision, experiment=config.trainer.experiment_name,
                                 launch=launch)
    log = run_log.start(os.environ.get("LOG_DIR") or os.path.join(run_dir, "logs"), config.trainer.get("total_training_steps"))
    try:
        print(f"[{PROG}] run directory: {run_dir}")
        print(f"[{PROG}] log: {log.path}")
        print(f"[{PROG}] {decision.message}" + (f" (to {moved})" if moved else ""))
        for line in [*(f"  {c}" for c in decision.changed), *(f"warning: {w}" for w in warnings)]:
            print(f"[{PROG}] {line}")
        apply_launch(config, decision, record)
        print("full config:\n" + OmegaConf.to_yaml(config, resolve=True), flush=True)
        train(config)
        print(run_summary(config))
        merge_at_end(config)
    except KeyboardInterrupt:
        print(interrupted_message(config), flush=True)
        stop_ray()
        raise SystemExit(130) from None
    except Exception:  # noqa: BLE001 - the traceback must reach the log file before it closes
        traceback.print_exc()
        stop_ray()
        raise SystemExit(1) from None
    finally:
        stop_ray()  # before the log closes: Ray's last forwarded worker lines belong in it
        print(f"[{PROG}] full log: {log.path}", flush=True)
        log.close()


def merge_at_end(config: DictConfig) -> None:
    """The last checkpoint as a Hugging Face model (`run.merge_at_end`, FSDP checkpoints), with the
    command that evaluates it."""
    from verl_ext.merge import merge_checkpoint

    strategy = config.actor_rollout_ref.actor.get("strategy", "fsdp")
    if not (config.get("run") or {}).get("merge_at_end", True) or strategy not in ("fsdp", "fsdp2"):
        return
    try:
        merged = merge_checkpoint(config.trainer.default_local_dir, quiet=True)
    except ConfigError as err:
        print(f"[{PROG}] warning: no merged model: {err}")
        return
    print(f"[{PROG}] merged model: {merged}")
    print(f"[{PROG}] evaluate it: {evaluate_command(config)}")


def evaluate_command(config: DictConfig) -> str:
    """The evaluation of this run: on the tiny arithmetic set for a tiny preset (`tiny=true`), else on the
    AIME/AMC parquet files that `scripts/prepare_data.sh` writes."""
    run = config.trainer.default_local_dir
    if str(config.get("preset_name") or "").startswith("tiny"):
        return f"bash scripts/evaluate.sh tiny=true model.path={run}"
    return f"bash scripts/prepare_data.sh raw_dir=<folder of the AIME/AMC jsonl>; bash scripts/evaluate.sh model.path={run}"


def train(config: DictConfig) -> None:
    """verl's own entry point (`run_ppo`) with the v1 or v0 task runner."""
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo

    if config.trainer.use_v1:
        run_ppo(config, task_runner_class=TaskRunnerV1)
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner

        run_ppo(config, task_runner_class=TaskRunner)


def stop_ray() -> None:
    """Shut down the Ray cluster this driver started (its workers with it); a joined cluster stays up."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def interrupted_message(config: DictConfig) -> str:
    """What a Ctrl-C prints: where the run stands and the command that continues it."""
    from verl_ext.run_dir import latest_checkpoint_step

    run_dir = config.trainer.default_local_dir
    step = latest_checkpoint_step(run_dir)
    given = [a for a in sys.argv[1:] if not a.startswith("hydra.searchpath=")]  # ours: _add_verl_searchpath
    command = os.environ.get("RUN_COMMAND") or " ".join(["python -m recipe.dapo_reweight.main", *given])
    saved = f"the last checkpoint is step {step}" if step is not None else "no checkpoint was saved yet"
    return (
        f"[{PROG}] interrupted; {saved} ({run_dir}). To resume, run the same command again:\n"
        f"[{PROG}]   {command}"
    )


def absolute_run_dir(config: DictConfig) -> str:
    """trainer.default_local_dir made absolute (against the launch's cwd), written back into the config,
    so that checkpoints, run.json and logs land in one folder whatever the cwd of verl's workers."""
    run_dir = str(config.trainer.default_local_dir)
    if not run_dir.startswith(REMOTE_PREFIXES):
        run_dir = os.path.abspath(os.path.expanduser(run_dir))
        with open_dict(config):
            config.trainer.default_local_dir = run_dir
    return run_dir


def apply_launch(config: DictConfig, decision: Decision, record: dict) -> None:
    """What the resume decision changes in verl's config: wandb continues the run's recorded id
    (WANDB_RUN_ID, WANDB_RESUME=allow, in this process and every Ray worker), and a resumed run does
    not validate again before training (the checkpointed step's validation metrics stand). Every
    worker also ignores the warnings verl repeats on each import (`worker_warning_filters`)."""
    env = {"WANDB_RUN_ID": record["wandb_run_id"], "WANDB_RESUME": "allow", "PYTHONWARNINGS": worker_warning_filters()}
    os.environ.update(env)
    with open_dict(config):
        ray_env = config.ray_kwargs.ray_init.setdefault("runtime_env", {}).setdefault("env_vars", {})
        ray_env.update(env)
        if decision.action == "resume":
            config.trainer.val_before_train = False


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


@hydra.main(config_path=str(config_dir()), config_name="dapo_reweight", version_base=None)
def main(config: DictConfig) -> None:
    run(config)


def verl_config_dir() -> Path:
    """verl's own config folder, found without importing verl.

    hydra's `pkg://verl.trainer.config` imports verl (all of torch and Ray) just to compose the
    config; a `file://` path to the same folder lets a bad setting fail in a second."""
    import importlib.util

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"[{PROG}] error: verl is not installed; run `bash scripts/install.sh`")
    return Path(next(iter(spec.submodule_search_locations))) / "trainer" / "config"


def _add_verl_searchpath(argv: list[str]) -> list[str]:
    """verl's `ppo_trainer` config by file path (the yaml's `pkg://` needs `import verl`); presets
    (`+preset=NAME`: preset/NAME.yaml) sit next to the recipe's config and need no search path."""
    if any(a.startswith("hydra.searchpath") for a in argv):
        return argv
    return argv + [f"hydra.searchpath=[file://{verl_config_dir()}]"]


if __name__ == "__main__":
    sys.argv = _add_verl_searchpath(sys.argv)
    main()
