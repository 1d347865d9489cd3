"""Tables and summary numbers computed from the per-token metrics table (pandas, no plotting).

The input is the table `logp_diff` writes: one row per response token with columns
`generator`, `response_id`, `token_id`, `token_text` and every name in
`token_metrics.METRICS`. Every function here is a small pure function of that table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from verl_ext.analysis.token_metrics import METRICS
from verl_ext.core.atomic_io import atomic_write_bytes

METRIC_LABELS = {
    "logp_base": r"log $\pi_B(y_t)$",
    "logp_rl": r"log $\pi_{RL}(y_t)$",
    "delta_logp": r"$\Delta\log p = \log\pi_{RL}(y_t) - \log\pi_B(y_t)$",
    "entropy_base": r"entropy $H(\pi_B)$",
    "entropy_rl": r"entropy $H(\pi_{RL})$",
    "kl_rl_base": r"KL($\pi_{RL}\,\|\,\pi_B$)",
    "kl_base_rl": r"KL($\pi_B\,\|\,\pi_{RL}$)",
    "kl_avg": r"averaged KL $\frac{1}{2}$[KL($\pi_B\|\pi_{RL}$)+KL($\pi_{RL}\|\pi_B$)]",
}


def tail_fractions(df: pd.DataFrame, thresholds: Sequence[float]) -> pd.DataFrame:
    """Per generator and τ: frac(Δlog p < −τ) and frac(Δlog p > τ) over its tokens.

    Returns columns generator, tau, tokens, frac_below_neg_tau, frac_above_tau.
    """
    rows = []
    for gen, g in df.groupby("generator", sort=True):
        d = g["delta_logp"].to_numpy(dtype=np.float64)
        for tau in thresholds:
            if tau < 0:
                raise ValueError(f"tail thresholds are magnitudes τ ≥ 0 (the tails are Δlogp < −τ and > τ), got {tau}")
            rows.append(
                {
                    "generator": gen,
                    "tau": float(tau),
                    "tokens": int(d.size),
                    "frac_below_neg_tau": float(np.mean(d < -tau)) if d.size else math.nan,
                    "frac_above_tau": float(np.mean(d > tau)) if d.size else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=["generator", "tau", "tokens", "frac_below_neg_tau", "frac_above_tau"])


def metric_statistics(df: pd.DataFrame) -> pd.DataFrame:
    """Per generator and metric: mean, std (population), median, min, max over finite values, and count of non-finite."""
    rows = []
    for gen, g in df.groupby("generator", sort=True):
        for m in METRICS:
            x = g[m].to_numpy(dtype=np.float64)
            finite = x[np.isfinite(x)]
            stats = (
                {
                    "mean": finite.mean(),
                    "std": finite.std(),
                    "median": np.median(finite),
                    "min": finite.min(),
                    "max": finite.max(),
                }
                if finite.size
                else {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
            )
            rows.append(
                {
                    "generator": gen,
                    "metric": m,
                    **{k: float(v) for k, v in stats.items()},
                    "non_finite": int(x.size - finite.size),
                }
            )
    return pd.DataFrame(rows)


def counts(df: pd.DataFrame) -> pd.DataFrame:
    """Per generator: number of responses and of response tokens."""
    g = df.groupby("generator", sort=True)
    return pd.DataFrame({"responses": g["response_id"].nunique(), "tokens": g.size()}).reset_index()


def probability_by_delta_bins(df: pd.DataFrame, edges: Sequence[float]) -> pd.DataFrame:
    """Mean π_B(y_t) = exp(logp_base) and π_RL(y_t) of the tokens in each Δlog p bin, per generator.

    Bins are [edges[i], edges[i+1]); values outside [edges[0], edges[-1]) go to the first/last bin
    (so every token is counted). Returns generator, bin_left, bin_right, count, mean_p_base, mean_p_rl
    and their standard errors se_p_base, se_p_rl = s / √n (s the sample standard deviation, ddof 1;
    NaN below 2 tokens). Tokens of one response are not independent: the error bars are a lower bound.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0):
        raise ValueError(f"bin edges must be ≥ 2 strictly increasing numbers, got {edges.tolist()}")
    rows = []
    for gen, g in df.groupby("generator", sort=True):
        d = g["delta_logp"].to_numpy(dtype=np.float64)
        idx = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, edges.size - 2)
        pb, pr = np.exp(g["logp_base"].to_numpy(np.float64)), np.exp(g["logp_rl"].to_numpy(np.float64))
        for b in range(edges.size - 1):
            sel = idx == b
            n = int(sel.sum())
            rows.append(
                {
                    "generator": gen,
                    "bin_left": float(edges[b]),
                    "bin_right": float(edges[b + 1]),
                    "count": n,
                    "mean_p_base": float(pb[sel].mean()) if n else math.nan,
                    "mean_p_rl": float(pr[sel].mean()) if n else math.nan,
                    "se_p_base": float(pb[sel].std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
                    "se_p_rl": float(pr[sel].std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
                }
            )
    return pd.DataFrame(rows)


def top_tokens(df: pd.DataFrame, k: int, min_count: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tokens (over all generators) ranked by mean Δlog p, among those seen ≥ `min_count` times.

    Returns (most increased by RLVR, most decreased), each with columns token_id, token_text,
    count, mean_delta_logp, mean_p_base, mean_p_rl; at most k rows each.
    """
    if k < 1 or min_count < 1:
        raise ValueError(f"top_tokens needs k >= 1 and min_count >= 1, got k={k}, min_count={min_count}")
    work = df[["token_id", "token_text", "delta_logp"]].assign(
        p_base=np.exp(df["logp_base"].to_numpy(np.float64)), p_rl=np.exp(df["logp_rl"].to_numpy(np.float64))
    )
    agg = (
        work.groupby("token_id", sort=True)
        .agg(
            token_text=("token_text", "first"),
            count=("delta_logp", "size"),
            mean_delta_logp=("delta_logp", "mean"),
            mean_p_base=("p_base", "mean"),
            mean_p_rl=("p_rl", "mean"),
        )
        .reset_index()
    )
    agg = agg[agg["count"] >= min_count]
    up = agg.sort_values(["mean_delta_logp", "token_id"], ascending=[False, True]).head(k).reset_index(drop=True)
    down = agg.sort_values(["mean_delta_logp", "token_id"], ascending=[True, True]).head(k).reset_index(drop=True)
    return up, down


def summary_dict(df: pd.DataFrame, thresholds: Sequence[float]) -> dict:
    """Everything the markdown summary shows, as plain JSON-able numbers keyed by generator."""
    out: dict = {"generators": {}}
    stats, tails = metric_statistics(df), tail_fractions(df, thresholds)
    for row in counts(df).itertuples(index=False):
        gen = row.generator
        out["generators"][gen] = {
            "responses": int(row.responses),
            "tokens": int(row.tokens),
            "metrics": {
                r.metric: {
                    "mean": r.mean,
                    "std": r.std,
                    "median": r.median,
                    "min": r.min,
                    "max": r.max,
                    "non_finite": r.non_finite,
                }
                for r in stats[stats.generator == gen].itertuples(index=False)
            },
            "tails": {
                f"{r.tau:g}": {"frac_below_neg_tau": r.frac_below_neg_tau, "frac_above_tau": r.frac_above_tau}
                for r in tails[tails.generator == gen].itertuples(index=False)
            },
        }
    return out


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of `df` (numbers with 4 significant digits, `|` escaped in text)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, (float, np.floating)):
                cells.append(_fmt(float(v)))
            else:
                cells.append(str(v).replace("|", "\\|").replace("\n", "\\n"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(summary: dict, thresholds: Sequence[float], title: str = "Token-level Δlog p analysis") -> str:
    """Short markdown: per generator, counts, tail masses of Δlog p and mean/median of each metric."""
    lines = [f"# {title}", ""]
    tail_rows, stat_rows = [], []
    for gen, s in summary["generators"].items():
        for tau in thresholds:
            t = s["tails"][f"{tau:g}"]
            tail_rows.append(
                {
                    "generator": gen,
                    "τ": float(tau),
                    "P(Δlogp < −τ)": t["frac_below_neg_tau"],
                    "P(Δlogp > τ)": t["frac_above_tau"],
                }
            )
        for m, st in s["metrics"].items():
            stat_rows.append(
                {
                    "generator": gen,
                    "metric": m,
                    "mean": st["mean"],
                    "median": st["median"],
                    "max": st["max"],
                    "non-finite": st["non_finite"],
                }
            )
    count_rows = [
        {"generator": g, "responses": s["responses"], "tokens": s["tokens"]} for g, s in summary["generators"].items()
    ]
    lines += ["## Tokens", "", markdown_table(pd.DataFrame(count_rows)), ""]
    lines += ["## Tail masses of Δlog p", "", markdown_table(pd.DataFrame(tail_rows)), ""]
    lines += ["## Metric statistics", "", markdown_table(pd.DataFrame(stat_rows)), ""]
    return "\n".join(lines)


def write_json(obj, path: Path) -> None:
    """Write JSON atomically (temporary file, then rename); NaN/inf become null."""

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    atomic_write_bytes(path, json.dumps(clean(obj), indent=1, ensure_ascii=False).encode())
