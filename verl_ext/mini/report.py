"""`report.md` of the miniature: figures (PNG), tables and one verdict per claim of the paper."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from verl_ext.mini import claims, run_name
from verl_ext.tiny_assets import DATA_SOURCE

CURVE_PANELS = (  # (metric key in verl's logs, title); the validation key depends on val_samples
    ("val-core/{source}/acc/mean@{n}", "validation accuracy (mean@{n})"),
    ("actor/entropy", "policy entropy"),
    ("response_length/mean", "response length (tokens)"),
    ("actor/reweight/weight_mean", "mean advantage weight"),
)


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """verl file-logger JSONL -> metric -> [(step, value)] (numbers only)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key, value in record["data"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, []).append((int(record["step"]), float(value)))
    return series


def seed_band(curves: list[list[tuple[int, float]]], level: float = 0.95):
    """(steps, mean, low, high) over training seeds at the steps every seed logged: the mean and its
    `level` t-interval, mean ± t_{(1+level)/2, S−1} · sd / √S with S seeds (sd with S − 1). None when
    fewer than 2 seeds logged a common step."""
    from scipy import stats

    common = sorted(set.intersection(*(set(dict(c)) for c in curves))) if len(curves) >= 2 else []
    if not common:
        return None
    values = np.array([[dict(c)[step] for step in common] for c in curves])  # seeds × steps
    mean, n = values.mean(0), values.shape[0]
    half = stats.t.ppf((1 + level) / 2, n - 1) * values.std(0, ddof=1) / np.sqrt(n)
    return np.array(common), mean, mean - half, mean + half


def plot_training_curves(
    runs: dict[tuple[str, int], dict[str, list[tuple[int, float]]]], val_samples: int, path: Path, caption: str = ""
) -> Path:
    """One panel per metric, one colour per weighting scheme: every training seed's curve (thin), and
    with two or more seeds their mean (thick) with a shaded 95% t-interval over seeds (`seed_band`).
    `runs`: (scheme, seed) -> verl file-logger series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(dict.fromkeys(scheme for scheme, _ in runs))
    seeds = sorted({seed for _, seed in runs})
    colours = {s: f"C{i}" for i, s in enumerate(schemes)}
    several = len(seeds) >= 2
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.6), layout="constrained")
    for ax, (key, title) in zip(axes, CURVE_PANELS):
        key = key.format(source=DATA_SOURCE, n=val_samples)
        marker = "o" if key.startswith("val") else None
        for scheme in schemes:
            curves = [runs[(scheme, seed)].get(key, []) for seed in seeds if (scheme, seed) in runs]
            curves = [c for c in curves if c]
            for curve in curves:
                ax.plot(*zip(*curve), marker=marker, ms=2 if several else 3, color=colours[scheme],
                        lw=0.8 if several else 1.5, alpha=0.45 if several else 1.0,
                        label=None if several else scheme)
            band = seed_band(curves)
            if band is not None:
                steps, mean, low, high = band
                ax.fill_between(steps, low, high, color=colours[scheme], alpha=0.18, lw=0)
                ax.plot(steps, mean, marker=marker, ms=3, color=colours[scheme], lw=2,
                        label=f"{scheme}: mean of {len(curves)} seeds, 95% band")
        ax.set_title(title.format(n=val_samples), fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if several:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="gray", lw=0.8, alpha=0.6))
        labels.append("one training seed")
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    if caption:
        fig.suptitle(caption, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_rows(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def sweep_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k.startswith("pass@")] if rows else []
    return markdown_rows(
        ["run", "criterion", "τ", "γ", "replace ratio", "accuracy", *keys],
        [
            [
                r["run"],
                r["criterion"],
                r["threshold"],
                r["gamma"],
                r["replace_ratio"],
                r["accuracy"],
                *[r[k] for k in keys],
            ]
            for r in rows
        ],
    )


def problem_accuracy(df) -> dict:
    """run -> {problem_index: fraction of its samples graded correct} from per-sample sweep rows."""
    return {run: g.groupby("problem_index")["correct"].mean().to_dict() for run, g in df.groupby("run")}


def extrapolation_claim(df) -> claims.Verdict:
    """The best (γ > 0, τ) at the Δlog p gate vs sampling from π_RL (the sweep's `all` run at γ = 0, the
    same sampler), chosen on the even-ranked problems and scored on the odd-ranked ones (choosing and
    scoring on the same problems would bias the difference upwards). `df`: the sweep's per-sample rows."""
    claim = "Selective extrapolation (Eq. 7, γ > 0) beats sampling from the RL model"
    runs = df.drop_duplicates("run").set_index("run")
    rl = [r for r, x in runs.iterrows() if x["criterion"] == "all" and x["gamma"] == 0.0]
    extra = [r for r, x in runs.iterrows() if x["criterion"] == "delta_logp" and x["gamma"] > 0]
    problems = sorted(df["problem_index"].unique())
    if not rl or not extra or len(problems) < 4:
        return claims.Verdict(claim, claims.INCONCLUSIVE, "the sweep has no π_RL run, no γ > 0 run or < 4 problems")
    choose, score = problems[0::2], problems[1::2]
    acc = problem_accuracy(df)
    best = max(extra, key=lambda r: sum(acc[r][p] for p in choose))
    verdict = claims.paired_accuracy_claim(
        claim, f"γ={runs.loc[best, 'gamma']:g}, τ={runs.loc[best, 'threshold']:g}", [[acc[best][p] for p in score]],
        "π_RL", [[acc[rl[0]][p] for p in score]],
    )
    return claims.Verdict(
        claim, verdict.status,
        f"best of {len(extra)} (γ, τ) chosen on {len(choose)} problems, scored on {len(score)} others: {verdict.evidence}",
    )


