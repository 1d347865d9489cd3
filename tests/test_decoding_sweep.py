"""The criterion × threshold sweep (`verl_ext.decoding.sweep`) end to end on the tiny CPU assets.

One small in-process sweep (4 problems × 2 samples, 8 new tokens, `none`/`all` + 2 Δlog p
thresholds, 2 shards per run) is shared by the tests; they check its table against the raw shard
rows, its resuming, the shell script (which must reproduce the same table), the error on a bad
criterion name, the Ray actor pool (same table again), the `sweep.thresholds` override and what
an offline wandb run receives (wandb is off everywhere else, whatever the environment says).
Everything runs with one torch thread so that the three execution paths are bit-comparable.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from verl_ext import wandb_logging
from verl_ext.decoding import sweep
from verl_ext.jobs import ResumeError, WorkerPool, use_ray

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
NUM_PROBLEMS, N_SAMPLES, SHARD_PROBLEMS = 4, 2, 2
TAUS = (-0.05, -0.5)  # -0.05: well clear of the tiny pair's Δlog p values (-0.035, -0.099), which move ~1e-6 between CPUs
SIZES = [
    f"n_samples={N_SAMPLES}", f"data.max_problems={NUM_PROBLEMS}", f"shard_problems={SHARD_PROBLEMS}",
    "decoding.max_new_tokens=8", "pass_ks=[1,2]", "show_progress=false", "wandb.enable=false",
]
TINY = [*SIZES, f"sweep.thresholds={{delta_logp:[{','.join(map(str, TAUS))}]}}"]
RUNS = {("none", 0.0), ("all", 0.0)} | {("delta_logp", t) for t in TAUS}
SHARDS_PER_RUN = NUM_PROBLEMS // SHARD_PROBLEMS


def make_cfg(output_dir, *overrides, config="token_replacement", sizes=TINY):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config, overrides=[f"output_dir={output_dir}", *sizes, "ray.enabled=false", *overrides])


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, one_thread):
    """(output dir, returned summary, seconds) of the reference in-process sweep."""
    out = tmp_path_factory.mktemp("sweep")
    t0 = time.perf_counter()
    summary = sweep.run(make_cfg(out))
    return out, summary, time.perf_counter() - t0


def shard_files(out: Path) -> list[Path]:
    return sorted((out / "runs").glob("*/shard-*.parquet"))


def table(summary) -> pd.DataFrame:
    return pd.DataFrame(summary).sort_values(["criterion", "threshold"]).reset_index(drop=True)


def shard_frames(out: Path) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(out)): pd.read_parquet(p) for p in shard_files(out)}


def all_rows(out: Path) -> pd.DataFrame:
    rows = pd.concat([pd.read_parquet(p) for p in shard_files(out)], ignore_index=True)
    return rows.sort_values(["run", "problem_index", "sample_index"]).reset_index(drop=True)


def assert_same_shards(a: Path, b: Path):
    fa, fb = shard_frames(a), shard_frames(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        pd.testing.assert_frame_equal(fa[name], fb[name], obj=name)


# ----------------------------------------------------------------------------- 1. in-process sweep


def test_results_table(swept):
    out, summary, seconds = swept
    print(f"in-process sweep: {seconds:.1f}s")
    df = table(summary)
    assert sorted(zip(df["criterion"], df["threshold"])) == sorted(RUNS)  # one row per (criterion, τ)
    assert (df["num_problems"] == NUM_PROBLEMS).all() and (df["samples_per_problem"] == N_SAMPLES).all()
    assert df["accuracy"].between(0, 1).all() and df["replace_ratio"].between(0, 1).all()
    by = df.set_index(["criterion", "threshold"])
    assert by.loc[("none", 0.0), "replace_ratio"] == 0.0
    assert by.loc[("all", 0.0), "replace_ratio"] == 1.0  # action=replace: `all` resamples every step
    # Δlog p gating fires at some steps but not at all of them (else the run would be a baseline)
    assert 0 < by.loc[("delta_logp", TAUS[0]), "replace_ratio"] < 1
    pd.testing.assert_series_equal(df["pass@1"], df["accuracy"], check_names=False)  # unbiased Pass@1 = Avg@n
    assert (df["pass@2"] >= df["accuracy"] - 1e-12).all()

    # the table against the raw shard rows
    shards = shard_files(out)
    assert len(shards) == len(RUNS) * SHARDS_PER_RUN
    rows = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    for (crit, tau), g in rows.groupby(["criterion", "threshold"]):
        assert sorted(zip(g["problem_index"], g["sample_index"])) == [
            (p, s) for p in range(NUM_PROBLEMS) for s in range(N_SAMPLES)]
        assert by.loc[(crit, tau), "accuracy"] == pytest.approx(g["correct"].mean(), abs=1e-12)
        assert by.loc[(crit, tau), "replace_ratio"] == pytest.approx(g["replace_ratio"].mean(), abs=1e-12)
        ratio = g["n_replaced"] / g["response_length"].clip(lower=1)
        assert (g["replace_ratio"] - ratio).abs().max() < 1e-12
    assert (rows.loc[rows["criterion"] == "none", "n_replaced"] == 0).all()
    every = rows[rows["criterion"] == "all"]
    assert (every["n_replaced"] == every["response_length"]).all()
    # grading: the tiny task's answers are integers, so a correct answer is the ground truth verbatim
    assert (rows["correct"] == (rows["pred"].astype(str) == rows["ground_truth"].astype(str))).all()
    assert rows["response_length"].between(1, 8).all()

    # JSON and parquet hold the same table, the same as the one returned
    from_json = pd.DataFrame(json.loads((out / "results.json").read_text()))
    from_parquet = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(from_json, from_parquet, check_dtype=False)
    pd.testing.assert_frame_equal(table(from_parquet.to_dict("records")), df, check_dtype=False)

    png = (out / "accuracy_vs_replace_ratio.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


# ----------------------------------------------------------------------------- 2. resuming


def test_resume_recomputes_only_missing_shards(swept, tmp_path, monkeypatch, capsys):
    src, summary, _ = swept
    out = tmp_path / "copy"
    shutil.copytree(src, out)  # copy2 keeps the mtimes
    calls = []
    original = sweep.ShardWorker.run_shard

    def counting(self, shard):
        calls.append((shard.spec.name, shard.start, shard.stop))
        return original(self, shard)

    monkeypatch.setattr(sweep.ShardWorker, "run_shard", counting)
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files(out)}
    n = len(mtimes)

    again = sweep.run(make_cfg(out))
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in shard_files(out)} == mtimes
    assert f"{n} shards, {n} already done" in capsys.readouterr().out
    pd.testing.assert_frame_equal(table(again), table(summary))

    victim = out / "runs" / f"delta_logp_tau{TAUS[0]:+.4g}_gamma0_seed0" / f"shard-{SHARD_PROBLEMS:05d}.parquet"
    before = pd.read_parquet(victim)
    victim.unlink()
    again = sweep.run(make_cfg(out))
    assert calls == [(victim.parent.name, SHARD_PROBLEMS, 2 * SHARD_PROBLEMS)]
    assert f"{n} shards, {n - 1} already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in shard_files(out) if p != victim} == {
        p: t for p, t in mtimes.items() if p != victim}
    pd.testing.assert_frame_equal(pd.read_parquet(victim), before)  # recomputed bit-identically
    pd.testing.assert_frame_equal(table(again), table(summary))


def test_resume_refuses_shards_of_other_settings_but_not_of_other_speed_settings(swept, tmp_path):
    src, summary, _ = swept
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    # the experimental speculative rounds drafted by the proposer change speed only, whatever the
    # draft length: the shards on disk (step by step, the default) are still this sweep's
    pd.testing.assert_frame_equal(
        table(sweep.run(make_cfg(out, "decoding.speculative=true", "decoding.draft_len=2"))), table(summary))
    with pytest.raises(ResumeError, match=r"other settings \(decoding.coupling: \"maximal\" -> \"independent\"\)"
                                          r".*delete .*runs to start over"):
        sweep.run(make_cfg(out, "decoding.coupling=independent"))
    with pytest.raises(ResumeError, match="n_samples: 2 -> 3"):
        sweep.run(make_cfg(out, "n_samples=3"))
    with pytest.raises(ResumeError, match='decoding.draft_model: "proposer" -> "scorer"'):  # same law, other tokens
        sweep.run(make_cfg(out, "decoding.speculative=true", "decoding.draft_model=scorer"))
    # without speculative rounds (the default) draft_model is unused: still this sweep's shards
    pd.testing.assert_frame_equal(table(sweep.run(make_cfg(out, "decoding.draft_model=scorer"))), table(summary))
    pd.testing.assert_frame_equal(
        table(sweep.run(make_cfg(out, "decoding.static_cache=true", "decoding.draft_model=scorer"))), table(summary))
    # a sweep folder from before manifest.json: its config.yaml says what its shards hold
    (out / "manifest.json").unlink()
    with pytest.raises(ResumeError, match="n_samples: 2 -> 3"):
        sweep.run(make_cfg(out, "n_samples=3"))


def test_experimental_speculative_rounds_give_the_same_sweep(swept, tmp_path, monkeypatch):
    """`decoding.speculative=true` (experimental, proposer drafts) decodes in rounds of drafted
    tokens: the step loop's tokens, so the same shards, from scratch."""
    from verl_ext.decoding.experimental import SpeculativeTwoModelDecoder

    made, init = [], SpeculativeTwoModelDecoder.__init__
    monkeypatch.setattr(SpeculativeTwoModelDecoder, "__init__",
                        lambda self, *a, **kw: made.append(kw["draft_len"]) or init(self, *a, **kw))
    src, summary, _ = swept
    out = tmp_path / "speculative"
    pd.testing.assert_frame_equal(table(sweep.run(make_cfg(out, "decoding.speculative=true"))), table(summary))
    assert made and set(made) == {4}  # every shard decoded in rounds of the config's draft length
    pd.testing.assert_frame_equal(all_rows(out).drop(columns=["run"], errors="ignore"),
                                  all_rows(src).drop(columns=["run"], errors="ignore"))


