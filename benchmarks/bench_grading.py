"""Grading throughput: our safe grader (`verl_ext.reward.is_correct`) vs Math-Verify called directly.

    python benchmarks/bench_grading.py            # 10k synthetic responses
    python benchmarks/bench_grading.py --n 2000   # quicker

Baseline, in the same run on the same responses: Math-Verify the way it is usually called, in
the main thread with its own signal-based timeouts: `verify(parse("\\boxed{gt}"), parse(response))`.
Ours: extraction + pre-checks + Math-Verify in a worker process with a hard per-answer bound.
Worker start-up (once per process) is done before timing; the two graders run interleaved
chunk by chunk so that load from other processes hits both alike. The second pass (undecided
answers) re-grades answers both graders have seen, so Math-Verify's parse caches help both. Prints answers/s for both, the
slowdown factor ours/direct (target <= 1.5), the same on the answers no pre-check can decide
(pure round-trip overhead), and how often the two graders agree.
"""

from __future__ import annotations

import argparse
import logging
import random
import time


def _forms_of_integer(rng: random.Random, value: int) -> tuple[str, str]:
    truth = rng.choice([str(value), f"{value}.0"])
    return truth, rng.choice([str(value), f"{value}.0", f"{value:,}" if value >= 1000 else str(value)])


def synthetic_pair(rng: random.Random) -> tuple[str, str, str]:
    """(category, response, ground truth): about half right; integers, decimals, LaTeX, sets, no box."""
    right = rng.random() < 0.5
    kind = rng.choices(["integer", "fraction", "radical", "interval", "tuple", "polynomial", "nobox"],
                       weights=[40, 15, 10, 8, 8, 9, 10])[0]
    if kind == "integer":
        value = rng.randrange(0, 100000)
        truth, pred = _forms_of_integer(rng, value)
        if not right:
            pred = str(value + rng.randrange(1, 50))
    elif kind == "fraction":
        p, q = rng.randrange(1, 500), rng.randrange(2, 500)
        truth = f"\\frac{{{p}}}{{{q}}}"
        k = rng.randrange(1, 4)
        pred = rng.choice([f"\\dfrac{{{p * k}}}{{{q * k}}}", f"{p}/{q}", f"\\tfrac{{{p}}}{{{q}}}"])
        if not right:
            pred = f"\\frac{{{p + 1}}}{{{q}}}"
    elif kind == "radical":
        a, b = rng.randrange(2, 60), rng.choice([2, 3, 5, 6, 7, 10, 11])
        truth = f"{a}\\sqrt{{{b}}}"
        pred = rng.choice([f"\\sqrt{{{a * a * b}}}", f"{a} \\sqrt {b}"])
        if not right:
            pred = f"{a + 1}\\sqrt{{{b}}}"
    elif kind == "interval":
        lo, hi = sorted(rng.sample(range(-200, 200), 2))
        truth = f"({lo}, {hi}]"
        pred = f"({lo},{hi}]" if right else f"[{lo}, {hi}]"
    elif kind == "tuple":
        xs = [rng.randrange(-50, 50) for _ in range(rng.randrange(2, 4))]
        truth = "(" + ", ".join(map(str, xs)) + ")"
        pred = "(" + ",".join(map(str, xs if right else xs[::-1] + [1])) + ")"
    elif kind == "polynomial":
        a, b = rng.randrange(1, 30), rng.randrange(1, 30)
        truth = f"x^2+{a + b}x+{a * b}"
        pred = f"(x+{a})(x+{b})" if right else f"(x+{a})(x-{b})"
    else:  # no final answer at all
        truth, pred = str(rng.randrange(1000)), None
    reasoning = " ".join(rng.choice(["Let", "x", "be", "the", "sum", "so", "we", "get", "$2+2=4$", "hence"])
                         for _ in range(rng.randrange(20, 120)))
    response = reasoning + ("" if pred is None else f"\nTherefore the answer is $\\boxed{{{pred}}}$.")
    return kind, response, truth


def grade_direct(response: str, truth: str) -> bool:
    from math_verify import parse, verify

    try:
        return bool(verify(parse(f"\\boxed{{{truth}}}"), parse(response)))
    except Exception:  # noqa: BLE001
        return False


def timed_pair(fn_a, fn_b, pairs, chunk: int = 50) -> tuple[float, float, list[bool], list[bool]]:
    """Total seconds of `fn_a` and `fn_b` over `pairs`, interleaved chunk by chunk (alternating which
    goes first) so that load from other processes on the machine hits both alike."""
    t_a = t_b = 0.0
    out_a: list[bool] = []
    out_b: list[bool] = []
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        order = [(fn_a, out_a, 0), (fn_b, out_b, 1)]
        for fn, out, which in order if (i // chunk) % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            out.extend(fn(response, truth) for _, response, truth in part)
            elapsed = time.perf_counter() - start
            if which == 0:
                t_a += elapsed
            else:
                t_b += elapsed
    return t_a, t_b, out_a, out_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of synthetic responses (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    from verl_ext.reward import extract_answer, grader_pool, is_correct, normalize_answer, quick_verdict

    rng = random.Random(args.seed)
    pairs = [synthetic_pair(rng) for _ in range(args.n)]
    # Warm both paths on pairs outside the measured set (imports, worker start-up).
    warm = [synthetic_pair(random.Random(-1)) for _ in range(20)]
    grader_pool().grade("1", "1", 60.0)
    timed_pair(grade_direct, is_correct, warm)

    t_direct, t_ours, direct, ours = timed_pair(grade_direct, is_correct, pairs)
    undecided = [p for p in pairs if (a := extract_answer(p[1])) is not None
                 and quick_verdict(normalize_answer(a), normalize_answer(p[2])) is None]
    t_direct_u, t_ours_u, _, _ = timed_pair(grade_direct, is_correct, undecided)

    agree = sum(a == b for a, b in zip(direct, ours))
    print(f"responses: {len(pairs)} (correct by ours: {sum(ours)}, by direct: {sum(direct)}, agree: {agree / len(pairs):.1%})")
    print(f"math-verify direct (main thread): {len(pairs) / t_direct:8.1f} answers/s  ({t_direct:.2f} s)")
    print(f"safe grader (worker process):     {len(pairs) / t_ours:8.1f} answers/s  ({t_ours:.2f} s)")
    print(f"slowdown ours/direct, all answers: {t_ours / t_direct:.2f}x  (target <= 1.5)")
    if undecided:
        print(f"slowdown ours/direct, {len(undecided)} answers only Math-Verify can decide: "
              f"{t_ours_u / t_direct_u:.2f}x  ({len(undecided) / t_ours_u:.1f} vs {len(undecided) / t_direct_u:.1f} answers/s)")
    disagreements = [(k, r[-60:], t, a, b) for (k, r, t), a, b in zip(pairs, ours, direct) if a != b]
    for kind, tail, truth, a, b in disagreements[:5]:
        print(f"  disagree [{kind}] truth={truth!r} ours={a} direct={b} response tail={tail!r}")


if __name__ == "__main__":
    main()
