"""Criterion × threshold sweeps of selective replacement / extrapolation (paper Fig. 2, Table 1).

    python -m verl_ext.decoding.sweep --config-path "$REPO/configs" --config-name token_replacement [overrides]
    bash scripts/run_token_replacement.sh                     # tiny CPU models, in-process
    bash scripts/run_extrapolation.sh models.base=/m/Qwen2.5-32B models.rl=/m/DAPO-Qwen-32B

A *run* is one (criterion, τ, γ, seed); it samples `n_samples` responses per problem, split into
shards of `shard_problems` problems. A shard is generated, graded (`verl_ext.reward`) and written
atomically to `<output_dir>/runs/<run>/shard-XXXXX.parquet`; shards already on disk are skipped,
so a killed sweep resumes where it stopped (`manifest.json` refuses shards of other settings). Then every run is aggregated (Avg@n and unbiased
Pass@k from `verl_ext.evaluation`, replace ratio = per-response fraction of fired steps averaged
over responses) into results.parquet / results.json and the accuracy-vs-replace-ratio plot
(one line per criterion; π_B and π_RL as reference lines). With `wandb.enable` (auto: WANDB_MODE
or WANDB_API_KEY set) the table, the plot, a wandb line chart of the same curves and the per-run
numbers also go to wandb, in the training's project and group (`verl_ext.wandb_logging`).

Thresholds are given per criterion, or calibrated to target replace ratios
(`sweep.target_ratios`): τ starts at the score quantile observed under base sampling and is
refined by a few fixed-point rounds on pilot runs (`calibration.json`, also resumable).

Shards run in-process (CPU, or one GPU) or on a Ray actor pool with one actor per GPU (`verl_ext.jobs`;
`ray.enabled=auto`: Ray when `ray.address` or RAY_ADDRESS is set or more than one GPU is visible). Random
streams are keyed by (seed, problem·n + sample), so every criterion sees the same base draws
(common random numbers) and results do not depend on sharding or batching.
"""

from __future__ import annotations

import functools
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from verl_ext.core.atomic_io import atomic_write_bytes, atomic_write_parquet
from verl_ext.core.checks import (
    ConfigError,
    check_choice,
    check_file,
    check_flag,
    check_list,
    check_model_source,
    check_number,
    check_writable_dir,
    exit_on_config_error,
    invalid,
)
from verl_ext.core.paths import config_dir, figure_name
from verl_ext.core.progress import job_size, size_line
from verl_ext.decoding.criteria import ABOVE, BELOW, get_criterion
from verl_ext.jobs import WorkerPool, check_ray, check_resume, shard_name
from verl_ext.wandb_logging import start_run, wandb_enabled

BASELINES = (("none", 0.0), ("all", 0.0))  # π_B alone (ratio 0) and π_RL / π_Extra alone (ratio 1)


class SweepError(ConfigError):
    pass


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    criterion: str
    threshold: float
    gamma: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.criterion}_tau{self.threshold:+.4g}_gamma{self.gamma:.4g}_seed{self.seed}"


def threshold_table(cfg: DictConfig, checked: bool = False) -> dict[str, list[float]]:
    """criterion -> τ values: `sweep.thresholds` when set (it replaces the defaults as a whole), else
    `sweep.default_thresholds`. (A Hydra dict override merges into a non-null dict, so the table a user
    gives on the command line goes into the null `thresholds` and the defaults live apart.)
    A criterion whose list is null is not run. `checked`: each list non-empty and each τ valid for its
    criterion (`_check_threshold`)."""
    key = "sweep.thresholds"
    table = cfg.sweep.get("thresholds")
    if table is None:
        key, table = "sweep.default_thresholds", cfg.sweep.get("default_thresholds")
    out = {}
    for name, taus in (table or {}).items():
        if taus is None:  # a criterion set to null is not run (extrapolation.yaml drops the defaults' others)
            continue
        taus = OmegaConf.to_object(taus) if OmegaConf.is_config(taus) else taus
        taus = taus if isinstance(taus, (list, tuple)) else [taus]
        if checked:
            get_criterion(str(name))
            taus = check_list(taus, f"{key}.{name}", _check_threshold(str(name), f"{key}.{name}"))
        out[str(name)] = [float(t) for t in taus]
    return out


