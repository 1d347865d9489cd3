"""Convert math datasets (DAPO-Math-17k, AIME, AMC, MATH-500, ...) into verl's RL parquet format.

    bash scripts/prepare_data.sh raw_dir=../shared/data            # the AIME + AMC files in that folder
    bash scripts/prepare_data.sh +datasets.math500.path=/data/math500.jsonl +datasets.math500.data_source=math500
    bash scripts/prepare_data.sh on_invalid=skip output_dir=data/eval

Input: local `.parquet` (a file or a folder of shards), `.jsonl` or `.json` files as published;
a hub id is loaded with `datasets` only when that package is installed and the hub reachable.
Field names differ between publications and are mapped: the problem is the first of
`PROBLEM_KEYS` present, the answer the first of `ANSWER_KEYS` (a MATH-style `solution`
contributes its last `\\boxed{}`; DAPO-Math-17k's chat `prompt` is unwrapped to the bare problem).

Output, one row per problem (verl's schema):
  data_source, prompt=[{"role": "user", "content": problem + "\\n" + suffix}], ability="math",
  reward_model={"style": "rule", "ground_truth": first accepted answer},
  extra_info={"index", "split", "id", "source_file", "accepted_answers", "raw_answer", "problem"}.

A row without a problem or an answer is skipped (`on_invalid=skip`, the default) and listed, by file,
line (JSONL) or row counted from 1, and keys, on stdout and in `<output_dir>/<name>.skipped.json`;
with `on_invalid=error` it stops the command. Never silently dropped. An empty input, or one with
no convertible row, is an error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra

from verl_ext.core.atomic_io import atomic_write_bytes, atomic_write_parquet
from verl_ext.core.checks import ConfigError, check_choice, check_flag, check_writable_dir, exit_on_config_error
from verl_ext.core.paths import config_dir
from verl_ext.core.prompts import PROMPT_SUFFIX, format_problem

PROBLEM_KEYS = ("problem", "question", "Problem", "Question", "prompt")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "ground_truth", "reward_model", "solution", "Solution")
ID_KEYS = ("id", "ID", "unique_id", "problem_id")
ON_INVALID = ("error", "skip")
MAX_BARE_SOLUTION_CHARS = 100
PROMPT_STYLES = ("suffix", "original")
_TWO_ACCEPTED = re.compile(r"^\s*(.+?)\s+or\s+(.+?)\s*\((?:both|either)[^)]*accepted\)\s*$", re.IGNORECASE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::\w+)?")
_DAPO_PREFIX = re.compile(
    r"^Solve the following math problem step by step\. The last line of your response should be of the form "
    r"Answer: \$Answer \(without quotes\) where \$Answer is the answer to the problem\.\s*"
)
_DAPO_SUFFIX = re.compile(r"\s*Remember to put your answer on its own line after \"Answer:\"\.?\s*$")


class DataPrepError(ConfigError):
    """Input rows that cannot be converted (each named by file and index)."""


@dataclass
class InvalidRow:
    source_file: str
    index: int  # position among the file's records, from 0 (extra_info.index of converted rows)
    reason: str
    keys: list[str] = field(default_factory=list)
    where: str = ""  # "line N" of a JSONL file, else "row N", both counted from 1

    def __str__(self) -> str:
        where = self.where or f"row {self.index + 1}"
        return f"{self.source_file} {where}: {self.reason} (row keys: {', '.join(self.keys)})"


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path) -> list[dict]:
    """Rows of a `.jsonl`, `.json` (a list) or `.parquet` file, or of a folder of parquet shards."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(p.rglob("*.parquet"))
        if not shards:
            raise FileNotFoundError(f"{p}: folder holds no .parquet files")
        return [row for shard in shards for row in read_records(shard)]
    if not p.is_file():
        if _HUB_ID.fullmatch(str(path)) and not p.is_absolute() and p.suffix not in (".parquet", ".jsonl", ".json"):
            return _read_hub(str(path))
        raise FileNotFoundError(f"{path}: no such file or folder")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataPrepError(f"{p} line {lineno}: not valid JSON ({err.msg})") from None
        return rows
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataPrepError(f"{p}: a .json input must hold a list of rows, got {type(data).__name__}")
        return data
    raise DataPrepError(f"{p}: unsupported file type {p.suffix!r}; valid: .parquet, .jsonl, .json, a folder of .parquet")