def test_static_caches_give_the_same_sweep(swept, tmp_path):
    """`decoding.static_cache=true` decodes the step loop on static caches: the same shards, from scratch."""
    src, summary, _ = swept
    out = tmp_path / "static"
    pd.testing.assert_frame_equal(table(sweep.run(make_cfg(out, "decoding.static_cache=true"))), table(summary))
    pd.testing.assert_frame_equal(all_rows(out).drop(columns=["run"], errors="ignore"),
                                  all_rows(src).drop(columns=["run"], errors="ignore"))


# ----------------------------------------------------------------------------- 3. the script


def run_script(*args, script="run_token_replacement.sh"):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    print(f"{script}: {time.perf_counter() - t0:.1f}s")
    return proc.returncode, proc.stdout, proc.stderr


def test_script_reproduces_in_process_sweep(swept, tmp_path):
    src, summary, _ = swept
    out = tmp_path / "script"
    rc, stdout, stderr = run_script(f"output_dir={out}", *TINY)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    assert f"{len(RUNS) * SHARDS_PER_RUN} shards, 0 already done" in stdout
    assert (out / "accuracy_vs_replace_ratio.png").stat().st_size > 0
    pd.testing.assert_frame_equal(table(json.loads((out / "results.json").read_text())), table(summary))
    assert_same_shards(out, src)