def plan_runs(cfg: DictConfig, calibrated: dict[str, list[float]] | None = None) -> list[RunSpec]:
    """Every (criterion, τ) × γ × seed, plus the `none`/`all` baselines per γ and seed."""
    thresholds = calibrated if calibrated is not None else threshold_table(cfg)
    if cfg.sweep.criteria:
        thresholds = {k: v for k, v in thresholds.items() if k in cfg.sweep.criteria}
    for name in thresholds:
        get_criterion(name)  # unknown names raise with the valid list
    gammas = list(cfg.sweep.gammas) if cfg.decoding.action == "extrapolate" else [0.0]
    runs = []
    for seed in cfg.seeds:
        for gamma in gammas:
            if cfg.sweep.baselines:
                runs += [RunSpec(c, t, gamma, seed) for c, t in BASELINES]
                if gamma != 0.0:  # π_RL itself (π_Extra at γ = 0): the reference extrapolation must beat
                    runs.append(RunSpec("all", 0.0, 0.0, seed))
            for name, taus in thresholds.items():
                runs += [RunSpec(name, float(t), gamma, seed) for t in taus]
    return list(dict.fromkeys(runs))


@dataclass(frozen=True)
class Shard:
    """Problems [start, stop) of run `spec`, written to `path`."""

    spec: RunSpec
    start: int
    stop: int
    path: str


def rule_for(cfg: DictConfig, spec: RunSpec):
    from verl_ext.decoding.sampler import DecodingRule

    d = cfg.decoding
    return DecodingRule(
        criterion=spec.criterion, threshold=spec.threshold, action=d.action, gamma=spec.gamma,
        propose_from=d.propose_from, temperature=d.temperature, top_p=d.top_p,
        base_top_k_approximation=d.base_top_k_approximation, coupling=d.coupling,
    )


def shard_ranges(num_problems: int, shard_problems: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_problems, num_problems)) for s in range(0, num_problems, shard_problems)]


# ----------------------------------------------------------------------------- atomic files


def write_parquet(path: Path, rows: list[dict]) -> None:
    """`rows` as one parquet file, atomically; columns are the union of the rows' keys (pandas fills gaps)."""
    import pandas as pd
    import pyarrow as pa

    atomic_write_parquet(path, pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False))


# ----------------------------------------------------------------------------- the worker


class ShardWorker:
    """Holds both models and the problems; generates and grades shards (in-process or as a Ray actor)."""

    def __init__(self, cfg_container: dict):
        self.cfg = OmegaConf.create(cfg_container)
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            self._loaded = load_models_and_problems(self.cfg)
        return self._loaded

    def decoder(self, spec: RunSpec, max_new_tokens: int | None = None):
        from verl_ext.decoding.engine import TwoModelDecoder
        from verl_ext.decoding.static import StaticTwoModelDecoder

        base, rl, tok, _problems, eos = self._load()
        d = self.cfg.decoding
        common = {"eos_token_ids": eos, "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos[0],
                  "max_new_tokens": max_new_tokens or d.max_new_tokens, "seed": spec.seed,
                  "max_batch_size": d.max_batch_size}
        rule = rule_for(self.cfg, spec)
        if d.get("static_cache", False):  # the step loop's tokens on static caches (CUDA graphs on a GPU)
            return StaticTwoModelDecoder(base, rl, rule, **common)
        if d.get("speculative", False):  # opt-in: exact, but slower than the step loop on a measured GPU
            from verl_ext.decoding.experimental import SpeculativeTwoModelDecoder

            rounds = {k: d[k] for k in ("draft_len", "max_draft_len", "draft_model") if k in d}
            return SpeculativeTwoModelDecoder(base, rl, rule, **rounds, **common)
        return TwoModelDecoder(base, rl, rule, **common)

    def generate(self, spec: RunSpec, start: int, stop: int, n: int, max_new_tokens: int | None = None):
        """[(problem index, sample index, DecodeResult)] for problems[start:stop] × n samples."""
        from verl_ext.decoding.engine import Request

        _, _, _, problems, _ = self._load()
        reqs, keys = [], []
        for p in range(start, stop):
            for s in range(n):
                reqs.append(Request(problems[p]["prompt_ids"], stream_id=p * n + s))
                keys.append((p, s))
        results = self.decoder(spec, max_new_tokens).generate(reqs)
        return [(p, s, r) for (p, s), r in zip(keys, results)]

    def run_shard(self, shard: Shard) -> str:
        """Generate, grade and atomically write one shard; returns its path."""
        from verl_ext.evaluation.report import grade_records

        spec, start, stop, path = shard.spec, shard.start, shard.stop, shard.path
        _, _, tok, problems, _ = self._load()
        n = self.cfg.n_samples
        rows = []
        for p, s, r in self.generate(spec, start, stop, n):
            prob = problems[p]
            rows.append({
                "run": spec.name, "criterion": spec.criterion, "threshold": spec.threshold, "gamma": spec.gamma,
                "seed": spec.seed, "problem_index": p, "data_source": prob["data_source"],
                "prompt_id": prob["prompt_id"], "sample_index": s, "ground_truth": prob["ground_truth"],
                "accepted_answers": prob["accepted_answers"],
                "response": tok.decode(r.tokens, skip_special_tokens=True), "response_length": len(r.tokens),
                "n_replaced": int(sum(r.replaced)), "replace_ratio": r.replace_ratio, "finish_reason": r.finish_reason,
            })
        graded = grade_records(rows, timeout_s=self.cfg.grading.timeout_s, show_progress=False)
        for row, (ok, pred) in zip(rows, graded):
            row["correct"], row["pred"] = bool(ok), pred
        write_parquet(Path(path), rows)
        return path

    def pilot(self, spec: RunSpec) -> dict:
        """Scores and realised replace ratio of `spec` on the calibration problems."""
        c = self.cfg.sweep.calibration
        _, _, _, problems, _ = self._load()
        out = self.generate(spec, 0, min(c.problems, len(problems)), c.samples, c.max_new_tokens)
        scores = [x for _, _, r in out for x in r.scores if not math.isnan(x)]
        ratio = sum(r.replace_ratio for _, _, r in out) / len(out)
        return {"scores": scores, "ratio": ratio}