def calibrated_runs(summary: list[dict], df) -> list[dict]:
    """The replacement sweep's criterion runs (not the none/all baselines) with their fractions correct
    per problem, problems in one order for every run (`claims.identification_claim`)."""
    acc = problem_accuracy(df)
    problems = sorted(df["problem_index"].unique())
    return [
        {**row, "problem_accuracy": [acc[row["run"]][p] for p in problems]}
        for row in summary
        if row["criterion"] not in ("none", "all")
    ]


def per_problem_accuracy(path: Path) -> dict[str, float]:
    """`evaluate`'s per_problem.jsonl -> {prompt_id: fraction correct}."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["prompt_id"]: sum(r["correct"]) / len(r["correct"]) for r in rows}


def accuracy_matrix(out: Path, names: list[str]):
    """seeds × problems fractions correct of the evaluated models `names` (one row each), problems in a
    fixed order (those every model was graded on)."""
    per_model = [per_problem_accuracy(out / "evaluate" / name / "per_problem.jsonl") for name in names]
    problems = sorted(set.intersection(*(set(m) for m in per_model)))
    return [[m[p] for p in problems] for m in per_model]


def copy_figure(src: str | Path, figures: Path, name: str) -> str:
    dst = figures / name
    shutil.copyfile(src, dst)
    return f"figures/{name}"


def write_report(cfg: DictConfig, out: Path) -> Path:
    """Read every stage's outputs under `out` and write `out/report.md` and `out/figures/`."""
    import pandas as pd

    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    stage_info = {
        s: json.loads((out / s / "DONE.json").read_text())
        for s in ("base", "data", "train", "evaluate", "analysis", "replacement", "extrapolation")
    }

    runs = {(s, k): read_metrics(out / "train" / run_name(s, k) / "metrics.jsonl") for k in cfg.seeds for s in cfg.schemes}
    curves = plot_training_curves(
        runs, cfg.train.val_samples, figures / "training_curves.png",
        caption=f"tiny Qwen2 (SFT base), {cfg.train.steps} DAPO steps, training seeds {list(cfg.seeds)}; "
                f"validation on {cfg.task.eval_problems} problems × {cfg.train.val_samples} samples",
    )
    evaluation = json.loads((out / "evaluate" / "table.json").read_text())
    replacement = json.loads((out / "replacement" / "results.json").read_text())
    extrapolation = json.loads((out / "extrapolation" / "results.json").read_text())
    extrapolation_rows = pd.concat([pd.read_parquet(f) for f in sorted((out / "extrapolation" / "runs").glob("*/*.parquet"))])
    bins = pd.read_csv(out / "analysis" / "prob_by_delta_bin.csv")
    rl_gen = bins[bins["generator"] == "rl"].to_dict("records")
    summary = json.loads((out / "analysis" / "summary.json").read_text())

    k = cfg.evaluate.samples

    def trained(scheme):
        return [f"rl-{run_name(scheme, seed)}" for seed in cfg.seeds]

    dapo = accuracy_matrix(out, trained("none"))
    verdicts = [claims.paired_accuracy_claim(
        "RLVR (DAPO) improves the base model", "DAPO", dapo, "base", accuracy_matrix(out, ["base"]),
    )]
    for scheme in cfg.schemes:
        if scheme != "none":
            verdicts.append(claims.paired_accuracy_claim(
                f"`{scheme}` weighting beats plain DAPO" + (" (the paper's Eq. 8)" if scheme == "lowprob" else ""),
                scheme, accuracy_matrix(out, trained(scheme)), "DAPO", dapo,
            ))
    verdicts.append(claims.low_probability_claim(rl_gen))
    replacement_rows = pd.concat([pd.read_parquet(f) for f in sorted((out / "replacement" / "runs").glob("*/*.parquet"))])
    verdicts.append(claims.identification_claim(calibrated_runs(replacement, replacement_rows)))
    verdicts.append(extrapolation_claim(extrapolation_rows))

    seconds = {s: i.get("seconds", 0.0) for s, i in stage_info.items()}
    md = [
        "# The paper in miniature\n",
        "Huang et al. 2026, *On the Direction of RLVR Updates for LLM Reasoning*, replayed on a tiny Qwen2 "
        "(hidden 64, 2 layers) and a single-digit arithmetic task on CPU, with the real verl DAPO trainer. "
        "Everything below was computed by `scripts/reproduce_mini.sh` in this folder"
        + (" (**smoke settings**: far too small for the verdicts to mean anything)" if cfg.size == "smoke" else "")
        + ".\n",
        f"Base/data/sampling seed {cfg.seed}; training seeds {list(cfg.seeds)}; schemes {', '.join(cfg.schemes)}; "
        f"{cfg.train.steps} DAPO steps of "
        f"{cfg.train.prompts_per_step} prompts × {cfg.train.samples_per_prompt} samples, lr {cfg.train.lr}. "
        f"Stage times (s): " + ", ".join(f"{s} {v:.0f}" for s, v in seconds.items())
        + f"; all stages {sum(seconds.values()) / 60:.1f} min.\n",
        (
            "The task is a fixed set of 200 facts (a±b, single digits). SFT and RL train on all of them and "
            f"accuracy is measured on {cfg.task.eval_problems} of them: a model this small memorises facts, so "
            "held-out facts would not show what RL changes.\n"
        ),
        "## Verdicts\n",
        markdown_rows(
            ["claim of the paper", "miniature", "evidence"],
            [[v.claim, f"**{v.status}**", v.evidence] for v in verdicts],
        ),
        (
            "Accuracy verdicts follow from a paired 95% interval of the difference: per training seed and "
            "problem, the difference of the problem's fractions correct (same problems, same sampling seeds); "
            "the interval is a two-stage bootstrap, seeds then problems, with replacement "
            "(`verl_ext/mini/claims.py`). Reproduced: the interval lies above 0; not reproduced: below 0; "
            "inconclusive: it contains 0 (no effect shown at this power). The identification claim compares the "
            "Δlog p gate with its strongest rival at each matched replace ratio by a paired bootstrap over "
            "problems (the sweep uses one model pair, so there is no seed stage). Not run here: the rollout top-p ablation (paper Fig. 3c; "
            "`scripts/run_top_p_ablation.sh`).\n"
        ),
        "## 1. Base model (SFT)\n",
        (
            f"SFT stopped after {stage_info['base']['sft_steps']} steps at sampled accuracy "
            f"{100 * stage_info['base']['accuracy']:.1f}% (target band {list(cfg.base.target_accuracy)}).\n"
        ),
        "## 2. DAPO training\n",
        f"![training curves]({curves.relative_to(out)})\n",
        "## 3. Avg@k / Pass@k (T = 1, top-p " + f"{cfg.evaluate.top_p}, {k} samples per problem)\n",
        markdown_rows(
            ["model", *[c for c in next(iter(evaluation.values())) if c != "samples_per_problem"]],
            [[name, *[v for c, v in row.items() if c != "samples_per_problem"]] for name, row in evaluation.items()],
        ),
        f"## 4. Token-level Δlog p: base vs RL ({cfg.analysis.rl_scheme})\n",
        f"![histograms]({copy_figure(out / 'analysis' / 'histograms.png', figures, 'analysis_histograms.png')})\n",
        f"![probability by Δlog p bin]({copy_figure(out / 'analysis' / 'prob_by_delta_bin.png', figures, 'prob_by_delta_bin.png')})\n",
        "Fraction of tokens with Δlog p beyond ±τ, per generator:\n",
        markdown_rows(
            [
                "generator",
                "tokens",
                *[f"τ={t}" for t in summary["generators"][next(iter(summary["generators"]))]["tails"]],
            ],
            [
                [
                    g,
                    s["tokens"],
                    *[f"{v['frac_below_neg_tau']:.3f} / {v['frac_above_tau']:.3f}" for v in s["tails"].values()],
                ]
                for g, s in summary["generators"].items()
            ],
        ),
        "(below −τ / above τ)\n",
        "## 5. Selective token replacement (Alg. 1)\n",
        f"![replacement curves]({copy_figure(out / 'replacement' / 'accuracy_vs_replace_ratio.png', figures, 'replacement_curves.png')})\n",
        sweep_table(replacement),
        "## 6. Selective extrapolation (Eq. 7)\n",
        f"![extrapolation]({copy_figure(out / 'extrapolation' / 'accuracy_vs_replace_ratio.png', figures, 'extrapolation_curves.png')})\n",
        sweep_table(extrapolation),
    ]
    path = out / "report.md"
    path.write_text("\n".join(md))
    (out / "verdicts.json").write_text(json.dumps([v.__dict__ for v in verdicts], indent=1))
    return path