def test_bad_criterion_lists_valid_ones(tmp_path):
    from verl_ext.decoding.criteria import CRITERIA

    valid = ", ".join(CRITERIA)
    # in-process: refused before any model is loaded or anything is written
    for bad in ("sweep.thresholds={delta_lgop:[-0.1]}", "sweep.criteria=[delta_lgop]"):
        with pytest.raises(ValueError, match=re.escape(f"unknown criterion 'delta_lgop'; valid criteria: {valid}")):
            sweep.run(make_cfg(tmp_path / "bad", bad, sizes=SIZES))
    assert not (tmp_path / "bad").exists()
    # through the script: a non-zero exit and the same message
    out = tmp_path / "bad_script"
    rc, stdout, stderr = run_script(f"output_dir={out}", *SIZES, "sweep.thresholds={delta_lgop:[-0.1]}")
    assert rc != 0
    assert f"unknown criterion 'delta_lgop'; valid criteria: {valid}" in stdout + stderr
    assert not (out / "runs").exists() and not (out / "config.yaml").exists()


@pytest.mark.parametrize(
    "config,override,message",
    [
        ("token_replacement", "decoding.temperature=nan", "decoding.temperature=nan is invalid; valid: a number > 0"),
        ("token_replacement", "decoding.top_p=1.5", "decoding.top_p=1.5 is invalid; valid: a number in (0, 1]"),
        ("token_replacement", "decoding.draft_len=0", "decoding.draft_len=0 is invalid; valid: an integer >= 1, or auto"),
        ("token_replacement", "decoding.draft_model=rl", "decoding.draft_model='rl' is invalid; valid: proposer, scorer"),
        ("extrapolation", "decoding.speculative=maybe", "decoding.speculative='maybe' is invalid; valid: true, false"),
        ("token_replacement", "decoding.static_cache=maybe", "decoding.static_cache='maybe' is invalid; valid: true, false"),
        ("token_replacement", "sweep.baselines=no", "sweep.baselines='no' is invalid; valid: true, false"),
        ("token_replacement", "sweep.criteria=delta_logp", "sweep.criteria='delta_logp' is invalid; valid: a list, e.g. [a, b]"),
        ("token_replacement", "sweep.calibrate_criteria=avg_kl", "sweep.calibrate_criteria='avg_kl' is invalid; valid: a list"),
        ("extrapolation", "data.use_chat_template=1", "data.use_chat_template=1 is invalid; valid: true, false"),
        ("token_replacement", "show_progress=yes", "show_progress='yes' is invalid; valid: true, false"),
        ("token_replacement", "decoding.coupling=greedy", "decoding.coupling='greedy' is invalid; valid: maximal, independent"),
        ("token_replacement", "sweep.thresholds={delta_logp:[nan]}", "sweep.thresholds.delta_logp[0]=nan is invalid"),
        ("token_replacement", "sweep.thresholds={delta_logp:[]}", "sweep.thresholds.delta_logp is empty"),
        ("token_replacement", "sweep.thresholds={random:[1.5]}", "sweep.thresholds.random[0]=1.5 is invalid; valid: a number in [0, 1]"),
        ("token_replacement", "sweep.thresholds={avg_kl:[-0.1]}", "sweep.thresholds.avg_kl[0]=-0.1 is invalid; valid: a number >= 0"),
        ("token_replacement", "sweep.target_ratios=[1.2]", "sweep.target_ratios[0]=1.2 is invalid; valid: a number in (0, 1)"),
        ("token_replacement", "grading.timeout_s=nan", "grading.timeout_s=nan is invalid; valid: a number > 0"),
        ("token_replacement", "pass_ks=[1,64]", "pass_ks[1]=64 is invalid; valid: an integer in [1, 2]"),
        ("token_replacement", "seeds=[]", "seeds is empty"),
        ("token_replacement", "models.base=/nonexistent/base", "models.base='/nonexistent/base': no such model directory"),
        ("extrapolation", "sweep.gammas=[nan]", "sweep.gammas[0]=nan is invalid; valid: a number >= 0"),
        ("extrapolation", "sweep.gammas=[-0.1]", "sweep.gammas[0]=-0.1 is invalid; valid: a number >= 0"),
        ("extrapolation", "sweep.gammas=[]", "sweep.gammas is empty"),
    ],
)
def test_bad_settings_are_refused_before_models_load(tmp_path, config, override, message):
    from verl_ext.core.checks import ConfigError

    out = tmp_path / "bad"
    with pytest.raises(ConfigError) as err:
        sweep.run(make_cfg(out, override, config=config, sizes=SIZES))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (out / "config.yaml").exists()