def load_models_and_problems(cfg: DictConfig):
    """(base, rl, tokenizer, problems with prompt_ids, eos ids); tiny CPU assets when models.base is null."""
    from transformers import AutoTokenizer

    from verl_ext.core.models import eos_token_ids, load_hf_model
    from verl_ext.core.prompts import encode_messages
    from verl_ext.evaluation.command import load_problems

    m = cfg.models
    files = list(cfg.data.files or [])
    if m.base is None:
        from verl_ext.tiny_assets import ensure_tiny_assets, perturbed_model

        assets = ensure_tiny_assets()
        base = load_hf_model(str(assets.model_dir), m.device, m.dtype)
        rl = perturbed_model(base, m.tiny_rl_noise) if m.rl is None else load_hf_model(m.rl, m.device, m.dtype)
        tok_path = m.tokenizer or str(assets.tokenizer_dir)
        files = files or [str(assets.val_parquet)]
    else:
        if m.rl is None:
            raise SweepError("models.rl is not set: give the RLVR model's path (models.base is the base model)")
        base, rl = load_hf_model(m.base, m.device, m.dtype), load_hf_model(m.rl, m.device, m.dtype)
        tok_path = m.tokenizer or m.rl
    tok = AutoTokenizer.from_pretrained(tok_path)
    if base.config.vocab_size != rl.config.vocab_size:
        raise SweepError(f"vocabularies differ: base {base.config.vocab_size}, rl {rl.config.vocab_size} tokens")
    problems = load_problems(files, cfg.data.max_problems)
    for p in problems:
        p["prompt_ids"] = encode_messages(tok, p["messages"], cfg.data.use_chat_template)
    return base, rl, tok, problems, eos_token_ids(rl, tok)


# ----------------------------------------------------------------------------- calibration


def quantile_threshold(scores: list[float], criterion: str, target: float) -> float:
    """τ such that a fraction `target` of the scores fire: the (1−r)-quantile (above) or r-quantile (below)."""
    import numpy as np

    if not scores:
        raise SweepError(f"calibration of {criterion}: no scores recorded")
    q = 1.0 - target if get_criterion(criterion).fires_when == ABOVE else target
    return float(np.quantile(np.asarray(scores), q))


