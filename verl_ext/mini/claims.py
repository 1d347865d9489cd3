"""Verdicts on the paper's claims from the miniature's numbers: small pure functions.

A difference of two accuracies counts only when it exceeds `Z` standard errors of the
difference, SE = sqrt(p1(1−p1)/n1 + p2(1−p2)/n2) over the graded responses (samples of one
problem are correlated, so this SE is optimistic and the verdicts lean towards "reproduced";
the report says so). Otherwise the verdict is "inconclusive".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z = 2.0
REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "not reproduced (opposite)", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    claim: str
    status: str
    evidence: str


def difference_verdict(p_new: float, n_new: int, p_ref: float, n_ref: int, z: float = Z) -> tuple[str, float, float]:
    """(status, p_new − p_ref, SE): REPRODUCED when p_new − p_ref > z·SE, CONTRADICTED when < −z·SE."""
    if n_new < 1 or n_ref < 1:
        raise ValueError(f"need at least one graded response on each side, got n_new={n_new}, n_ref={n_ref}")
    diff = p_new - p_ref
    se = math.sqrt(p_new * (1 - p_new) / n_new + p_ref * (1 - p_ref) / n_ref)
    if diff > z * se:
        return REPRODUCED, diff, se
    if diff < -z * se:
        return CONTRADICTED, diff, se
    return INCONCLUSIVE, diff, se


def accuracy_claim(claim: str, new: tuple[str, float, int], ref: tuple[str, float, int]) -> Verdict:
    """`new` = (name, accuracy, graded responses) should beat `ref`."""
    status, diff, se = difference_verdict(new[1], new[2], ref[1], ref[2])
    evidence = (
        f"{new[0]} {100 * new[1]:.1f}% vs {ref[0]} {100 * ref[1]:.1f}% (Δ {100 * diff:+.1f} pts, SE {100 * se:.1f})"
    )
    return Verdict(claim, status, evidence)


def identification_claim(rows: list[dict], best: str = "delta_logp") -> Verdict:
    """Selective replacement: at matched replace ratios, the Δlog p gate gives the highest accuracy.

    `rows`: sweep summary rows (criterion, replace_ratio, accuracy, num_problems, samples_per_problem)
    of the calibrated runs. Runs are matched by rank of replace ratio within each criterion (the
    calibration targets the same ratios for every criterion). REPRODUCED when `best` is first at
    more than half of the matched ratios and never significantly below another criterion.
    """
    by_criterion: dict[str, list[dict]] = {}
    for row in rows:
        if row["criterion"] in ("none", "all"):
            continue
        by_criterion.setdefault(row["criterion"], []).append(row)
    if best not in by_criterion or len(by_criterion) < 2:
        return Verdict("Δlog p identifies the tokens that matter", INCONCLUSIVE, "not enough criteria were run")
    for runs in by_criterion.values():
        runs.sort(key=lambda r: r["replace_ratio"])
    levels = min(len(v) for v in by_criterion.values())
    wins, worse, parts = 0, 0, []
    for i in range(levels):
        at = {c: runs[i] for c, runs in by_criterion.items()}
        winner = max(at, key=lambda c: at[c]["accuracy"])
        wins += winner == best
        mine = at[best]
        n = mine["num_problems"] * mine["samples_per_problem"]
        for c, r in at.items():
            if c != best and difference_verdict(mine["accuracy"], n, r["accuracy"], n)[0] == CONTRADICTED:
                worse += 1
        parts.append(f"ratio≈{mine['replace_ratio']:.2f}: best {winner} ({100 * at[winner]['accuracy']:.1f}%)")
    status = REPRODUCED if wins * 2 > levels and worse == 0 else (CONTRADICTED if wins == 0 and worse else INCONCLUSIVE)
    return Verdict(
        "Replacing the few tokens with the most negative Δlog p recovers the RL model's accuracy better "
        "than entropy-, KL- or randomly-chosen tokens at the same replace ratio",
        status,
        f"Δlog p first at {wins}/{levels} matched ratios; " + "; ".join(parts),
    )


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
