"""Weights & Biases runs of the offline commands (analysis, decoding sweeps), next to training's.

Training (`scripts/run_dapo_reweight.sh`) logs to wandb when WANDB_API_KEY or WANDB_MODE is set,
into project `trainer.project_name` of `configs/dapo_reweight.yaml` (verl
passes it to `wandb.init` explicitly, so WANDB_PROJECT does not move training runs) and into the
group WANDB_RUN_GROUP (verl passes no group, wandb reads the variable itself). The analysis and
decoding commands follow the same rules, so their histograms, curves and tables land in the same
project and group as the runs they study. Their config block:

    wandb:
      enable: auto   # auto: log when WANDB_MODE or WANDB_API_KEY is set | true | false
      project: null  # null: the training project (trainer.project_name of the recipe config)
      group: null    # null: WANDB_RUN_GROUP, as training
      name: null     # null: <command>-<output dir name>

WANDB_DIR, when set, is where the run files go (as for training); otherwise the output folder.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from verl_ext.core.paths import config_dir

ENABLE_CHOICES = ("auto", "true", "false")
TRAINING_CONFIG = config_dir() / "dapo_reweight.yaml"


def wandb_enabled(setting: Any) -> bool:
    """`wandb.enable`: true/false, or auto = WANDB_MODE or WANDB_API_KEY is set (training's rule)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"wandb.enable={setting!r} is invalid; valid choices: {', '.join(ENABLE_CHOICES)}")
    return bool(os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))


@functools.cache
def training_project() -> str:
    """The wandb project training logs to by default: `trainer.project_name` of the recipe config.

    Read from the packaged YAML rather than copied, so renaming the training project moves the
    analysis and decoding runs with it."""
    return str(OmegaConf.load(TRAINING_CONFIG).trainer.project_name)


def start_run(wandb_cfg: Mapping, *, default_name: str, config: dict, out_dir: Path, job_type: str):
    """A started `wandb.Run` configured by the `wandb` block `wandb_cfg`, or None when logging is off."""
    if not wandb_enabled(wandb_cfg.get("enable", "auto")):
        return None
    import wandb

    return wandb.init(
        project=wandb_cfg.get("project") or training_project(),
        # read now, not by wandb: its settings singleton keeps the environment of the first run in the process
        group=wandb_cfg.get("group") or os.environ.get("WANDB_RUN_GROUP") or None,
        name=wandb_cfg.get("name") or default_name,
        config=config,
        dir=os.environ.get("WANDB_DIR") or str(out_dir),
        job_type=job_type,
    )