def calibrate(cfg: DictConfig, pool: WorkerPool, out_dir: Path) -> dict[str, list[float]]:
    """τ per criterion and target ratio, resumable from calibration.json."""
    path = out_dir / "calibration.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    targets = [float(r) for r in cfg.sweep.target_ratios]
    seed = int(cfg.seeds[0])
    gamma = float(cfg.sweep.gammas[0]) if cfg.decoding.action == "extrapolate" else 0.0
    for name in cfg.sweep.calibrate_criteria:
        crit = get_criterion(name)
        if crit.fires_when not in (ABOVE, BELOW):
            raise SweepError(f"criterion {name!r} has no threshold to calibrate")
        for target in targets:
            key = f"{name}@{target:g}"
            if key in done:
                continue
            if name == "random":  # P(u < τ) = τ exactly
                done[key] = {"threshold": target, "ratio": None}
                continue
            never = math.inf if crit.fires_when == ABOVE else -math.inf
            pilot = pool.call(ShardWorker.pilot, RunSpec(name, never, gamma, seed))
            tau, best = quantile_threshold(pilot["scores"], name, target), None
            for _ in range(cfg.sweep.calibration.rounds):
                pilot = pool.call(ShardWorker.pilot, RunSpec(name, tau, gamma, seed))
                if best is None or abs(pilot["ratio"] - target) < abs(best[1] - target):
                    best = (tau, pilot["ratio"])
                tau = quantile_threshold(pilot["scores"], name, target)
            done[key] = {"threshold": best[0], "ratio": best[1]}
            atomic_write_bytes(path, json.dumps(done, indent=1).encode())
            print(f"[calibrate] {key}: tau={best[0]:.4g} (pilot replace ratio {best[1]:.3f})", flush=True)
    atomic_write_bytes(path, json.dumps(done, indent=1).encode())
    out: dict[str, list[float]] = {}
    for key, v in done.items():
        name, _ = key.split("@")
        if name in cfg.sweep.calibrate_criteria:
            out.setdefault(name, []).append(v["threshold"])
    return out


# ----------------------------------------------------------------------------- aggregation + plot


def summarize(rows, pass_ks: list[int]) -> list[dict]:
    """One row per run: Avg@n, Pass@k, replace ratio (mean of per-response ratios), length, and
    accuracy_se = s/√P, s the sample standard deviation (ddof 1) over the P problems of each
    problem's correct fraction c/n (NaN for one problem): the standard error of Avg@n over problems."""
    import pandas as pd

    from verl_ext.evaluation.metrics import mean_avg_at_k, mean_pass_at_k

    df = pd.DataFrame(rows)
    out = []
    for run, g in df.groupby("run", sort=False):
        counts = [(len(x), int(x["correct"].sum())) for _, x in g.groupby(["data_source", "prompt_id"])]
        n = min(c[0] for c in counts)
        first = g.iloc[0]
        row = {
            "run": run, "criterion": first["criterion"], "threshold": float(first["threshold"]),
            "gamma": float(first["gamma"]), "seed": int(first["seed"]), "num_problems": len(counts),
            "samples_per_problem": n, "accuracy": mean_avg_at_k(counts, n),
            "accuracy_se": statistics.stdev(c / m for m, c in counts) / math.sqrt(len(counts))
            if len(counts) > 1 else math.nan,
            "replace_ratio": float(g["replace_ratio"].mean()), "mean_response_length": float(g["response_length"].mean()),
        }
        for k in pass_ks:
            if k <= n:
                row[f"pass@{k}"] = mean_pass_at_k(counts, k)
        out.append(row)
    return out


def _curve_table(summary: list[dict]):
    """Seeds averaged per (criterion, τ, γ): accuracy, replace ratio, and accuracy_se = the mean of the
    seeds' standard errors (seeds share the problems, so their errors are not independent: the mean
    is the conservative choice, exact when they are fully correlated)."""
    import pandas as pd

    df = pd.DataFrame(summary)
    if "accuracy_se" not in df:
        df["accuracy_se"] = math.nan
    return df.groupby(["criterion", "threshold", "gamma"], as_index=False)[
        ["accuracy", "replace_ratio", "accuracy_se"]].mean()


def _curve_groups(summary: list[dict]):
    """What the figure draws, as (label, rows of `_curve_table`): lines, one per criterion (× γ, labelled
    with γ when there are several), rows by replace ratio; and reference levels: π_B (`none`, one level:
    it does not depend on γ, nothing is ever resampled), π_RL (`all` at γ = 0) and π_Extra per γ > 0."""
    df = _curve_table(summary)
    several_gammas = df["gamma"].nunique() > 1
    lines = [
        (f"{name} (γ={gamma:g})" if several_gammas else name, g.sort_values("replace_ratio"))
        for (name, gamma), g in df[~df["criterion"].isin(["none", "all"])].groupby(["criterion", "gamma"])
    ]
    base = df[df["criterion"] == "none"]
    refs = [("π_B (base)", base)] if len(base) else []
    refs += [("π_RL" if gamma == 0 else f"π_Extra (γ={gamma:g})", g)  # π_Extra with γ = 0 is π_RL
             for gamma, g in df[df["criterion"] == "all"].groupby("gamma")]
    return lines, refs