def test_rows_without_ground_truth_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": "1+1"}], "data_source": "x",
             "reward_model": {"style": "rule", "ground_truth": gt}} for gt in ("2", "")]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(ValueError, match=r"row 2 \(counted from 1\): reward_model.ground_truth is empty"):
        sweep.validate(make_cfg(tmp_path / "o", f"data.files=[{path}]", sizes=SIZES))


def test_script_error_is_one_line_exit_2(tmp_path):
    rc, _, stderr = run_script(f"output_dir={tmp_path}", "sweep.gammas=[-0.1]", script="run_extrapolation.sh")
    assert rc == 2
    assert stderr.strip().splitlines()[-1] == (
        "[extrapolation] error: sweep.gammas[0]=-0.1 is invalid; valid: a number >= 0")
    assert "Traceback" not in stderr and "HYDRA_FULL_ERROR" not in stderr


# ----------------------------------------------------------------------------- 4. Ray


def test_ray_pool_matches_in_process(swept, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    src, summary, _ = swept
    out = tmp_path / "ray"
    pools, init = [], WorkerPool.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(WorkerPool, "__init__", keep)
    pids: list[int] = []
    monkeypatch.setattr(WorkerPool, "close", lambda self: pids.extend(ray.get([a.pid.remote() for a in self._actors]))
                        or WorkerPool.restart(self))
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # one problem per shard (the reference has two): results must not depend on the sharding either
        cfg = make_cfg(out, "ray.enabled=true", "ray.num_workers=2", "shard_problems=1")
        assert use_ray(cfg.ray)
        got = sweep.run(cfg)
    finally:
        ray.shutdown()
    print(f"ray sweep: {time.perf_counter() - t0:.1f}s")
    assert pools[0].ray and len(set(pids)) == 2 and os.getpid() not in pids
    assert len(shard_files(out)) == len(RUNS) * NUM_PROBLEMS
    pd.testing.assert_frame_equal(table(got), table(summary))
    pd.testing.assert_frame_equal(all_rows(out), all_rows(src))


# ----------------------------------------------------------------------------- 5. thresholds override


@pytest.mark.parametrize("config", ["token_replacement", "extrapolation"])
def test_thresholds_override_replaces_defaults(config, tmp_path):
    def plan(*overrides):
        cfg = make_cfg(tmp_path, *overrides, config=config, sizes=SIZES)
        sweep.validate(cfg)
        return {(r.criterion, r.threshold) for r in sweep.plan_runs(cfg)}

    default = plan()  # sweep.thresholds is null: the config's default_thresholds
    assert {c for c, _ in default} >= {"none", "all", "delta_logp"}
    if config == "token_replacement":
        assert {c for c, _ in default} == {"none", "all", "delta_logp", "avg_kl", "entropy_base", "random"}
        assert len(default) == 2 + 16
    # a dict on the command line replaces the whole table (it used to merge into the defaults)
    assert plan("sweep.thresholds={avg_kl:[0.2,0.4]}") == {("none", 0.0), ("all", 0.0), ("avg_kl", 0.2), ("avg_kl", 0.4)}
    assert plan("sweep.thresholds={random:0.3}", "sweep.baselines=false") == {("random", 0.3)}
    assert plan("+sweep.thresholds.entropy_rl=[1.5]", "sweep.baselines=false") == {("entropy_rl", 1.5)}
    # the defaults can still be edited one criterion at a time
    assert ("delta_logp", -0.7) in plan("sweep.default_thresholds.delta_logp=[-0.7]")
    with pytest.raises(sweep.SweepError, match="nothing to sweep"):
        plan("sweep.thresholds={}")


# ----------------------------------------------------------------------------- 6. wandb


def logged_table(run_dir: Path, row: dict, key: str) -> pd.DataFrame:
    """The wandb.Table logged under `key`, read back from the offline run's media file."""
    data = json.loads((run_dir / "files" / row[f"{key}/path"]).read_text())
    return pd.DataFrame(data["data"], columns=data["columns"])


def test_wandb_run_holds_table_plot_curves_and_numbers(swept, tmp_path, offline_wandb_runs, read_wandb_history):
    src, summary, _ = swept
    out = tmp_path / "logged"
    shutil.copytree(src, out)  # every shard is done: this run only aggregates, plots and logs
    started = offline_wandb_runs(sweep, group="sweep-test")
    t0 = time.perf_counter()
    got = sweep.run(make_cfg(out, "wandb.enable=auto"))  # auto: on, because WANDB_MODE is set
    print(f"sweep logged to wandb: {time.perf_counter() - t0:.1f}s")
    pd.testing.assert_frame_equal(table(got), table(summary))

    # the training's project (trainer.project_name of the recipe) and group (WANDB_RUN_GROUP)
    (run,) = started
    recipe = OmegaConf.load(CONFIGS / "dapo_reweight.yaml")
    assert run.project == recipe.trainer.project_name
    assert (run.group, run.name, run.job_type) == ("sweep-test", "token_replacement-logged", "decoding")
    assert run.config["sweep"]["thresholds"] == {"delta_logp": list(TAUS)} and run.config["output_dir"] == str(out)

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")  # WANDB_DIR, not the output folder
    (row,) = read_wandb_history(run_dir)
    assert row["sweep/results/_type"] == "table-file" and row["sweep/results/nrows"] == len(RUNS)
    pd.testing.assert_frame_equal(table(logged_table(run_dir, row, "sweep/results").to_dict("records")),
                                  table(summary), check_dtype=False)
    assert row["sweep/accuracy_vs_replace_ratio/_type"] == "image-file"
    png = run_dir / "files" / row["sweep/accuracy_vs_replace_ratio/path"]
    assert png.read_bytes() == (out / "accuracy_vs_replace_ratio.png").read_bytes()

    # wandb's line chart: the criterion's points, and π_B / π_RL drawn across the replace-ratio axis
    lines = logged_table(run_dir, row, "sweep/accuracy_vs_replace_ratio_lines_table")
    points = {key: sorted(zip(g["step"], g["lineVal"])) for key, g in lines.groupby("lineKey")}
    by = table(summary).set_index(["criterion", "threshold"])
    assert set(points) == {"delta_logp", "π_B (base)", "π_RL"}
    expected = sorted((by.loc[("delta_logp", t), "replace_ratio"], 100 * by.loc[("delta_logp", t), "accuracy"])
                      for t in TAUS)
    assert [v for xy in points["delta_logp"] for v in xy] == pytest.approx([v for xy in expected for v in xy])
    for label, criterion in (("π_B (base)", "none"), ("π_RL", "all")):
        level = 100 * by.loc[(criterion, 0.0), "accuracy"]
        assert [v for xy in points[label] for v in xy] == pytest.approx([0.0, level, 1.0, level])

    for r in summary:  # the per-run numbers
        for metric in ("accuracy", "replace_ratio", "mean_response_length", "pass@1", "pass@2"):
            assert row[f"sweep/{r['run']}/{metric}"] == pytest.approx(r[metric]), (r["run"], metric)


def test_bad_wandb_enable_names_value_and_choices(tmp_path):
    # refused before any model is loaded or anything is written
    with pytest.raises(ValueError, match=re.escape("wandb.enable='bogus' is invalid; valid choices: auto, true, false")):
        sweep.run(make_cfg(tmp_path / "bad", "wandb.enable=bogus", sizes=SIZES))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, False), ({"WANDB_MODE": "offline"}, True), ({"WANDB_API_KEY": "x" * 40}, True), ({"WANDB_MODE": ""}, False),
])
def test_wandb_auto_follows_training_rule(env, expected, monkeypatch):
    # training logs to wandb exactly when WANDB_API_KEY or WANDB_MODE is non-empty (run_dapo_reweight.sh)
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_logging.wandb_enabled("auto") is expected
    assert wandb_logging.wandb_enabled(True) is True and wandb_logging.wandb_enabled(False) is False


