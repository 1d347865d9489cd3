"""End to end: verl's real DAPO trainer on the tiny model, through Ray, on CPU only.

The runs use the user's command (`scripts/run_dapo_reweight.sh`, preset tiny-cpu, which loads
configs/preset/tiny-cpu.yaml) with dynamic sampling and the `dapo` reward manager forced on.
One 2-step run through verl's own `vllm` rollout (vLLM's CPU build; checkpoint after each step),
then a 3-step run in the same folder that must resume from step 2 instead of starting over; and
two runs through the `hf_reproducible` rollout that must log the same numbers. About 2 minutes
per run on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600

# Forced on whatever the recipe's defaults become: what this test is about.
DAPO_OVERRIDES = [
    "algorithm.filter_groups.enable=true",
    "algorithm.filter_groups.metric=acc",
    "reward.reward_manager.name=dapo",
    "trainer.save_freq=1",
    "trainer.test_freq=1",
    "trainer.resume_mode=auto",
]


def train_command(*overrides: str) -> list[str]:
    """The command that trains on the tiny CPU preset (the one place to change the launcher)."""
    return ["bash", str(REPO / "scripts" / "run_dapo_reweight.sh"), *DAPO_OVERRIDES, *overrides]


def training_env(run_dir: Path, log_name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "CUDA_VISIBLE_DEVICES", "RUN_LOG_CONSOLE")}
    env.update(PRESET="tiny-cpu", TINY_RUN_DIR=str(run_dir), LOG_DIR=str(run_dir / "logs" / log_name))
    # wandb in offline mode: the run files are checked below (nothing leaves the machine)
    (run_dir / log_name).mkdir(exist_ok=True)
    env.update(WANDB_MODE="offline", WANDB_DIR=str(run_dir / log_name), WANDB_RUN_GROUP="e2e-test", WEIGHTING="lowprob")
    return env


def launch_log(run_dir: Path, log_name: str) -> str:
    """The log file the launch wrote (verl_ext.run_log: one per launch, the full output)."""
    (path,) = (run_dir / "logs" / log_name).glob("train-*.log")
    return path.read_text()


def run_training(run_dir: Path, log_name: str, *overrides: str) -> tuple[int, str, str]:
    """Run one training in `run_dir` (checkpoints); returns (exit code, console output, the launch's log file)."""
    proc = subprocess.run(
        train_command(*overrides),
        cwd=REPO,
        env=training_env(run_dir, log_name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    (run_dir / f"{log_name}.console").write_text(proc.stdout)
    try:
        log = launch_log(run_dir, log_name)
    except ValueError:  # no log file: the launch stopped before training
        log = ""
    return proc.returncode, proc.stdout, log


def saved_steps(run_dir: Path) -> set[int]:
    return {int(p.name.split("_")[-1]) for p in run_dir.rglob("global_step_*") if p.is_dir()}


def _tail(log: str, n: int = 80) -> str:
    return "\n".join(log.splitlines()[-n:])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_cpu_run")
    code, console, log = run_training(run_dir, "first", "trainer.total_training_steps=2")
    return run_dir, code, console + log


@pytest.mark.slow
def test_dapo_training_runs_two_steps_on_cpu(first_run, step_metrics):
    run_dir, code, log = first_run
    assert code == 0, _tail(log)
    assert "vLLMHttpServer" in log, "the default CPU run must roll out through verl's vLLM server"
    metrics = step_metrics(log)
    assert sorted(metrics) == [1, 2], _tail(log)
    for step, values in metrics.items():
        grad_norm = values.get("actor/grad_norm", math.nan)
        assert math.isfinite(grad_norm) and grad_norm > 0, f"step {step}: actor/grad_norm={grad_norm}"
        assert "actor/reweight/weight_mean" in values, f"step {step}: the dapo_reweight loss logged no weights"
        assert values["actor/reweight/weight_max"] >= values["actor/reweight/weight_min"] >= 1.0
        assert any(k.startswith("val-core/") for k in values), f"step {step}: no validation metrics"
        # vLLM's rollout log-probs agree with the trainer's recomputation (both float32 here)
        assert values["training/rollout_probs_diff_mean"] < 0.05
    assert saved_steps(run_dir) == {1, 2}
    # the newcomer's summary: what was trained and where checkpoints and logs are
    assert re.search(r"\[dapo_reweight\] finished tiny-cpu-lowprob-a0.2-topp1.0: preset tiny-cpu, weighting lowprob", log)
    assert re.search(r"checkpoints: \S+ \(latest: \S+global_step_2\)", log), _tail(log)
    assert "[dapo_reweight] full log:" in log
    # the last checkpoint merged into a Hugging Face model that the evaluation commands load from the run folder
    from transformers import AutoModelForCausalLM

    from verl_ext.merge import resolve_model_path

    (merged,) = run_dir.rglob("global_step_2/merged_hf")
    assert f"[dapo_reweight] merged model: {merged}" in log
    assert resolve_model_path(str(merged.parent.parent)) == str(merged)
    assert AutoModelForCausalLM.from_pretrained(str(merged)).config.model_type == "qwen2"


@pytest.mark.slow
def test_wandb_offline_run_has_the_hook_metrics_and_every_dashboard_panel(first_run, read_wandb_history):
    from verl_ext.dashboard import dashboard_metric_keys

    run_dir, code, log = first_run
    assert code == 0, _tail(log)
    (wandb_run,) = (run_dir / "first" / "wandb").glob("offline-run-*")
    rows = read_wandb_history(wandb_run)
    assert len(rows) == 2, f"expected one wandb history row per training step, got {len(rows)}"
    for row in rows:
        assert 1.0 <= row["actor/reweight/weight_min"] <= row["actor/reweight/weight_mean"] <= 1.2
        assert row["actor/reweight/alpha"] == 0.2
        assert 0.0 <= row["rollout/top_p_truncated_mass_mean"] < 0.05  # top-p 1: only engine mismatch
    logged = set().union(*rows)
    # ppl_abs_z_mean is logged by the ppl scheme only; this run uses lowprob
    assert set(dashboard_metric_keys()) - logged == {"actor/reweight/ppl_abs_z_mean"}
    assert "tiny-cpu-lowprob-a0.2-topp1.0" in log  # the run name encodes preset, scheme, alpha, top-p


# what a rerun may change: wall-clock times and the throughput and memory figures derived from them
NONDETERMINISTIC = re.compile(r"timing|time_|perf/|throughput|memory")


REPRODUCIBLE = ["actor_rollout_ref.rollout.name=hf_reproducible", "actor_rollout_ref.rollout.full_determinism=true"]


@pytest.mark.slow
def test_a_rerun_with_the_same_seed_logs_the_same_numbers(tmp_path_factory, step_metrics):
    """rollout hf_reproducible + full_determinism: a second run in a fresh folder logs every metric
    (rewards, losses, weights, evictions, validation) bit for bit as the first, timings aside."""
    logs = []
    for name in ("reproducible", "rerun"):
        code, console, log = run_training(tmp_path_factory.mktemp(name), name, "trainer.total_training_steps=2", *REPRODUCIBLE)
        assert code == 0, _tail(console)
        assert "hf_reproducible" in log
        logs.append(log)
    first, again = (step_metrics(log) for log in logs)
    assert sorted(again) == sorted(first) == [1, 2]
    for step in first:
        keys = {k for k in first[step] if not NONDETERMINISTIC.search(k)}
        assert {k for k in again[step] if not NONDETERMINISTIC.search(k)} == keys
        differing = {k: (first[step][k], again[step][k]) for k in keys
                     if not (first[step][k] == again[step][k] or (math.isnan(first[step][k]) and math.isnan(again[step][k])))}
        assert not differing, (step, differing)


@pytest.mark.slow
def test_resume_continues_from_the_last_saved_step(first_run, step_metrics):
    run_dir, code, first_log = first_run
    assert code == 0, _tail(first_log)
    code, console, log = run_training(run_dir, "resumed", "trainer.total_training_steps=3")
    assert code == 0, _tail(console)
    assert re.search(r"Resuming from \S*global_step_2, setting global step to 2", log), _tail(log)
    assert sorted(step_metrics(log)) == [3], "the resumed run must train step 3 only"
    assert saved_steps(run_dir) == {1, 2, 3}
    # one run directory: run.json records both launches and one wandb run id, which wandb continued
    record = json.loads(next(run_dir.rglob("run.json")).read_text())
    assert [launch["action"] for launch in record["launches"]] == ["start", "resume"]
    for name in ("first", "resumed"):
        (wandb_run,) = (run_dir / name / "wandb").glob("offline-run-*")
        assert wandb_run.name.endswith(f"-{record['wandb_run_id']}"), (name, wandb_run.name)
    # a third launch has nothing to do and says so, before Ray starts
    code, console, _ = run_training(run_dir, "again", "trainer.total_training_steps=3")
    assert code == 0 and "nothing to train:" in console and "ray init kwargs" not in console, _tail(console)


def own_processes(marker: str) -> list[str]:
    """Command lines of the live processes whose environment contains `marker` (this test's run folder)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path_factory, step_metrics):
    """hf_reproducible + full_determinism: Ctrl-C after step 2's checkpoint, then the same command again,
    logs the same numbers for every step as a run that was never stopped. The Ctrl-C prints how to
    resume and leaves no process of the run behind (Ray's included)."""
    total = int(os.environ.get("E2E_RESUME_STEPS", "3"))  # longer runs cross the data's epoch boundary
    kill_after = 2  # then the resumed launch trains steps 3..total
    steps = [f"trainer.total_training_steps={total}", *REPRODUCIBLE]
    whole_dir = tmp_path_factory.mktemp("uninterrupted")
    code, console, whole_log = run_training(whole_dir, "whole", *steps)
    assert code == 0, _tail(console)

    run_dir = tmp_path_factory.mktemp("interrupted")
    proc = subprocess.Popen(train_command(*steps), cwd=REPO, env=training_env(run_dir, "part1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.read_text().strip() == str(kill_after) for p in run_dir.rglob("latest_checkpointed_iteration.txt")):
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the whole foreground group
            break
        time.sleep(0.2)
    console, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, _tail(console)
    assert f"[dapo_reweight] interrupted; the last checkpoint is step {kill_after}" in console, _tail(console)
    assert "To resume, run the same command again:" in console and "bash scripts/run_dapo_reweight.sh" in console
    time.sleep(2)
    assert own_processes(str(run_dir)) == [], "processes of the interrupted run are still alive"

    code, console, resumed_log = run_training(run_dir, "part2", *steps)
    assert code == 0, _tail(console)
    assert re.search(rf"Resuming from \S*global_step_{kill_after}", resumed_log), _tail(resumed_log)
    whole = step_metrics(whole_log)
    pieces = {**step_metrics(launch_log(run_dir, "part1")), **step_metrics(resumed_log)}
    assert set(whole) == set(pieces) == set(range(1, total + 1)), (sorted(whole), sorted(pieces))
    for step in range(1, total + 1):
        keys = {k for k in whole[step] if not NONDETERMINISTIC.search(k)}
        differing = {k: (whole[step][k], pieces[step].get(k)) for k in keys
                     if not (whole[step][k] == pieces[step].get(k)
                             or (math.isnan(whole[step][k]) and math.isnan(pieces[step].get(k, 0.0))))}
        assert not differing, (step, differing)