def curve_errors(summary: list[dict]) -> dict[str, list[float]]:
    """Standard errors (accuracy in %) of what `curves` draws, by label: per point of a line, one for a level."""
    lines, refs = _curve_groups(summary)
    return {
        **{label: (100 * g["accuracy_se"]).tolist() for label, g in lines},
        **{label: [float(100 * g["accuracy_se"].mean())] for label, g in refs},
    }


def curves(summary: list[dict]) -> tuple[list[tuple[str, list[float], list[float]]], list[tuple[str, float, str]]]:
    """What the accuracy-vs-replace-ratio plots show, seeds averaged, accuracy in %: one
    (label, replace ratios, accuracies) line per criterion (× γ), and one (label, accuracy, colour)
    reference level per baseline (π_B = `none`; `all` = π_RL, or π_Extra per γ > 0)."""
    lines, refs = _curve_groups(summary)
    return (
        [(label, g["replace_ratio"].tolist(), (100 * g["accuracy"]).tolist()) for label, g in lines],
        [(label, float(100 * g["accuracy"].mean()), "gray" if label == "π_B (base)" else "black") for label, g in refs],
    )


REFERENCE_STYLES = {"π_B (base)": ("tab:gray", "--"), "π_RL": ("black", "-")}
EXTRA_COLOURS = ("tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink")


