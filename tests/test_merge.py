"""verl_ext.merge: a training run's folder stands for its merged Hugging Face model wherever a model path goes."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from verl_ext.core.checks import ConfigError
from verl_ext.merge import is_run_dir, merge_checkpoint, resolve_config_paths, resolve_model_path, step_dir


def run_folder(tmp_path: Path, steps: list[int], merged: list[int]) -> Path:
    """verl's checkpoint layout (global_step_N/actor + tracker), with merged_hf already there for `merged`."""
    run = tmp_path / "run"
    for step in steps:
        (run / f"global_step_{step}" / "actor").mkdir(parents=True)
    for step in merged:
        (run / f"global_step_{step}" / "merged_hf").mkdir()
        (run / f"global_step_{step}" / "merged_hf" / "config.json").write_text("{}")
    (run / "latest_checkpointed_iteration.txt").write_text(str(max(steps)))
    return run


def test_a_run_folder_resolves_to_its_latest_merged_model(tmp_path):
    run = run_folder(tmp_path, [1, 2], merged=[1, 2])
    assert is_run_dir(run) and not is_run_dir(tmp_path)
    assert resolve_model_path(str(run)) == str(run / "global_step_2" / "merged_hf")
    assert resolve_model_path(str(run / "global_step_1")) == str(run / "global_step_1" / "merged_hf")
    assert resolve_model_path("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # not a run: unchanged
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert merge_checkpoint(run, step=1) == run / "global_step_1" / "merged_hf"
    cfg = OmegaConf.create({"models": {"base": "Qwen/Qwen2.5-Math-7B", "rl": str(run), "tokenizer": None}})
    OmegaConf.set_struct(cfg, True)
    resolve_config_paths(cfg, ("models.base", "models.rl", "models.tokenizer"))
    assert cfg.models.rl == str(run / "global_step_2" / "merged_hf") and cfg.models.base == "Qwen/Qwen2.5-Math-7B"


def test_missing_checkpoints_are_named(tmp_path):
    run = run_folder(tmp_path, [1], merged=[])
    with pytest.raises(ConfigError, match=r"global_step_5: no actor checkpoint there"):
        step_dir(run, 5)
    (run / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(ConfigError, match="no checkpoint to merge"):
        step_dir(run)


def test_a_failing_merge_leaves_nothing_under_the_final_name(tmp_path):
    run = run_folder(tmp_path, [1], merged=[])  # actor/ holds no shards: verl's merger fails
    with pytest.raises(ConfigError, match=r"verl's model merger failed on \S+global_step_1/actor"):
        merge_checkpoint(run, quiet=True)
    assert sorted(p.name for p in (run / "global_step_1").iterdir()) == ["actor"]


def test_evaluation_takes_a_run_folder(tmp_path):
    """evaluate's model.path may be a training run's folder: it generates with the merged model."""
    import json
    import shutil

    import torch
    from hydra import compose, initialize_config_dir

    from verl_ext.evaluation.command import run
    from verl_ext.tiny_assets import ensure_tiny_assets

    assets = ensure_tiny_assets()
    run_dir = run_folder(tmp_path, [1], merged=[])
    shutil.copytree(assets.model_dir, run_dir / "global_step_1" / "merged_hf")  # as the merger leaves it
    repo = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(repo / "configs"), version_base=None):
        cfg = compose(config_name="evaluate", overrides=[
            f"model.path={run_dir}", "model.backend=hf", "model.device=cpu", f"data.files=[{assets.val_parquet}]",
            "data.max_problems=2", "sampling.n=2", "sampling.max_new_tokens=4", "metrics.pass_ks=[1]",
            f"output_dir={tmp_path / 'eval'}", "show_progress=false", "grader.num_workers=1",
        ])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run(cfg)
    finally:
        torch.set_num_threads(threads)
    assert out["table"]["tiny_arith"]["num_problems"] == 2
    settings = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert str(run_dir / "global_step_1" / "merged_hf") in json.dumps(settings)
