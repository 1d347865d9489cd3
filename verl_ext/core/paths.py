"""Where this project's own files are: one rule for every command, in a checkout and once installed.

`config_dir()` is the folder of every command's hydra config (the table `COMMAND_CONFIGS`) and of
the training presets (`preset/`). In the repository it is the top-level `configs/`; `pip install .`
ships that folder as package data `verl_ext/configs/` (setup.py maps the package `verl_ext.configs`
to `configs/`), so after a non-editable install, from any working directory, the same call finds
the installed copy. Nothing here points outside the repository or the installed package.

`source_root()` is the checkout this code runs from (a source tree or an editable install), None
once installed. Defaults that name a folder for outputs (`${repo_dir:}` in the training config) use
it, else the working directory.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

PACKAGED_CONFIGS = "configs"  # verl_ext/configs/ in an installed copy

# Every command and the config(s) it composes from config_dir(); tests/test_install.py checks the
# table against an installed copy, and each command passes config_dir() to hydra.
COMMAND_CONFIGS: dict[str, tuple[str, ...]] = {
    "recipe.dapo_reweight.main": ("dapo_reweight",),  # scripts/run_dapo_reweight.sh, run_baselines.sh
    "verl_ext.evaluation": ("evaluate",),  # scripts/evaluate.sh
    "verl_ext.data_prep": ("prepare_data",),  # scripts/prepare_data.sh
    "verl_ext.analysis.logp_diff": ("analyze_logp_diff",),  # scripts/analyze_logp_diff.sh
    "verl_ext.decoding.sweep": ("token_replacement", "extrapolation"),  # scripts/run_{token_replacement,extrapolation}.sh
    "verl_ext.mini.pipeline": ("reproduce_mini",),  # scripts/reproduce_mini.sh
}


def source_root() -> Path | None:
    """The repository checkout this package runs from (source tree, editable install); None once installed."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "setup.py").is_file() and (root / "configs").is_dir() else None


def config_dir() -> Path:
    """The folder of every command's config: the installed package data, else the checkout's `configs/`."""
    packaged = Path(str(importlib.resources.files("verl_ext") / PACKAGED_CONFIGS))
    if packaged.is_dir():
        return packaged
    root = source_root()
    if root is not None:
        return root / "configs"
    raise FileNotFoundError(
        f"no configs: neither {packaged} (an installed copy) nor a checkout's configs/ next to {Path(__file__).parents[1]}; "
        "reinstall with `pip install .` from the repository"
    )


def preset_dir() -> Path:
    return config_dir() / "preset"


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def output_root() -> Path:
    """Where default output folders go: the checkout, or the working directory of an installed copy."""
    return source_root() or Path.cwd()


if __name__ == "__main__":  # `python -m verl_ext.core.paths`: the config folder, for scripts that pass --config-path
    print(config_dir())


# Folder names that say nothing about which model is in them (a figure names their parent too).
GENERIC_MODEL_FOLDERS = ("model", "models", "merged_hf", "hf", "huggingface", "actor", "checkpoint")


def figure_name(name) -> str:
    """A model or data name as a figure shows it: a local path by its last folder/file (with its parent
    when that folder's name is generic, e.g. `base/model`), a hub id as given."""
    path = Path(str(name))
    if not (path.exists() or path.is_absolute()):
        return str(name)
    if path.name in GENERIC_MODEL_FOLDERS and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name
