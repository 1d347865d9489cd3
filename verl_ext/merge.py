"""From a training run to a Hugging Face model: verl's model merger on the run's latest actor checkpoint.

    bash scripts/merge_checkpoint.sh runs/dapo_reweight/tiny-cpu-lowprob-a0.2-topp1.0        # latest step
    bash scripts/merge_checkpoint.sh RUN_DIR --step 20
    bash scripts/evaluate.sh model.path=RUN_DIR                                             # merges if needed

A run's folder (`trainer.default_local_dir`: run.json, `global_step_N/actor`, ...) holds FSDP shards,
which no evaluation engine loads. `merge_checkpoint` runs `python -m verl.model_merger merge
--backend fsdp` on `global_step_N/actor` into `global_step_N/merged_hf` (written to a temporary
folder and renamed, so a half-written model never sits under the final name). Training merges the
last checkpoint itself at the end of a run (`run.merge_at_end`). `resolve_model_path` lets every
command that takes a model path (evaluation, the Δlog p analysis, the decoding sweeps) take a run
folder or a `global_step_N` folder instead: it answers the merged model's path, merging first when
it is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from verl_ext.core.atomic_io import current_umask
from verl_ext.core.checks import ConfigError, exit_on_config_error

MERGED = "merged_hf"
TRACKER = "latest_checkpointed_iteration.txt"


def is_run_dir(path: str | os.PathLike) -> bool:
    """A training run's folder: verl's checkpoint tracker or our run.json is in it."""
    p = Path(path)
    return p.is_dir() and ((p / TRACKER).is_file() or (p / "run.json").is_file())


def is_step_dir(path: str | os.PathLike) -> bool:
    """One checkpoint, `global_step_N`, with its actor shards."""
    p = Path(path)
    return p.is_dir() and p.name.startswith("global_step_") and (p / "actor").is_dir()


def step_dir(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    """`run_dir/global_step_<step>` (default: the latest checkpoint); ConfigError if it does not exist."""
    run_dir = Path(run_dir)
    if step is None:
        from verl_ext.run_dir import latest_checkpoint_step

        step = latest_checkpoint_step(run_dir)
        if step is None:
            raise ConfigError(f"{run_dir}: no checkpoint to merge ({TRACKER} missing or pointing nowhere)")
    target = run_dir / f"global_step_{step}"
    if not is_step_dir(target):
        raise ConfigError(f"{target}: no actor checkpoint there")
    return target


def merger_command(actor_dir: Path, target_dir: Path) -> list[str]:
    """verl's own model merger, FSDP backend."""
    return [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
            "--local_dir", str(actor_dir), "--target_dir", str(target_dir)]


def _make_group_readable(folder: Path) -> None:
    """The merger's files get the mode of any new file (some writers leave 0600)."""
    mode = 0o666 & ~current_umask()
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(mode)
    folder.chmod(0o777 & ~current_umask())


def merge_checkpoint(checkpoint: str | os.PathLike, step: int | None = None, *, quiet: bool = False) -> Path:
    """The Hugging Face model of a run folder's checkpoint (latest, or `step`), or of one `global_step_N`
    folder: `global_step_N/merged_hf`, merged now unless it already exists."""
    ckpt = Path(checkpoint) if is_step_dir(checkpoint) else step_dir(checkpoint, step)
    target = ckpt / MERGED
    if (target / "config.json").is_file():
        return target
    tmp = ckpt / f".{MERGED}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(merger_command(ckpt / "actor", tmp), capture_output=quiet, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = (proc.stderr or "")[-2000:] if quiet else ""
        raise ConfigError(f"verl's model merger failed on {ckpt / 'actor'} (exit {proc.returncode}) {detail}".rstrip())
    _make_group_readable(tmp)
    os.replace(tmp, target)
    return target


def resolve_model_path(path, key: str = "model.path"):
    """`path` itself, unless it is a training run's folder or one of its `global_step_N` folders:
    then the merged Hugging Face model of (the latest) checkpoint, merged first if needed."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return path
    expanded = os.path.expanduser(str(path))
    if is_step_dir(expanded) or is_run_dir(expanded):
        merged = merge_checkpoint(expanded, quiet=True)
        print(f"[merge] {key}={path}: a training run; using its merged model {merged}", file=sys.stderr)
        return str(merged)
    return path


def resolve_config_paths(cfg, keys: tuple[str, ...]) -> None:
    """Replace each dotted `key` of an OmegaConf config that names a run folder by its merged model."""
    from omegaconf import OmegaConf, open_dict

    for key in keys:
        value = OmegaConf.select(cfg, key)
        resolved = resolve_model_path(value, key)
        if resolved != value:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, resolved, merge=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="merge", description="Merge a training run's actor checkpoint into a Hugging Face model.")
    parser.add_argument("checkpoint", help="a run folder (trainer.default_local_dir) or one of its global_step_N folders")
    parser.add_argument("--step", type=int, default=None, help="which step (default: the latest checkpoint)")
    args = parser.parse_args(argv)
    with exit_on_config_error("merge"):
        if not Path(args.checkpoint).is_dir():
            raise ConfigError(f"{args.checkpoint!r}: no such folder")
        merged = merge_checkpoint(args.checkpoint, args.step)
    print(f"[merge] Hugging Face model: {merged}")
    print(f"[merge] evaluate it: bash scripts/evaluate.sh model.path={merged}")


if __name__ == "__main__":
    main()
