"""Grading under concurrent callers: our safe grader (`verl_ext.reward.compute_score`) from N threads vs
Math-Verify called directly in the main thread.

    python benchmarks/bench_grading.py                     # 10k responses, 1% adversarial, 8 threads, 5 s bound
    python benchmarks/bench_grading.py --n 2000 --bound 2  # quicker

The responses are synthetic (integers, fractions, radicals, intervals, tuples, polynomials, no box), and a
fraction `--adversarial` of them are adversarial (a polynomial Math-Verify expands for minutes, power
towers, huge factorials, deep nesting, 100k characters of unclosed boxes, ...).

Baseline, in the same run: Math-Verify the way it is usually called, in the main thread with its own
signal-based timeouts, `verify(parse("\\boxed{gt}"), parse(response))`, on the clean responses only
(the adversarial ones would stall it). Measured twice, before and after ours (A-B-A), and averaged.
Ours: `compute_score(..., timeout_s=bound)` from `--threads` threads (verl's reward loop calls it from a
thread pool), the pool warmed first (worker start-up is once per process). Prints answers/s of both, the
ratio of times ours/direct on the same clean responses (target <= 1.5), and per-call latency over all
responses, waiting for a worker included: p50, p99, max (target p99 <= bound + 1 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor


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


ADVERSARIAL = [
    "\\boxed{(x+1)^{100000}}",  # Math-Verify expands it for minutes: only the bound ends it
    "\\boxed{9^{9^{9}}}",
    "\\boxed{(10^{8})!}",
    "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "\\boxed{" + "\\frac{1}{" * 500 + "2" + "}" * 500 + "}",
    "\\boxed{" * 15_000,  # a model stuck in a loop: 100k characters of unclosed boxes
    "\\boxed{" + "1" * 100_000 + "}",
    "\\boxed{\\frac{1}{2004!}}",
    "\\boxed{\\frac{\\frac{}{}}{\\sqrt[}{}\\left(\\right.\\begin{matrix}}",
    "x" * 100_000,
]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank: sorted(values)[ceil(q·n) − 1]."""
    import math

    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def grade_threads(pairs, threads: int, bound: float) -> tuple[float, list[float], list[bool]]:
    """(seconds, per-call latencies, verdicts) of compute_score over `pairs` from `threads` threads."""
    from verl_ext.reward import compute_score

    def one(pair):
        start = time.perf_counter()
        out = compute_score("bench", pair[1], pair[2], timeout_s=bound)
        return time.perf_counter() - start, out["acc"]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, pairs))
    return time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]


def grade_direct_all(pairs) -> tuple[float, list[bool]]:
    start = time.perf_counter()
    verdicts = [grade_direct(response, truth) for _, response, truth in pairs]
    return time.perf_counter() - start, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of responses (default 10000)")
    parser.add_argument("--adversarial", type=float, default=0.01, help="fraction of adversarial responses")
    parser.add_argument("--threads", type=int, default=8, help="concurrent callers (default 8)")
    parser.add_argument("--bound", type=float, default=5.0, help="grader.timeout_s (default 5, the reward's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    rng = random.Random(args.seed)
    num_adversarial = round(args.n * args.adversarial)
    clean = [synthetic_pair(rng) for _ in range(args.n - num_adversarial)]
    adversarial = [("adversarial", ADVERSARIAL[i % len(ADVERSARIAL)], str(rng.randrange(1000)))
                   for i in range(num_adversarial)]
    everything = clean + adversarial
    rng.shuffle(everything)

    warm = [synthetic_pair(random.Random(-1)) for _ in range(200)]
    grade_threads(warm, args.threads, 60.0)  # the pool grows to one worker per thread
    time.sleep(3.0)  # the spare's start-up
    grade_direct_all(warm)

    t_direct_1, direct = grade_direct_all(clean)
    t_ours_clean, _, ours_clean = grade_threads(clean, args.threads, args.bound)
    t_ours_all, latencies, _ = grade_threads(everything, args.threads, args.bound)
    t_direct_2, _ = grade_direct_all(clean)
    t_direct = (t_direct_1 + t_direct_2) / 2

    agree = sum(a == b for a, b in zip(direct, ours_clean))
    over = sum(x > args.bound + 1.0 for x in latencies)
    print(f"responses: {len(everything)} ({num_adversarial} adversarial), {args.threads} threads, bound {args.bound} s")
    print(f"math-verify direct, main thread, clean {len(clean)}: {len(clean) / t_direct:8.1f} answers/s "
          f"({t_direct_1:.2f} s, {t_direct_2:.2f} s)")
    print(f"safe grader, {args.threads} threads, clean {len(clean)}:        {len(clean) / t_ours_clean:8.1f} answers/s "
          f"({t_ours_clean:.2f} s)")
    print(f"safe grader, {args.threads} threads, all {len(everything)}:         {len(everything) / t_ours_all:8.1f} answers/s "
          f"({t_ours_all:.2f} s)")
    print(f"ratio of times ours/direct on the clean responses: {t_ours_clean / t_direct:.2f}x vs the mean of both "
          f"direct passes, {t_ours_clean / t_direct_1:.2f}x vs the first (both cold: Math-Verify caches parses)  "
          f"(target <= 1.5)")
    print(f"latency per call, all responses, waiting included: p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
          f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies):.2f} s; "
          f"{over} calls over bound + 1 s  (target p99 <= {args.bound + 1:.1f} s)")
    print(f"verdicts agree with direct Math-Verify on {agree / len(clean):.1%} of the clean responses")
    disagreements = [(k, r[-50:], t, a, b) for (k, r, t), a, b in zip(clean, ours_clean, direct) if a != b]
    for kind, tail, truth, a, b in disagreements[:5]:
        print(f"  disagree [{kind}] truth={truth!r} ours={a} direct={b} response tail={tail!r}")
    print("RESULT " + json.dumps({  # for benchmarks/record.py
        "ratio": round(t_ours_clean / t_direct, 4), "ratio_of": "time ours / Math-Verify direct, clean responses",
        "target": "<= 1.5; p99 <= bound + 1 s", "ratio_vs_first_direct_pass": round(t_ours_clean / t_direct_1, 4),
        "direct_clean_answers_per_s": round(len(clean) / t_direct, 1),
        "ours_clean_answers_per_s": round(len(clean) / t_ours_clean, 1),
        "ours_all_answers_per_s": round(len(everything) / t_ours_all, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 4), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "latency_max_s": round(max(latencies), 2), "calls_over_bound_plus_1s": over, "calls": len(everything),
        "verdicts_agree": round(agree / len(clean), 4), "responses": args.n, "adversarial": num_adversarial,
        "threads": args.threads, "bound_s": args.bound}))


if __name__ == "__main__":
    main()