def record_locations(path: str | Path, count: int) -> list[str]:
    """Where each of `count` records of `path` is, for messages: "line N" (JSONL: its non-blank lines,
    counted from 1) or "row N" (counted from 1)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            lines = [f"line {n}" for n, line in enumerate(f, start=1) if line.strip()]
        if len(lines) == count:
            return lines
    return [f"row {i + 1}" for i in range(count)]


def _read_hub(name: str) -> list[dict]:
    """A hub dataset `org/name[:split]` through `datasets`, when installed (and the hub reachable)."""
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(
            f"{name!r}: no such file, and the `datasets` package is not installed to load it from a hub"
        ) from None
    repo, _, split = name.partition(":")
    try:
        return list(datasets.load_dataset(repo, split=split or "train"))
    except Exception as err:  # noqa: BLE001  (offline, unknown id, ...)
        raise FileNotFoundError(f"{name!r}: no such local file, and loading it from the hub failed: {err}") from None


# ----------------------------------------------------------------------------- fields


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return not (isinstance(value, str) and not value.strip())


def unwrap_dapo_prompt(text: str) -> str:
    """DAPO-Math-17k's published prompt without its "Answer:" instructions: the bare problem."""
    return _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", text)).strip()


def problem_of(row: dict) -> str | None:
    """The problem statement: first present key of PROBLEM_KEYS; a chat `prompt` gives its last user turn."""
    for key in PROBLEM_KEYS:
        value = row.get(key)
        if isinstance(value, str):
            if value.strip():
                return unwrap_dapo_prompt(value) if key == "prompt" else value.strip()
        elif key == "prompt" and (isinstance(value, (list, tuple)) or hasattr(value, "tolist")):
            messages = value.tolist() if hasattr(value, "tolist") else list(value)
            users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            if users and isinstance(users[-1], str) and users[-1].strip():
                return unwrap_dapo_prompt(users[-1])
    return None


