"""The paper in miniature (verl_ext/mini): verdict rules, config checks, and the CI smoke run."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from verl_ext.core.checks import ConfigError
from verl_ext.mini import claims
from verl_ext.mini.pipeline import STAGES, Stages, compose, resolve_config, run_stage
from verl_ext.mini.report import read_metrics

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- verdict rules


def test_paired_bootstrap_on_known_inputs():
    import numpy as np

    # a constant difference has a degenerate interval at that value
    assert claims.paired_bootstrap(np.full((2, 10), 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    # one seed: the bootstrap over problems approaches mean ± 1.96 s/√P for many problems
    d = np.random.default_rng(1).normal(0.05, 0.3, size=(1, 900))
    mean, low, high = claims.paired_bootstrap(d, resamples=8000)
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert mean == pytest.approx(d.mean())
    assert low == pytest.approx(mean - half, abs=0.15 * half) and high == pytest.approx(mean + half, abs=0.15 * half)
    # seeds differ, problems do not: the interval spans the seeds' range (draws of 2 seeds: 0.1, 0.2 or 0.3)
    two = np.array([[0.1] * 8, [0.3] * 8])
    assert claims.paired_bootstrap(two) == pytest.approx((0.2, 0.1, 0.3))
    with pytest.raises(ValueError, match="at least 2 problems"):
        claims.paired_bootstrap([[0.1]])
    with pytest.raises(ValueError, match="finite"):
        claims.paired_bootstrap([[0.1, math.nan]])


def test_paired_accuracy_claim_follows_the_interval():
    base = [[0.2, 0.4, 0.6, 0.3]]  # one row: broadcast to every seed
    better = [[0.5, 0.7, 0.9, 0.6], [0.6, 0.8, 0.9, 0.5]]
    v = claims.paired_accuracy_claim("c", "rl", better, "base", base)
    assert v.status == claims.REPRODUCED and "2 training seed(s) × 4 problems" in v.evidence
    assert claims.paired_accuracy_claim("c", "base", base, "rl", better[:1]).status == claims.CONTRADICTED
    noisy = [[0.5, 0.1, 0.7, 0.2]]  # +0.3, −0.3, +0.1, −0.1: the interval contains 0
    assert claims.paired_accuracy_claim("c", "x", noisy, "base", base).status == claims.INCONCLUSIVE
    assert [claims.interval_status(*b) for b in ((0.1, 0.2), (-0.2, -0.1), (-0.1, 0.1))] == [
        claims.REPRODUCED, claims.CONTRADICTED, claims.INCONCLUSIVE]


def test_extrapolation_gamma_is_chosen_on_one_half_and_scored_on_the_other():
    import pandas as pd

    from verl_ext.mini.report import extrapolation_claim

    def rows(run, criterion, gamma, correct_by_problem):
        return [{"run": run, "criterion": criterion, "threshold": -0.3, "gamma": gamma, "problem_index": p,
                 "correct": c} for p, cs in enumerate(correct_by_problem) for c in cs]

    # 8 problems x 2 samples. γ=0.1 is best on the even problems (the choosing half) only;
    # γ=0.5 is best on the odd ones. The claim must pick γ=0.1 and score it on the odd problems.
    rl = rows("rl", "all", 0.0, [[1, 0]] * 8)
    g1 = rows("g1", "delta_logp", 0.1, [[1, 1], [0, 0]] * 4)
    g5 = rows("g5", "delta_logp", 0.5, [[0, 0], [1, 1]] * 4)
    v = extrapolation_claim(pd.DataFrame(rl + g1 + g5))
    assert "γ=0.1" in v.evidence and "chosen on 4 problems, scored on 4 others" in v.evidence
    assert v.status == claims.CONTRADICTED  # γ=0.1 scores 0 on the odd problems vs π_RL's 0.5
    assert extrapolation_claim(pd.DataFrame(g1 + g5)).status == claims.INCONCLUSIVE  # no π_RL run


def _run(criterion, ratio, per_problem):
    return {"criterion": criterion, "replace_ratio": ratio, "problem_accuracy": list(per_problem)}


def _accuracies(mean, problems=40, seed=0):
    """Per-problem fractions correct around `mean` (8 samples per problem)."""
    rng = np.random.default_rng(seed)
    return rng.binomial(8, np.clip(rng.normal(mean, 0.25, problems), 0, 1)) / 8


def test_identification_claim_compares_with_the_strongest_rival_per_matched_ratio():
    low, mid, high = _accuracies(0.3), _accuracies(0.5, seed=1), _accuracies(0.8, seed=2)
    runs = [
        _run("delta_logp", 0.05, high), _run("delta_logp", 0.2, high),
        _run("random", 0.06, low), _run("random", 0.21, low),
        _run("avg_kl", 0.04, mid), _run("avg_kl", 0.19, mid),
        _run("none", 0.0, low), _run("all", 1.0, high),
    ]
    v = claims.identification_claim(runs)
    assert v.status == claims.REPRODUCED and "above 0 at 2/2" in v.evidence and "vs avg_kl" in v.evidence
    # the same per-problem accuracies on both sides: a zero difference, an interval around 0
    runs[5] = _run("avg_kl", 0.19, high)
    v = claims.identification_claim(runs)
    assert v.status == claims.INCONCLUSIVE and "above 0 at 1/2" in v.evidence
    worse = [_run("delta_logp", 0.1, low), _run("random", 0.1, high)]
    assert claims.identification_claim(worse).status == claims.CONTRADICTED
    assert claims.identification_claim([_run("random", 0.1, low)]).status == claims.INCONCLUSIVE


def test_identification_interval_is_the_paired_bootstrap_over_problems():
    """The evidence's interval is paired_bootstrap of the per-problem differences (one 'seed' row)."""
    mine, rival = _accuracies(0.55, seed=3), _accuracies(0.5, seed=4)
    v = claims.identification_claim([_run("delta_logp", 0.1, mine), _run("entropy_base", 0.1, rival)])
    mean, low, high = claims.paired_bootstrap([mine - rival])
    assert f"{100 * mean:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]" in v.evidence


