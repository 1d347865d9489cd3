"""Grade generations, group them by problem, aggregate per dataset, write markdown / JSON / JSONL.

A generation record is a dict with `data_source`, `prompt_id`, `response`, `ground_truth` and
optionally `accepted_answers` (list, any one counts), `response_length` (tokens) and
`sample_index`. Results are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from verl_ext.core.atomic_io import atomic_write_bytes
from verl_ext.evaluation.metrics import avg_at_k, pass_at_k


@dataclass
class ProblemResult:
    data_source: str
    prompt_id: str
    ground_truth: str
    correct: list[bool] = field(default_factory=list)
    preds: list[str] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def num_correct(self) -> int:
        return sum(self.correct)


def grade_records(records: list[dict], timeout_s: float, show_progress: bool = True) -> list[tuple[bool, str]]:
    """(correct, extracted answer) per record, graded in parallel by the reward's worker pool."""
    from verl_ext.reward import extract_answer, grade_many

    truths = [r["accepted_answers"] if _has_answers(r.get("accepted_answers")) else r["ground_truth"] for r in records]
    responses = [r["response"] for r in records]
    correct = grade_many(responses, truths, timeout_s=timeout_s, show_progress=show_progress)
    return [(ok, extract_answer(resp) or "") for ok, resp in zip(correct, responses)]


def _has_answers(value) -> bool:
    return value is not None and not isinstance(value, str) and len(value) > 0


def response_length(record: dict) -> int:
    """Tokens when the record has `response_length`, else characters of the response."""
    value = record.get("response_length")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return len(record["response"])
    return int(value)


def group_by_problem(records: list[dict], graded: list[tuple[bool, str]]) -> list[ProblemResult]:
    """One ProblemResult per (data_source, prompt_id), samples in record order."""
    problems: dict[tuple[str, str], ProblemResult] = {}
    for record, (ok, pred) in zip(records, graded):
        key = (str(record["data_source"]), str(record["prompt_id"]))
        if key not in problems:
            problems[key] = ProblemResult(key[0], key[1], str(record["ground_truth"]))
        problem = problems[key]
        problem.correct.append(bool(ok))
        problem.preds.append(pred)
        problem.response_lengths.append(response_length(record))
    return list(problems.values())


def aggregate(problems: list[ProblemResult], pass_ks: list[int], avg_k: int | None) -> dict[str, dict]:
    """Per data source: problems, samples per problem, Avg@k, Pass@k for each k, mean response length.

    `avg_k=None` uses the (smallest) number of samples per problem. Every k must not exceed the
    samples of any problem of that data source (a ValueError names the k, dataset and n).
    """
    by_source: dict[str, list[ProblemResult]] = defaultdict(list)
    for p in problems:
        by_source[p.data_source].append(p)
    table = {}
    for source in sorted(by_source):
        group = by_source[source]
        n_min = min(p.n for p in group)
        n_max = max(p.n for p in group)
        k_avg = n_min if avg_k is None else avg_k
        for k in [k_avg, *pass_ks]:
            if k > n_min:
                worst = min(group, key=lambda p: p.n)
                raise ValueError(
                    f"k={k} is larger than the {n_min} samples of problem {worst.prompt_id!r} in {source!r}: "
                    f"sample at least {k} responses per problem or lower metrics.pass_ks / metrics.avg_k"
                )
        lengths = [x for p in group for x in p.response_lengths]
        row = {
            "num_problems": len(group),
            "samples_per_problem": n_min if n_min == n_max else f"{n_min}-{n_max}",
            f"avg@{k_avg}": sum(avg_at_k(p.n, p.num_correct, k_avg) for p in group) / len(group),
        }
        for k in pass_ks:
            row[f"pass@{k}"] = sum(pass_at_k(p.n, p.num_correct, k) for p in group) / len(group)
        row["mean_response_length"] = sum(lengths) / len(lengths)
        table[source] = row
    return table


def markdown_table(table: dict[str, dict], length_unit: str) -> str:
    """The aggregate as a markdown table; rates in percent, "-" where a dataset lacks a column."""
    if not table:
        return "(no results)\n"
    metric_cols: list[str] = []  # union over datasets (Avg@n differs when datasets have different n)
    for row in table.values():
        metric_cols += [c for c in row if c.startswith(("avg@", "pass@")) and c not in metric_cols]
    header = ["dataset", "problems", "samples", *[c.replace("avg", "Avg").replace("pass", "Pass") for c in metric_cols],
              f"mean length ({length_unit})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for source, row in table.items():
        cells = [source, str(row["num_problems"]), str(row["samples_per_problem"])]
        cells += [f"{100 * row[c]:.2f}" if c in row else "-" for c in metric_cols]
        cells.append(f"{row['mean_response_length']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def write_jsonl(path: Path, rows) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def write_results(output_dir: Path, problems: list[ProblemResult], table: dict[str, dict], length_unit: str,
                  settings: dict) -> dict[str, Path]:
    """per_problem.jsonl, results.json, results.md under `output_dir` (each written atomically)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"per_problem": output_dir / "per_problem.jsonl", "json": output_dir / "results.json",
             "markdown": output_dir / "results.md"}
    write_jsonl(paths["per_problem"], (
        {**asdict(p), "n": p.n, "num_correct": p.num_correct} for p in problems
    ))
    write_json(paths["json"], {"settings": settings, "length_unit": length_unit, "datasets": table})
    atomic_write_bytes(paths["markdown"], markdown_table(table, length_unit).encode())
    return paths


def log_to_wandb(run, table: dict[str, dict]) -> None:
    """Log the per-dataset table to a started wandb run (`verl_ext.wandb_logging.start_run`) and finish it:
    every number as `eval/<dataset>/<metric>`, and the whole table as `eval/table`."""
    import wandb

    try:
        metrics = {f"eval/{source}/{key}": value for source, row in table.items() for key, value in row.items()
                   if isinstance(value, (int, float))}
        columns = ["dataset", *next(iter(table.values())).keys()]
        metrics["eval/table"] = wandb.Table(columns=columns,
                                            data=[[s, *[str(v) for v in row.values()]] for s, row in table.items()])
        run.log(metrics)  # one history row
    finally:
        run.finish()