def format_number(value: float) -> str:
    """`142.0` -> "142", `2.5` -> "2.5", `7` -> "7"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def accepted_answers(raw: Any, from_solution: bool = False) -> list[str] | None:
    """Accepted answers of a raw answer field, or None when there is none.

    Numbers are written without a spurious `.0`; "080 or 081 (both were accepted)" gives both;
    a solution (`from_solution`) contributes the content of its last `\\boxed{}`, or itself when it is
    a single short line (DAPO-Math-17k-Processed stores the bare answer under `solution`).
    """
    from verl_ext.reward import extract_boxed_answer

    if isinstance(raw, dict):  # verl's reward_model column
        return accepted_answers(raw.get("ground_truth"))
    if not _present(raw):
        return None
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        return [format_number(raw)]
    text = str(raw).strip()
    boxed = extract_boxed_answer(text)
    if from_solution:  # a worked solution: its boxed answer; a short one-line "solution" is the answer itself
        if boxed:
            return [boxed]
        return [text] if len(text) <= MAX_BARE_SOLUTION_CHARS and "\n" not in text else None
    if boxed and text.startswith(("\\boxed", "$\\boxed")):
        text = boxed
    pair = _TWO_ACCEPTED.match(text)
    if pair:
        return [pair.group(1).strip(), pair.group(2).strip()]
    return [text]


def answer_of(row: dict) -> tuple[list[str] | None, Any]:
    """(accepted answers, raw value) from the first present key of ANSWER_KEYS."""
    for key in ANSWER_KEYS:
        if key in row and _present(row[key]):
            return accepted_answers(row[key], from_solution=key in ("solution", "Solution")), row[key]
    return None, None


def id_of(row: dict) -> str:
    for key in ID_KEYS:
        if key in row and _present(row[key]):
            return str(row[key])
    return ""


# ----------------------------------------------------------------------------- conversion


def convert_rows(
    records: list[dict],
    *,
    source_file: str,
    data_source: str,
    split: str = "test",
    suffix: str = PROMPT_SUFFIX,
    prompt_style: str = "suffix",
    keep: dict[str, list] | None = None,
) -> tuple[list[dict], list[InvalidRow]]:
    """verl rows for the valid records and the invalid ones (file, index, reason).

    `keep={"year": [2024]}` keeps only records whose field has one of the values (a record
    without the field is invalid). `prompt_style="original"` keeps a chat `prompt` as published
    (e.g. DAPO-Math-17k's "Answer:" instructions) instead of problem + suffix.
    """
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style={prompt_style!r} is invalid; valid choices: {', '.join(PROMPT_STYLES)}")
    rows, invalid = [], []
    for index, record in enumerate(records):
        keys = [str(k) for k in record]
        if keep:
            missing = [f for f in keep if f not in record]
            if missing:
                invalid.append(InvalidRow(source_file, index, f"no field {missing[0]!r} to filter on", keys))
                continue
            if not all(record[f] in list(values) for f, values in keep.items()):
                continue
        problem = problem_of(record)
        answers, raw = answer_of(record)
        if problem is None:
            invalid.append(InvalidRow(source_file, index, f"no problem (looked for {', '.join(PROBLEM_KEYS)})", keys))
            continue
        if answers is None:
            invalid.append(InvalidRow(source_file, index, f"no answer (looked for {', '.join(ANSWER_KEYS)})", keys))
            continue
        if prompt_style == "original" and not isinstance(record.get("prompt"), str) and record.get("prompt") is not None:
            prompt = [{"role": m["role"], "content": m["content"]} for m in list(record["prompt"])]
        else:
            prompt = [{"role": "user", "content": format_problem(problem, suffix)}]
        rows.append(
            {
                "data_source": data_source,
                "prompt": prompt,
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answers[0]},
                "extra_info": {
                    "index": index,
                    "split": split,
                    "id": id_of(record),
                    "source_file": source_file,
                    "accepted_answers": answers,
                    "raw_answer": str(raw if not isinstance(raw, dict) else raw.get("ground_truth")),
                    "problem": problem,
                },
            }
        )
    return rows, invalid


def deduplicate(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each (problem, ground truth); return (rows, number removed)."""
    seen, kept = set(), []
    for row in rows:
        key = (row["extra_info"]["problem"], row["reward_model"]["ground_truth"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """Write verl rows to parquet atomically (temporary file + rename)."""
    import pyarrow as pa

    if not rows:
        raise DataPrepError(f"{path}: no rows to write")
    return atomic_write_parquet(path, pa.Table.from_pylist(rows))


@dataclass
class PreparedDataset:
    name: str
    output: Path | None
    num_rows: int
    skipped: list[InvalidRow]
    duplicates_removed: int = 0


def prepare_dataset(
    name: str,
    path: str | Path,
    output_dir: str | Path,
    *,
    data_source: str | None = None,
    split: str = "test",
    suffix: str = PROMPT_SUFFIX,
    prompt_style: str = "suffix",
    keep: dict[str, list] | None = None,
    on_invalid: str = "error",
    dedupe: bool = False,
) -> PreparedDataset:
    """Read `path`, convert, write `<output_dir>/<name>.parquet` (and `<name>.skipped.json` if rows were skipped)."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid={on_invalid!r} is invalid; valid choices: {', '.join(ON_INVALID)}")
    records = read_records(path)
    if not records:
        raise DataPrepError(f"datasets.{name}.path={str(path)!r}: the input has no rows")
    rows, invalid = convert_rows(
        records, source_file=str(path), data_source=data_source or name, split=split, suffix=suffix,
        prompt_style=prompt_style, keep=keep,
    )
    locations = record_locations(path, len(records))
    for row in invalid:
        row.where = locations[row.index]
    if not rows and invalid:
        raise DataPrepError(
            f"datasets.{name}.path={str(path)!r}: none of its {len(records)} rows can be converted; the first: {invalid[0]}"
        )
    if invalid and on_invalid == "error":
        listing = "\n  ".join(str(r) for r in invalid)
        raise DataPrepError(
            f"dataset {name!r}: {len(invalid)} of {len(records)} rows cannot be converted:\n  {listing}\n"
            "Fix the file, or pass on_invalid=skip to skip these rows (they are then listed in "
            f"{name}.skipped.json)."
        )
    removed = 0
    if dedupe:
        rows, removed = deduplicate(rows)
    output_dir = Path(output_dir)
    if invalid:
        report = [{"source_file": r.source_file, "index": r.index, "where": r.where, "reason": r.reason, "keys": r.keys}
                  for r in invalid]
        atomic_write_bytes(output_dir / f"{name}.skipped.json", json.dumps(report, indent=1).encode())
    output = write_parquet(rows, output_dir / f"{name}.parquet") if rows else None
    return PreparedDataset(name, output, len(rows), invalid, removed)


# ----------------------------------------------------------------------------- command


def _raw_dir_hint(cfg, name: str, path: str) -> str:
    """How to supply a default dataset's file when `raw_dir` lacks it (they are not shipped)."""
    raw_dir = str(cfg.get("raw_dir") or "")
    if not raw_dir or Path(path).parent != Path(raw_dir):
        return ""
    where = "" if Path(raw_dir).is_absolute() else " (relative to this folder)"
    return (f"; the default datasets are read from raw_dir={raw_dir!r}{where}: copy "
            f"{Path(path).name} there, give raw_dir=<the folder that has it>, or drop it with ~datasets.{name}")


def run(cfg) -> list[PreparedDataset]:
    from omegaconf import OmegaConf

    if not cfg.datasets:
        raise DataPrepError("no datasets configured: add one, e.g. +datasets.math500.path=/data/math500.jsonl")
    check_choice(cfg.on_invalid, "on_invalid", ON_INVALID)
    check_writable_dir(cfg.output_dir, "output_dir")
    specs = {}
    for name, spec in cfg.datasets.items():  # every dataset's settings checked before any is written
        spec = OmegaConf.to_container(spec, resolve=True)
        unknown = set(spec) - {"path", "data_source", "split", "prompt_style", "keep", "dedupe"}
        if unknown:
            raise DataPrepError(
                f"datasets.{name}: unknown keys {sorted(unknown)}; valid: path, data_source, split, prompt_style, keep, dedupe"
            )
        if not spec.get("path"):
            raise DataPrepError(f"datasets.{name}.path is not set")
        if not Path(str(spec["path"])).exists() and not _HUB_ID.fullmatch(str(spec["path"])):
            raise DataPrepError(f"datasets.{name}.path={str(spec['path'])!r}: no such file or folder"
                                + _raw_dir_hint(cfg, name, str(spec["path"])))
        check_flag(spec.get("dedupe", False), f"datasets.{name}.dedupe")
        specs[name] = spec
    results = []
    for name, spec in specs.items():
        result = prepare_dataset(
            name, spec["path"], cfg.output_dir, data_source=spec.get("data_source"), split=spec.get("split", "test"),
            suffix=cfg.suffix, prompt_style=spec.get("prompt_style", "suffix"), keep=spec.get("keep"),
            on_invalid=cfg.on_invalid, dedupe=spec.get("dedupe", False),
        )
        skipped = f" ({len(result.skipped)} skipped, listed below and in {name}.skipped.json)" if result.skipped else ""
        print(f"[prepare_data] {name}: {result.num_rows} rows -> {result.output}{skipped}")
        if result.duplicates_removed:
            print(f"[prepare_data] {name}: removed {result.duplicates_removed} duplicate problems")
        for row in result.skipped:
            print(f"[prepare_data] {name}: skipped {row}")
        results.append(result)
    return results


@hydra.main(version_base=None, config_path=str(config_dir()), config_name="prepare_data")
def main(cfg) -> None:
    with exit_on_config_error("prepare_data", (ConfigError, FileNotFoundError, ValueError)):
        run(cfg)


if __name__ == "__main__":
    main()
