"""verl_ext.run_dir: a launch resumes only its own experiment; anything else is refused before Ray starts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from verl_ext.core.atomic_io import atomic_write_bytes
from verl_ext.core.paths import config_dir
from verl_ext.run_dir import (
    RUN_FILE,
    decide,
    differences,
    latest_checkpoint_step,
    plan_launch,
    start_launch,
    trajectory_config,
    updated_record,
)

REPO = Path(__file__).resolve().parents[1]
TINY = Path(os.environ.get("TINY_ASSETS_DIR") or REPO / ".assets" / "tiny")
LR = "actor_rollout_ref.actor.optim.lr"


def fake_checkpoints(run_dir: Path, steps: list[int]) -> None:
    """The layout verl leaves: global_step_N folders and the tracker naming the latest."""
    for step in steps:
        (run_dir / f"global_step_{step}" / "actor").mkdir(parents=True)
    (run_dir / "latest_checkpointed_iteration.txt").write_text(str(max(steps)))


def test_trajectory_config_records_what_decides_the_run_relative_to_the_repo(tmp_path):
    config = {
        "data": {"train_files": [f"{tmp_path}/d/train.parquet"], "train_batch_size": 4},
        "actor_rollout_ref": {"actor": {"optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "clip_ratio_high": 0.28},
                              "rollout": {"top_p": 1.0, "max_num_seqs": 256}},
        "algorithm": {"rollout_correction": {"rollout_is": None}},
        "trainer": {"total_training_steps": 5, "save_freq": 1, "logger": ["console"]},
    }
    recorded = trajectory_config(config, root=tmp_path)
    assert recorded == {
        "data.train_files": ["d/train.parquet"],
        "data.train_batch_size": 4,
        "actor_rollout_ref.actor.optim.lr": 1e-4,
        "actor_rollout_ref.actor.optim.betas": [0.9, 0.99],
        "actor_rollout_ref.actor.clip_ratio_high": 0.28,
        "actor_rollout_ref.rollout.top_p": 1.0,
        "algorithm.rollout_correction.rollout_is": None,
    }  # steps, frequencies, loggers and engine sizes are not the experiment
    config["algorithm"]["rollout_correction"]["rollout_is"] = "token"
    config["actor_rollout_ref"]["actor"]["optim"]["lr"] = 2e-4
    assert differences(recorded, trajectory_config(config, root=tmp_path)) == [
        "actor_rollout_ref.actor.optim.lr: 0.0001 -> 0.0002",
        'algorithm.rollout_correction.rollout_is: null -> "token"',
    ]


SAME = {"a": 1, "b": "x"}


def test_decisions():
    recorded = {"trajectory": SAME}
    assert decide(None, SAME, None, 5).action == "start"
    assert decide(recorded, {"a": 2}, None, 5).action == "start"  # nothing saved yet: nothing to mix
    assert decide(recorded, SAME, 2, 5).action == "resume"
    assert decide(recorded, SAME, 2, None).action == "resume"
    done = decide(recorded, SAME, 5, 5, run_dir="/r")
    assert done.action == "nothing_to_train"
    assert "nothing to train: /r already holds step 5 of trainer.total_training_steps=5" in done.message
    assert "raise trainer.total_training_steps above 5" in done.message and "trainer.resume_mode=disable" in done.message
    refused = decide(recorded, {"a": 2, "b": "x"}, 2, 5, run_dir="/r")
    assert refused.action == "refuse" and refused.changed == ("a: 1 -> 2",)
    assert "/r holds checkpoints (up to step 2) of a different configuration:\n    a: 1 -> 2\n" in refused.message
    assert "run.on_mismatch=fresh" in refused.message and "run.on_mismatch=resume" in refused.message
    assert decide(recorded, {"a": 2, "b": "x"}, 2, 5, on_mismatch="resume").action == "resume"
    assert decide(recorded, {"a": 2, "b": "x"}, 2, 5, on_mismatch="fresh").action == "fresh"
    unknown = decide(None, SAME, 3, 5, run_dir="/r")
    assert unknown.action == "refuse" and "no run.json: which configuration made them is unknown" in unknown.message
    assert decide(recorded, SAME, 5, 5, resume_mode="disable").action == "fresh"
    assert decide(recorded, {"a": 9}, 5, 5, resume_mode="resume_path").action == "explicit"
    with pytest.raises(ValueError, match="run.on_mismatch='skip' is invalid; valid: refuse, resume, fresh"):
        decide(recorded, SAME, 2, 5, on_mismatch="skip")


def test_record_keeps_the_wandb_id_unless_training_starts_over():
    first = updated_record(None, decide(None, SAME, None, 5), SAME, experiment="e", launch={"n": 1})
    assert len(first["wandb_run_id"]) == 8 and first["launches"] == [{"n": 1}]
    resumed = updated_record(first, decide(first, SAME, 2, 5), SAME, experiment="e", launch={"n": 2})
    assert resumed["wandb_run_id"] == first["wandb_run_id"] and resumed["launches"] == [{"n": 1}, {"n": 2}]
    fresh = updated_record(first, decide(first, {"a": 3}, 2, 5, on_mismatch="fresh"), {"a": 3}, experiment="e", launch={})
    assert fresh["wandb_run_id"] != first["wandb_run_id"] and fresh["trajectory"] == {"a": 3}


def test_fresh_moves_the_old_checkpoints_aside(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake_checkpoints(run_dir, [1, 2])
    assert latest_checkpoint_step(run_dir) == 2
    decision = decide({"trajectory": SAME}, {"a": 5}, 2, 5, on_mismatch="fresh")
    _, moved = start_launch(run_dir, {"trajectory": SAME}, {"a": 5}, decision, experiment="e", launch={})
    assert moved.name.startswith("run.replaced-") and latest_checkpoint_step(moved) == 2
    assert latest_checkpoint_step(run_dir) is None
    assert json.loads((run_dir / RUN_FILE).read_text())["trajectory"] == {"a": 5}


def test_files_written_atomically_are_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "run.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- the command


def compose_tiny(run_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from recipe.dapo_reweight.main import verl_config_dir

    os.environ.setdefault("TINY_ASSETS_DIR", str(TINY))
    from recipe.dapo_reweight.main import prepare_config

    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return prepare_config(compose("dapo_reweight", overrides=[
            f"hydra.searchpath=[file://{verl_config_dir()}]", "+preset=tiny-cpu",
            f"trainer.default_local_dir={run_dir}", *overrides,
        ]))


def _main(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TINY_ASSETS_DIR": str(TINY), "PYTHONPATH": str(REPO), "VERL_PLATFORM": "cpu",
           "VERL_ENGINE_DEVICE": "cuda"}
    return subprocess.run(
        [sys.executable, "-m", "recipe.dapo_reweight.main", "+preset=tiny-cpu", f"trainer.default_local_dir={run_dir}",
         *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


@pytest.fixture
def finished_run(tmp_path):
    """A folder as a 2-step run of the tiny preset leaves it: checkpoints 1 and 2 and its run.json."""
    from verl_ext.tiny_assets import ensure_tiny_assets

    ensure_tiny_assets(str(TINY))
    run_dir = tmp_path / "run"
    config = compose_tiny(run_dir, "trainer.total_training_steps=2")
    recorded, current, decision = plan_launch(config, REPO)
    assert decision.action == "start" and recorded is None
    start_launch(run_dir, recorded, current, decision, experiment="tiny", launch={})
    fake_checkpoints(run_dir, [1, 2])
    return run_dir


def test_a_rerun_with_a_changed_setting_is_refused_before_ray(finished_run):
    proc = _main(finished_run, f"{LR}=3e-4", "algorithm.rollout_correction.rollout_is=token", "trainer.total_training_steps=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"[dapo_reweight] error: {finished_run} holds checkpoints (up to step 2) of a different configuration:" in proc.stderr
    assert f"    {LR}: 0.0001 -> 0.0003" in proc.stderr
    assert '    algorithm.rollout_correction.rollout_is: null -> "token"' in proc.stderr
    assert "ray init kwargs" not in proc.stdout + proc.stderr  # Ray never started


def test_a_rerun_of_a_finished_run_says_nothing_to_train(finished_run):
    proc = _main(finished_run, "trainer.total_training_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"nothing to train: {finished_run} already holds step 2 of trainer.total_training_steps=2" in proc.stdout
    assert "ray init kwargs" not in proc.stdout + proc.stderr


def test_same_settings_resume_and_mismatch_can_be_overridden(finished_run):
    assert plan_launch(compose_tiny(finished_run, "trainer.total_training_steps=3"), REPO)[2].action == "resume"
    changed = compose_tiny(finished_run, f"{LR}=3e-4", "run.on_mismatch=fresh")
    assert plan_launch(changed, REPO)[2].action == "fresh"
    # the tiny assets are recorded relative to the repository when they live in it
    recorded = json.loads((finished_run / RUN_FILE).read_text())["trajectory"]
    if TINY.resolve().is_relative_to(REPO):
        assert recorded["actor_rollout_ref.model.path"] == str(TINY.resolve().relative_to(REPO) / "model")


@pytest.mark.parametrize("correction, suffix", [("0", ""), ("1", "-is")])
def test_ablation_runs_each_get_a_folder_also_under_a_users_dir(tmp_path, correction, suffix):
    env = {**os.environ, "DRY_RUN": "1", "PRESET": "tiny-cpu", "TOP_PS": "0.9", "CORRECTION": correction,
           "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "TINY_ASSETS_DIR": str(TINY)}
    proc = subprocess.run(
        ["bash", "scripts/run_top_p_ablation.sh", f"trainer.default_local_dir={tmp_path}/"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[dapo_reweight] no checkpoint in {tmp_path}/tiny-cpu-lowprob-a0.2-topp0.9{suffix}: training from step 0" in proc.stdout


def test_baseline_runs_each_get_a_folder_under_a_users_dir(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "PRESET": "tiny-cpu", "SCHEMES": "none dominate", "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "TINY_ASSETS_DIR": str(TINY)}
    proc = subprocess.run(
        ["bash", "scripts/run_baselines.sh", f"trainer.default_local_dir={tmp_path}"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tiny-cpu-none-a0.0-topp1.0", "tiny-cpu-dominate-a0.1-topp1.0"):
        assert f"[dapo_reweight] no checkpoint in {tmp_path}/{name}: training from step 0" in proc.stdout


def test_figure_name_keeps_the_parent_of_a_generic_model_folder(tmp_path):
    from verl_ext.core.paths import figure_name

    for folder in ("base/model", "run/global_step_40/merged_hf", "models/none-seed0"):
        (tmp_path / folder).mkdir(parents=True)
    assert figure_name(tmp_path / "base" / "model") == "base/model"
    assert figure_name(tmp_path / "run" / "global_step_40" / "merged_hf") == "global_step_40/merged_hf"
    assert figure_name(tmp_path / "models" / "none-seed0") == "none-seed0"
    assert figure_name("Qwen/Qwen2.5-Math-7B") == "Qwen/Qwen2.5-Math-7B"  # a hub id as given
    assert figure_name(tmp_path / "data" / "aime.parquet") == "aime.parquet"  # absolute, even if absent