def plot_curves(summary: list[dict], path: Path, title: str, caption: str = "") -> None:
    """Accuracy vs replace ratio, one line per criterion (× γ) with 95% error bars (±1.96 SE over
    problems, seeds averaged); π_B, π_RL and each π_Extra as a level in its own style, its 95% interval
    in the right margin. The y label carries Avg@n's n; `caption` (models, data, sample size) under the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    lines, refs = curves(summary)
    errors = curve_errors(summary)
    n = min(int(r["samples_per_problem"]) for r in summary) if summary and "samples_per_problem" in summary[0] else None
    fig, ax = plt.subplots(figsize=(7, 4.8))
    # later lines dashed with hollow markers, so a line that coincides with an earlier one stays visible
    for i, (label, xs, ys) in enumerate(lines):
        ax.errorbar(xs, ys, yerr=[1.96 * e for e in errors.get(label, [math.nan] * len(ys))],
                    marker="osD^v<>ph*"[i % 10], linestyle=("-", "--", "-.", ":")[i % 4], capsize=3,
                    linewidth=2.2 if i == 0 else 1.3, markersize=7 if i == 0 else 5,
                    markerfacecolor=None if i == 0 else "none", label=label)
    # reference levels: a line across, and its 95% interval as an error bar in the right margin
    margin = blended_transform_factory(ax.transAxes, ax.transData)
    extra = iter(EXTRA_COLOURS * 4)
    for i, (label, level, _) in enumerate(refs):
        colour, style = REFERENCE_STYLES.get(label) or (next(extra), ":")
        ax.axhline(level, ls=style, color=colour, lw=1.3, label=label)
        se = errors.get(label, [math.nan])[0]
        if math.isfinite(se):
            ax.errorbar(1.015 + 0.02 * i, level, yerr=1.96 * se, color=colour, capsize=2, lw=1.2, transform=margin,
                        clip_on=False)
    ax.set_xlabel("replace ratio (share of tokens resampled)")
    ax.set_ylabel(f"accuracy (Avg@{n}, %)" if n else "accuracy (%)")
    ax.set_title(title + (f"\n{caption}" if caption else ""), fontsize=9 if caption else 11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02 + 0.02 * len(refs), 0.5), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def sweep_caption(cfg: DictConfig, summary: list[dict]) -> str:
    """Models, data and sample size of a sweep's figure; says so when π_RL is the tiny default's stand-in."""
    m = cfg.models
    base = figure_name(m.base) if m.base else "tiny base model"
    if m.rl:
        rl = figure_name(m.rl)
    elif not m.base:
        rl = f"STAND-IN (not RL-trained: π_B + {m.tiny_rl_noise:g}·std·noise)"
    else:
        rl = "?"
    data = ", ".join(Path(str(f)).stem for f in cfg.data.files) if cfg.data.files else "tiny arithmetic validation set"
    problems = max((int(r["num_problems"]) for r in summary), default=0)
    samples = min((int(r["samples_per_problem"]) for r in summary), default=0)
    return (f"π_B = {base}, π_RL = {rl}\n{data}: {problems} problems × {samples} samples × {len(cfg.seeds)} seed(s); "
            f"error bars: 95% CI over problems (levels: right margin)")


# ----------------------------------------------------------------------------- wandb


def sweep_kind(cfg: DictConfig) -> str:
    """`token_replacement` or `extrapolation`, after the action (the two scripts' names)."""
    return "extrapolation" if cfg.decoding.action == "extrapolate" else "token_replacement"


def summary_numbers(summary: list[dict]) -> dict[str, float]:
    """`sweep/<run>/<metric>` for the accuracy, replace ratio, Pass@k and length of every run."""
    metrics = ("accuracy", "replace_ratio", "mean_response_length")
    out = {}
    for row in summary:
        for key, value in row.items():
            if key in metrics or key.startswith("pass@"):
                out[f"sweep/{row['run']}/{key}"] = float(value)
    return out


def log_to_wandb(cfg: DictConfig, summary: list[dict], plot: Path) -> bool:
    """The results table, the curve plot (PNG and wandb's own line chart) and the per-run numbers
    to the training's wandb project, when `wandb.enable` says so; True if logged."""
    out = Path(cfg.output_dir).resolve()
    run = start_run(
        cfg.wandb,
        default_name=f"{sweep_kind(cfg)}-{out.name}",
        config=OmegaConf.to_container(cfg, resolve=True),
        out_dir=out,
        job_type="decoding",
    )
    if run is None:
        return False
    import pandas as pd
    import wandb

    lines, refs = curves(summary)
    # a reference level is drawn across the whole replace-ratio axis, as the dashed lines of the PNG
    series = lines + [(label, [0.0, 1.0], [level, level]) for label, level, _ in refs]
    logs = {
        "sweep/results": wandb.Table(dataframe=pd.DataFrame(summary)),
        "sweep/accuracy_vs_replace_ratio": wandb.Image(str(plot)),
        "sweep/accuracy_vs_replace_ratio_lines": wandb.plot.line_series(
            xs=[xs for _, xs, _ in series], ys=[ys for _, _, ys in series], keys=[label for label, _, _ in series],
            title=f"{cfg.plot_title}: accuracy (Avg@n, %)", xname="replace ratio",
        ),
        **summary_numbers(summary),
    }
    run.log(logs)
    run.finish()
    return True


# ----------------------------------------------------------------------------- entry point


def _check_threshold(name: str, key: str):
    """τ of criterion `name`: finite; `random` in [0, 1] (u ~ U[0, 1)); entropies and KLs >= 0 (never negative)."""
    fires_when = get_criterion(name).fires_when

    def check(tau, item_key: str):
        if name == "random":
            return check_number(tau, item_key, low=0, high=1)
        if fires_when == ABOVE:
            return check_number(tau, item_key, low=0)
        return check_number(tau, item_key)

    return check


def _check_model_paths(cfg: DictConfig) -> None:
    m = cfg.models
    for key in ("base", "rl", "tokenizer"):
        if m.get(key) is not None:
            check_model_source(m[key], f"models.{key}")
    if m.base is not None and m.rl is None:
        raise SweepError("models.rl is not set: give the RLVR model's path (models.base is the base model)")
    check_number(m.tiny_rl_noise, "models.tiny_rl_noise", low=0)


def validate(cfg: DictConfig) -> None:
    """Every setting checked before any model is loaded: ConfigError (SweepError) naming the key, the value
    and the valid choices. The data files are read (not the models): a row without a ground truth is refused."""
    from verl_ext.decoding.experimental import DRAFT_MODELS
    from verl_ext.decoding.sampler import ACTIONS, COUPLINGS, PROPOSERS

    d = cfg.decoding
    check_choice(d.action, "decoding.action", ACTIONS)
    check_choice(d.propose_from, "decoding.propose_from", PROPOSERS)
    check_choice(d.coupling, "decoding.coupling", COUPLINGS)
    for key in ("decoding.speculative", "decoding.static_cache", "sweep.baselines", "show_progress",
                "data.use_chat_template"):
        check_flag(OmegaConf.select(cfg, key, default=False), key)
    # the experimental speculative rounds' settings, checked even while speculative=false (a typo is a typo)
    check_choice(d.get("draft_model", "proposer"), "decoding.draft_model", DRAFT_MODELS)
    check_number(d.temperature, "decoding.temperature", low=0, low_open=True)
    check_number(d.top_p, "decoding.top_p", low=0, high=1, low_open=True)
    check_number(d.max_new_tokens, "decoding.max_new_tokens", low=1, integer=True)
    check_number(d.base_top_k_approximation, "decoding.base_top_k_approximation", low=0, integer=True)
    check_number(d.max_batch_size, "decoding.max_batch_size", low=1, integer=True)
    if d.get("draft_len", "auto") != "auto":
        try:
            check_number(d.draft_len, "decoding.draft_len", low=1, integer=True)
        except ConfigError:
            raise invalid("decoding.draft_len", d.draft_len, "an integer >= 1, or auto") from None
    if "max_draft_len" in d:
        check_number(d.max_draft_len, "decoding.max_draft_len", low=1, integer=True)
    check_number(cfg.n_samples, "n_samples", low=1, integer=True)
    check_list(cfg.seeds, "seeds", lambda v, k: check_number(v, k, integer=True))
    check_list(cfg.pass_ks, "pass_ks", lambda v, k: check_number(v, k, low=1, high=cfg.n_samples, integer=True),
               nonempty=False)
    check_number(cfg.shard_problems, "shard_problems", low=1, integer=True)
    check_number(cfg.grading.timeout_s, "grading.timeout_s", low=0, low_open=True)
    if d.action == "extrapolate":
        check_list(cfg.sweep.gammas, "sweep.gammas", lambda v, k: check_number(v, k, low=0))
    wandb_enabled(cfg.wandb.enable)  # a bad value raises here, before any model is loaded
    thresholds = threshold_table(cfg, checked=True)
    check_list(cfg.sweep.target_ratios or [], "sweep.target_ratios",
               lambda v, k: check_number(v, k, low=0, high=1, low_open=True, high_open=True), nonempty=False)
    if not thresholds and not cfg.sweep.target_ratios:
        raise SweepError("nothing to sweep: set sweep.thresholds or sweep.target_ratios")
    for key in ("sweep.calibrate_criteria", "sweep.criteria"):  # a bare name would be read letter by letter
        check_list(OmegaConf.select(cfg, key) or [], key, nonempty=False)
    for name in list(cfg.sweep.calibrate_criteria or []) + list(cfg.sweep.criteria or []):
        get_criterion(name)
    if cfg.sweep.target_ratios:
        check_list(cfg.sweep.calibrate_criteria, "sweep.calibrate_criteria")
        for key in ("problems", "samples", "max_new_tokens", "rounds"):
            check_number(cfg.sweep.calibration[key], f"sweep.calibration.{key}", low=1, integer=True)
    missing = [c for c in cfg.sweep.criteria or [] if c not in thresholds
               and not (cfg.sweep.target_ratios and c in cfg.sweep.calibrate_criteria)]
    if missing:
        raise SweepError(f"sweep.criteria {missing} have no thresholds: add them to 'sweep.thresholds={{<name>:[...]}}' or calibrate them")
    check_ray(cfg.ray)
    check_writable_dir(cfg.output_dir, "output_dir")
    _check_model_paths(cfg)
    check_list(cfg.data.files or [], "data.files", lambda f, k: check_file(f, k, suffixes=(".parquet", ".jsonl", ".json")),
               nonempty=False)
    check_number(cfg.data.max_problems, "data.max_problems", low=1, integer=True, allow_none=True)
    count_problems(cfg)  # reads the data files: empty files and rows without a ground truth are refused here


# Decoding settings that change speed only: the tokens are the same for any value (tested).
SPEED_ONLY_DECODING_KEYS = ("speculative", "draft_len", "max_draft_len", "max_batch_size", "static_cache")


def effective_draft_model(decoding) -> str:
    """The step-by-step loop (speculative=false, the default, or static caches) drafts with the proposer."""
    step_loop = decoding.get("static_cache", False) or not decoding.get("speculative", False)
    return "proposer" if step_loop else decoding.get("draft_model", "proposer")


def shard_settings(cfg: DictConfig) -> dict:
    """The settings that decide what a shard file holds (runs are told apart by their directory)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    decoding = {k: v for k, v in plain["decoding"].items() if k not in SPEED_ONLY_DECODING_KEYS}
    # scorer drafts give other tokens (same law); proposer drafts any k give the step loop's tokens
    decoding["draft_model"] = effective_draft_model(plain["decoding"])
    return {"models": plain["models"], "data": plain["data"], "decoding": decoding, "n_samples": plain["n_samples"],
            "shard_problems": plain["shard_problems"], "grading": plain["grading"]}


def run(cfg: DictConfig) -> list[dict]:
    from verl_ext.merge import resolve_config_paths

    resolve_config_paths(cfg, ("models.base", "models.rl", "models.tokenizer"))  # a training run's folder: its merged model
    validate(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / "manifest.json").exists() and (out_dir / "config.yaml").exists():  # a sweep from before the manifest
        atomic_write_bytes(out_dir / "manifest.json", json.dumps(shard_settings(OmegaConf.load(out_dir / "config.yaml"))).encode())
    check_resume(out_dir, shard_settings(cfg), ("runs",), redo_hint=f"delete {out_dir / 'runs'} to start over")
    atomic_write_bytes(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    worker = functools.partial(ShardWorker, OmegaConf.to_container(cfg, resolve=True))
    with WorkerPool(worker, cfg.ray, use_gpus=cfg.models.device != "cpu", show_progress=cfg.show_progress) as pool:
        shards = generate_shards(cfg, pool, out_dir)
    import pandas as pd

    rows = pd.concat([pd.read_parquet(s.path) for s in shards], ignore_index=True)
    summary = summarize(rows, list(cfg.pass_ks))
    write_parquet(out_dir / "results.parquet", summary)
    atomic_write_bytes(out_dir / "results.json", json.dumps(summary, indent=1).encode())
    plot_curves(summary, out_dir / "accuracy_vs_replace_ratio.png", cfg.plot_title, sweep_caption(cfg, summary))
    log_to_wandb(cfg, summary, out_dir / "accuracy_vs_replace_ratio.png")
    for row in summary:
        print(f"[sweep] {row['run']}: accuracy={row['accuracy']:.4f} replace_ratio={row['replace_ratio']:.4f}")
    print(f"[sweep] wrote {out_dir}/results.parquet, results.json, accuracy_vs_replace_ratio.png", flush=True)
    return summary


def generate_shards(cfg: DictConfig, pool: WorkerPool, out_dir: Path) -> list[Shard]:
    """Calibrate (if asked), plan the runs and write their missing shards; returns every shard."""
    calibrated = calibrate(cfg, pool, out_dir) if cfg.sweep.target_ratios else None
    if calibrated is not None:
        for name, taus in threshold_table(cfg).items():
            calibrated.setdefault(name, []).extend(taus)
    runs = plan_runs(cfg, calibrated)
    num_problems = count_problems(cfg)
    shards = [
        Shard(spec, a, b, str(out_dir / "runs" / spec.name / shard_name(a)))
        for spec in runs
        for a, b in shard_ranges(num_problems, cfg.shard_problems)
    ]
    todo = [s for s in shards if not Path(s.path).exists()]
    print(f"[sweep] {len(runs)} runs × {num_problems} problems × {cfg.n_samples} samples: "
          f"{len(shards)} shards, {len(shards) - len(todo)} already done", flush=True)
    _, tokens = job_size(num_problems, cfg.n_samples, cfg.decoding.max_new_tokens)
    print(f"[sweep] size: {len(runs)} runs x {size_line(num_problems, cfg.n_samples, cfg.decoding.max_new_tokens)} "
          f"each (at most {len(runs) * tokens:,} tokens in all); the shard bar shows the time left", flush=True)
    pool.map(ShardWorker.run_shard, todo, progress="shards")  # each worker writes its shard
    return shards


def count_problems(cfg: DictConfig) -> int:
    """Problems in the data files, without loading models."""
    from verl_ext.evaluation.command import load_problems

    files = list(cfg.data.files or [])
    if not files:
        if cfg.models.base is not None:
            raise SweepError("data.files is empty: give verl RL parquet files (bash scripts/prepare_data.sh)")
        from verl_ext.tiny_assets import ensure_tiny_assets

        files = [str(ensure_tiny_assets().val_parquet)]
    return len(load_problems(files, cfg.data.max_problems))


@hydra.main(version_base=None, config_path=str(config_dir()), config_name=None)
def main(cfg: DictConfig) -> None:
    with exit_on_config_error(sweep_kind(cfg) if cfg.get("decoding") else "sweep", (ConfigError, ValueError, FileNotFoundError)):
        run(cfg)


if __name__ == "__main__":
    main()