def test_curves_have_one_series_per_label_across_gammas_and_seeds():
    # what the PNG and the wandb line chart draw for an extrapolation sweep with two γ and two seeds
    rows = [
        {"criterion": c, "threshold": t, "gamma": gamma, "seed": seed, "accuracy": acc + seed / 10, "replace_ratio": r}
        for gamma in (0.05, 0.1) for seed in (0, 1)
        for c, t, acc, r in (("none", 0.0, 0.3, 0.0), ("all", 0.0, 0.4 + gamma, 1.0),
                             ("delta_logp", -0.1, 0.5, 0.2 + gamma), ("delta_logp", -0.3, 0.45, 0.1))
    ]
    lines, refs = sweep.curves(rows)
    assert lines == [("delta_logp (γ=0.05)", pytest.approx([0.1, 0.25]), pytest.approx([50.0, 55.0])),
                     ("delta_logp (γ=0.1)", pytest.approx([0.1, 0.3]), pytest.approx([50.0, 55.0]))]
    # π_B once (it does not depend on γ), π_Extra per γ: every wandb series key is distinct
    assert refs == [("π_B (base)", pytest.approx(35.0), "gray"), ("π_Extra (γ=0.05)", pytest.approx(50.0), "black"),
                    ("π_Extra (γ=0.1)", pytest.approx(55.0), "black")]
    replace = [{**r, "gamma": 0.0} for r in rows if r["gamma"] == 0.05]
    assert [label for label, _, _ in sweep.curves(replace)[1]] == ["π_B (base)", "π_RL"]


