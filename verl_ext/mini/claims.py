"""Verdicts on the paper's claims from the miniature's numbers: small pure functions.

Accuracy claims (RL beats the base, a weighting beats plain DAPO, extrapolation beats π_RL) rest
on a paired 95% interval of the accuracy difference (`paired_bootstrap`): per training seed s and
problem p, d[s, p] = acc_new[s, p] − acc_ref[s, p] (each a problem's fraction of correct samples,
the same problems and sampling seeds on both sides); the interval resamples seeds, then problems,
with replacement (a two-stage bootstrap: both the training run and the choice of problems vary;
samples of one problem stay together, so their correlation is respected). The verdict follows
from the interval (`interval_status`): above 0 reproduced, below 0 the opposite, else
inconclusive at this power. The identification claim compares sweep runs of one model the same
way, per matched replace ratio, with an interval over problems (`identification_claim`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "not reproduced (opposite)", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    claim: str
    status: str
    evidence: str


def paired_bootstrap(diffs, resamples: int = 4000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of d[s, p] (seeds × problems) and its `level` percentile interval
    from `resamples` two-stage bootstrap draws: S seeds drawn with replacement, then P problems drawn
    with replacement (the same problems for every drawn seed: a problem's difficulty is shared across
    training runs), mean of the drawn cells. One seed: a bootstrap over problems alone."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 2 or not np.isfinite(d).all():
        raise ValueError(f"need a finite seeds × problems array with at least 2 problems, got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    n_seeds, n_problems = d.shape
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    problems = rng.integers(0, n_problems, size=(resamples, n_problems))
    means = d[seeds[:, :, None], problems[:, None, :]].mean(axis=(1, 2))
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), float(low), float(high)


def interval_status(low: float, high: float) -> str:
    """REPRODUCED when the whole interval of new − ref is above 0, CONTRADICTED when below, else INCONCLUSIVE."""
    if low > 0:
        return REPRODUCED
    if high < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def paired_accuracy_claim(claim: str, new: str, new_acc, ref: str, ref_acc, level: float = 0.95) -> Verdict:
    """`new_acc` and `ref_acc`: seeds × problems fractions correct (a reference that does not depend on
    the training seed, e.g. the base model, broadcasts from one row). The verdict follows from the
    paired interval of the difference; the evidence gives every seed's accuracies."""
    new_acc, ref_acc = np.atleast_2d(np.asarray(new_acc, np.float64)), np.atleast_2d(np.asarray(ref_acc, np.float64))
    ref_acc = np.broadcast_to(ref_acc, new_acc.shape)
    mean, low, high = paired_bootstrap(new_acc - ref_acc, level=level)
    per_seed = ", ".join(f"{100 * a:.1f} vs {100 * b:.1f}" for a, b in zip(new_acc.mean(1), ref_acc.mean(1)))
    evidence = (
        f"{new} − {ref}: {100 * mean:+.1f} pts, {level:.0%} CI [{100 * low:+.1f}, {100 * high:+.1f}] over "
        f"{new_acc.shape[0]} training seed(s) × {new_acc.shape[1]} problems (per seed, %: {per_seed})"
    )
    return Verdict(claim, interval_status(low, high), evidence)


def identification_claim(runs: list[dict], best: str = "delta_logp", level: float = 0.95) -> Verdict:
    """Selective replacement: at matched replace ratios, the Δlog p gate gives the highest accuracy.

    `runs`: the calibrated sweep runs, each {criterion, replace_ratio, problem_accuracy}: the fractions
    correct per problem, the same problems in the same order for every run. Runs are matched by rank of
    replace ratio within each criterion (the calibration targets the same ratios for every criterion).
    At each matched ratio, `best` is compared with its strongest rival there (the other criterion with
    the highest accuracy) by the paired interval of the per-problem difference (`paired_bootstrap`
    over problems). REPRODUCED when that interval lies above 0 at more than half of the ratios and
    below 0 at none; not reproduced when below 0 at more than half and above at none; else inconclusive.
    """
    claim = (
        "Replacing the few tokens with the most negative Δlog p recovers the RL model's accuracy better "
        "than entropy-, KL- or randomly-chosen tokens at the same replace ratio"
    )
    by_criterion: dict[str, list[dict]] = {}
    for run in runs:
        if run["criterion"] not in ("none", "all"):
            by_criterion.setdefault(run["criterion"], []).append(run)
    if best not in by_criterion or len(by_criterion) < 2:
        return Verdict(claim, INCONCLUSIVE, "not enough criteria were run")
    for ranked in by_criterion.values():
        ranked.sort(key=lambda r: r["replace_ratio"])
    levels = min(len(v) for v in by_criterion.values())
    above, below, parts = 0, 0, []
    for i in range(levels):
        mine = np.asarray(by_criterion[best][i]["problem_accuracy"], np.float64)
        rivals = {c: np.asarray(ranked[i]["problem_accuracy"], np.float64) for c, ranked in by_criterion.items() if c != best}
        rival = max(rivals, key=lambda c: rivals[c].mean())
        mean, low, high = paired_bootstrap([mine - rivals[rival]], level=level)
        status = interval_status(low, high)
        above, below = above + (status == REPRODUCED), below + (status == CONTRADICTED)
        parts.append(
            f"ratio≈{by_criterion[best][i]['replace_ratio']:.2f}: Δlog p {100 * mine.mean():.1f}% vs {rival} "
            f"{100 * rivals[rival].mean():.1f}%, {100 * mean:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]"
        )
    if above * 2 > levels and below == 0:
        status = REPRODUCED
    elif below * 2 > levels and above == 0:
        status = CONTRADICTED
    else:
        status = INCONCLUSIVE
    evidence = (
        f"Δlog p − strongest other criterion, {level:.0%} CI over {len(mine)} problems, above 0 at {above}/{levels} "
        f"and below 0 at {below}/{levels} matched ratios; " + "; ".join(parts)
    )
    return Verdict(claim, status, evidence)


def low_probability_claim(bins: list[dict], raised_above: float = 0.5, flat_within: float = 0.1) -> Verdict:
    """Tokens RLVR raised most (Δlog p > `raised_above`) had low base probability, compared with
    tokens it left alone (|Δlog p| ≤ `flat_within`). `bins`: prob-by-Δlogp rows (bin_left, bin_right,
    count, mean_p_base) of the RL model's own samples."""

    def pooled(select):
        chosen = [b for b in bins if select(b) and b["count"] > 0]
        count = sum(b["count"] for b in chosen)
        return (sum(b["mean_p_base"] * b["count"] for b in chosen) / count, count) if count else (math.nan, 0)

    raised, n_raised = pooled(lambda b: b["bin_left"] >= raised_above)
    flat, n_flat = pooled(lambda b: b["bin_left"] >= -flat_within and b["bin_right"] <= flat_within)
    claim = "The tokens RLVR raises most were low-probability under the base model"
    if n_raised == 0 or n_flat == 0:
        return Verdict(claim, INCONCLUSIVE, f"too few tokens (raised: {n_raised}, unchanged: {n_flat})")
    status = REPRODUCED if raised < flat else CONTRADICTED
    return Verdict(
        claim,
        status,
        f"mean π_B of tokens with Δlog p > {raised_above}: {raised:.3f} ({n_raised} tokens) vs "
        f"|Δlog p| ≤ {flat_within}: {flat:.3f} ({n_flat} tokens)",
    )