def test_low_probability_claim_pools_bins_by_count():
    bins = [
        {"bin_left": -0.1, "bin_right": 0.0, "count": 100, "mean_p_base": 0.9},
        {"bin_left": 0.0, "bin_right": 0.1, "count": 300, "mean_p_base": 0.7},
        {"bin_left": 0.5, "bin_right": 1.0, "count": 10, "mean_p_base": 0.2},
        {"bin_left": 1.0, "bin_right": 2.0, "count": 30, "mean_p_base": 0.1},
    ]
    v = claims.low_probability_claim(bins)
    assert v.status == claims.REPRODUCED
    assert "0.125 (40 tokens)" in v.evidence and "0.750 (400 tokens)" in v.evidence  # (2+3)/40, (90+210)/400
    bins[2]["mean_p_base"] = bins[3]["mean_p_base"] = 0.95
    assert claims.low_probability_claim(bins).status == claims.CONTRADICTED
    assert claims.low_probability_claim(bins[:2]).status == claims.INCONCLUSIVE


# ----------------------------------------------------------------------------- config and bookkeeping


def _cfg(*overrides):
    return resolve_config(compose("reproduce_mini", list(overrides)))


@pytest.mark.parametrize(
    "override, message",
    [
        ("schemes=[none,lowprobb]", "unknown weighting 'lowprobb'; valid choices: none, lowprob, ppl, dominate"),
        ("schemes=[]", "schemes is empty"),
        ("redo=[trian]", "unknown stage 'trian'; valid stages: base, data, train"),
        ("analysis.rl_scheme=ppl", "analysis.rl_scheme='ppl' is not trained"),
        ("seeds=[]", "seeds=[]: give a non-empty list of distinct integers"),
        ("seeds=[1,1]", "seeds=[1, 1]: give a non-empty list of distinct integers"),
        ("show_progress=no", "show_progress='no' is invalid; valid: true, false"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _cfg(override)


def test_smoke_shrinks_every_stage():
    full, smoke = _cfg(), _cfg("mini_size=smoke")
    assert smoke.train.steps < full.train.steps and smoke.task.eval_problems < full.task.eval_problems
    assert smoke.schemes == full.schemes == ["none", "lowprob"]
    assert (full.size, smoke.size) == ("full", "smoke")
    assert _cfg("mini_size=smoke", "train.steps=5").train.steps == 5, "a command-line override wins over the size"


def test_redo_recomputes_the_stage_and_everything_after(tmp_path):
    stages = Stages(tmp_path, [])
    for s in STAGES:
        stages.finish(s, {"x": 1})
    assert all(stages.done(s) for s in STAGES)
    redo = Stages(tmp_path, ["analysis", "report"])
    assert [s for s in STAGES if not redo.done(s)] == ["analysis", "replacement", "extrapolation", "report"]
    # a redone stage starts from an empty directory; a stage without a marker (crashed) keeps its files
    (tmp_path / "replacement" / "runs").mkdir()
    (tmp_path / "replacement" / "runs" / "shard-00000.parquet").write_text("old")
    (tmp_path / "report" / "DONE.json").unlink()
    (tmp_path / "report" / "partial").write_text("kept")
    assert run_stage(redo, "replacement", lambda: {"y": 2}) == {"y": 2, "seconds": pytest.approx(0, abs=1)}
    assert sorted(p.name for p in (tmp_path / "replacement").iterdir()) == ["DONE.json"]
    run_stage(redo, "report", lambda: None)
    assert (tmp_path / "report" / "partial").read_text() == "kept"
    assert run_stage(redo, "base", lambda: 1 / 0) == {"x": 1}  # not redone: kept, not run


def test_read_metrics_reads_verl_file_logger(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"step": 1, "data": {"a": 0.5, "flag": True, "text": "x"}})
        + "\n"
        + json.dumps({"step": 2, "data": {"a": 0.25, "b": 3}})
        + "\n"
    )
    assert read_metrics(path) == {"a": [(1, 0.5), (2, 0.25)], "b": [(2, 3.0)]}


# ----------------------------------------------------------------------------- the smoke run


def test_smoke_pipeline_runs_every_stage_and_reports(tmp_path):
    """scripts/reproduce_mini.sh mini_size=smoke: all stages, real verl DAPO (none, lowprob) through
    run_baselines.sh, and a report with every figure and a verdict per claim."""
    out = tmp_path / "mini"
    env = {**os.environ, "TINY_ASSETS_DIR": str(REPO / ".assets" / "tiny")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce_mini.sh"), "mini_size=smoke", f"output_dir={out}", "show_progress=false"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (out / "report.md").read_text()
    for figure in (
        "training_curves.png",
        "analysis_histograms.png",
        "prob_by_delta_bin.png",
        "replacement_curves.png",
        "extrapolation_curves.png",
    ):
        assert f"figures/{figure}" in report and (out / "figures" / figure).stat().st_size > 1000
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert len(verdicts) == 5  # RL > base, lowprob > DAPO, low-prob tokens, identification, extrapolation
    assert all(v["status"] in (claims.REPRODUCED, claims.CONTRADICTED, claims.INCONCLUSIVE) for v in verdicts)
    weights = {}
    for scheme in ("none", "lowprob"):
        metrics = read_metrics(out / "train" / f"{scheme}-seed0" / "metrics.jsonl")
        assert [s for s, _ in metrics["actor/grad_norm"]] == [1, 2]
        weights[scheme] = [w for _, w in metrics["actor/reweight/weight_mean"]]
    assert weights["none"] == [1.0, 1.0] and all(1.0 < w <= 1.2 for w in weights["lowprob"])  # Eq. 8, α=0.2
    assert OmegaConf.load(out / "config.yaml").size == "smoke"
    # a rerun keeps every finished stage
    again = subprocess.run(
        ["bash", str(REPO / "scripts" / "reproduce_mini.sh"), "mini_size=smoke", f"output_dir={out}", "show_progress=false"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stdout[-3000:]
    assert again.stdout.count("done earlier, kept") == len(STAGES)


def test_seed_band_is_the_t_interval_over_seeds_at_common_steps():
    from scipy import stats

    from verl_ext.mini.report import seed_band

    curves = [[(1, 0.2), (2, 0.4), (3, 0.5)], [(1, 0.3), (2, 0.5)], [(1, 0.1), (2, 0.6), (4, 0.9)]]
    steps, mean, low, high = seed_band(curves)
    assert steps.tolist() == [1, 2]  # only the steps every seed logged
    at2 = np.array([0.4, 0.5, 0.6])
    half = stats.t.ppf(0.975, 2) * at2.std(ddof=1) / math.sqrt(3)
    assert mean[1] == pytest.approx(0.5) and (low[1], high[1]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert seed_band(curves[:1]) is None and seed_band([[(1, 0.2)], [(2, 0.3)]]) is None


def test_training_curves_figure_with_seeds(tmp_path):
    from verl_ext.mini.report import plot_training_curves

    rng = np.random.default_rng(0)
    runs = {}
    for scheme, lift in (("none", 0.0), ("lowprob", 0.05)):
        for seed in (0, 1, 2):
            acc = [(s, 0.3 + lift + 0.01 * s + rng.normal(0, 0.02)) for s in range(0, 41, 10)]
            ent = [(s, 1.0 - 0.01 * s + rng.normal(0, 0.03)) for s in range(1, 41)]
            runs[(scheme, seed)] = {"val-core/tiny_arith/acc/mean@4": acc, "actor/entropy": ent,
                                    "response_length/mean": ent, "actor/reweight/weight_mean": ent}
    path = plot_training_curves(runs, 4, tmp_path / "curves.png", caption="synthetic: 2 schemes × 3 seeds")
    assert path.stat().st_size > 10_000