# ----------------------------------------------------------------------------- figure: errors, references, caption


def test_accuracy_standard_error_and_the_pi_rl_reference(tmp_path):
    import math
    import statistics

    # 3 problems x 4 samples: correct fractions 1/4, 2/4, 4/4 -> SE = stdev / sqrt(3)
    rows = [
        {"run": "r", "criterion": "delta_logp", "threshold": -0.1, "gamma": 0.1, "seed": 0, "data_source": "d",
         "prompt_id": p, "correct": i < c, "replace_ratio": 0.1, "response_length": 5}
        for p, c in (("a", 1), ("b", 2), ("c", 4)) for i in range(4)
    ]
    (row,) = sweep.summarize(rows, [])
    fractions = [0.25, 0.5, 1.0]
    assert row["accuracy"] == pytest.approx(sum(fractions) / 3)
    assert row["accuracy_se"] == pytest.approx(statistics.stdev(fractions) / math.sqrt(3))
    # two seeds: the conservative mean of their errors, in %, keyed like the curves' labels
    second = {**row, "seed": 1, "accuracy_se": 0.1}
    assert sweep.curve_errors([row, second]) == {"delta_logp": [pytest.approx(100 * (row["accuracy_se"] + 0.1) / 2)]}

    # an extrapolation sweep also runs π_RL itself (π_Extra at γ = 0), once per seed
    cfg = make_cfg(tmp_path, "sweep.gammas=[0.05,0.1]", config="extrapolation")
    runs = sweep.plan_runs(cfg)
    assert [(r.criterion, r.gamma) for r in runs if r.criterion == "all"] == [("all", 0.05), ("all", 0.0), ("all", 0.1)]
    caption = sweep.sweep_caption(cfg, [row])
    assert "STAND-IN" in caption and "3 problems × 4 samples × 1 seed(s)" in caption
