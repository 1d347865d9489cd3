"""verl_ext.data_prep: the shared AIME / AMC files, field mapping, invalid rows, the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from verl_ext.core.prompts import PROMPT_SUFFIX
from verl_ext.data_prep import (
    DataPrepError,
    accepted_answers,
    convert_rows,
    prepare_dataset,
    problem_of,
    read_records,
    unwrap_dapo_prompt,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
AIME = SHARED_DATA / "aime_2021_2024.jsonl"
AMC = SHARED_DATA / "amc_2022_2023.jsonl"


def test_aime_row_without_answer_is_an_error_naming_file_and_index(tmp_path):
    with pytest.raises(DataPrepError) as err:
        prepare_dataset("aime", AIME, tmp_path)
    message = str(err.value)
    assert f"{AIME} line 7: no answer" in message and "F" in message and "on_invalid=skip" in message
    assert not list(tmp_path.iterdir()), "nothing written on error"


def test_aime_skip_with_report(tmp_path):
    result = prepare_dataset("aime", AIME, tmp_path, data_source="aime", on_invalid="skip")
    assert result.num_rows == 102 and [r.index for r in result.skipped] == [6]
    report = json.loads((tmp_path / "aime.skipped.json").read_text())
    assert report[0]["index"] == 6 and report[0]["where"] == "line 7" and report[0]["source_file"] == str(AIME) and "F" in report[0]["keys"]
    rows = pq.read_table(tmp_path / "aime.parquet").to_pylist()
    raw = [json.loads(line) for line in AIME.read_text().splitlines()]
    assert len(rows) == 102 and 6 not in {r["extra_info"]["index"] for r in rows}
    for row in rows:
        source = raw[row["extra_info"]["index"]]
        assert row["data_source"] == "aime" and row["ability"] == "math"
        assert row["prompt"] == [{"role": "user", "content": source["question"].strip() + "\n" + PROMPT_SUFFIX}]
        assert row["reward_model"]["style"] == "rule"
        assert row["extra_info"]["id"] == source["id"] and row["extra_info"]["split"] == "test"
        if " or " not in source["answer"]:
            assert row["reward_model"]["ground_truth"] == source["answer"]
    two = [r for r in rows if len(r["extra_info"]["accepted_answers"]) == 2]
    assert [r["extra_info"]["accepted_answers"] for r in two] == [["080", "081"]]
    assert two[0]["extra_info"]["raw_answer"] == "080 or 081 (both were accepted)"


def test_amc_float_answers_and_other_schema(tmp_path):
    result = prepare_dataset("amc", AMC, tmp_path)
    rows = pq.read_table(tmp_path / "amc.parquet").to_pylist()
    raw = [json.loads(line) for line in AMC.read_text().splitlines()]
    assert result.num_rows == len(rows) == len(raw) == 83 and not result.skipped
    for row, source in zip(rows, raw):
        assert row["data_source"] == "amc"
        assert row["reward_model"]["ground_truth"] == str(int(source["answer"]))  # 142.0 -> "142"
        assert row["prompt"][0]["content"].startswith(source["problem"].strip())
        assert row["extra_info"]["id"] == str(source["id"])


def test_keep_filter_selects_aime24(tmp_path):
    result = prepare_dataset("aime24", AIME, tmp_path, keep={"year": [2024]})
    assert result.num_rows == 14


def test_field_mapping_of_published_schemas():
    dapo_prompt = ("Solve the following math problem step by step. The last line of your response should be of the "
                   "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
                   "What is $1+1$?\n\nRemember to put your answer on its own line after \"Answer:\".")
    records = [
        {"problem": "MATH-500 style", "solution": "long ... \\boxed{\\frac{1}{2}}", "answer": "\\frac{1}{2}"},
        {"problem": "MATH style", "solution": "so the result is \\boxed{3\\sqrt{2}}."},
        {"Problem": "AIME24 (Maxwell-Jia)", "Answer": 204},
        {"question": "AIME25 (opencompass)", "answer": "70"},
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": dapo_prompt}],
         "reward_model": {"ground_truth": "2", "style": "rule"}},
        {"prompt": "DAPO processed", "solution": "34"},
    ]
    rows, invalid = convert_rows(records, source_file="mem", data_source="mix")
    assert invalid == []
    assert [r["extra_info"]["problem"] for r in rows] == [
        "MATH-500 style", "MATH style", "AIME24 (Maxwell-Jia)", "AIME25 (opencompass)", "What is $1+1$?",
        "DAPO processed"]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["\\frac{1}{2}", "3\\sqrt{2}", "204", "70", "2", "34"]
    long_solution = {"problem": "p", "solution": "We compute step by step.\nThe result follows."}
    _, invalid = convert_rows([long_solution], source_file="mem", data_source="mix")
    assert [i.index for i in invalid] == [0]


def test_helpers():
    assert accepted_answers(142.0) == ["142"] and accepted_answers(2.5) == ["2.5"] and accepted_answers(7) == ["7"]
    assert accepted_answers("080 or 081 (both were accepted)") == ["080", "081"]
    assert accepted_answers("\\boxed{5}") == ["5"]
    assert accepted_answers(" ") is None and accepted_answers(float("nan")) is None and accepted_answers(None) is None
    assert unwrap_dapo_prompt("plain") == "plain"
    assert problem_of({"question": "  q "}) == "q" and problem_of({"answer": 1}) is None


def test_rows_without_problem_or_with_empty_answer_are_reported():
    records = [{"problem": "ok", "answer": "1"}, {"problem": "", "answer": "2"}, {"problem": "x", "answer": "  "},
               {"problem": "y", "answer": float("nan")}]
    rows, invalid = convert_rows(records, source_file="f.jsonl", data_source="d")
    assert len(rows) == 1
    assert [(i.index, i.reason.split(" (")[0]) for i in invalid] == [(1, "no problem"), (2, "no answer"),
                                                                      (3, "no answer")]


def test_read_records_formats_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"problem": "p", "answer": "1"}]))
    assert read_records(tmp_path / "a.json") == [{"problem": "p", "answer": "1"}]
    (tmp_path / "b.jsonl").write_text('{"problem": "p"}\nnot json\n')
    with pytest.raises(DataPrepError, match="b.jsonl line 2: not valid JSON"):
        read_records(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DataPrepError, match="unsupported file type '.csv'"):
        read_records(tmp_path / "c.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="on_invalid='drop' is invalid; valid choices: error, skip"):
        prepare_dataset("x", tmp_path / "a.json", tmp_path, on_invalid="drop")


def test_prepare_data_command(tmp_path):
    """scripts/prepare_data.sh as the README writes it works on the shared files: the AIME row without an
    answer is skipped and reported; on_invalid=error stops there instead."""
    env = {**os.environ, "PYTHON": sys.executable}
    script = str(REPO / "scripts" / "prepare_data.sh")
    run = {"capture_output": True, "text": True, "env": env, "timeout": 120}
    ok = subprocess.run(["bash", script, f"raw_dir={SHARED_DATA}"], check=False, cwd=tmp_path, **run)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = tmp_path / "data" / "prepared"
    assert "aime_2021_2024: 102 rows" in ok.stdout and "amc_2022_2023: 83 rows" in ok.stdout
    assert "1 skipped" in ok.stdout and "aime_2021_2024.jsonl line 7: no answer" in ok.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "aime_2021_2024.parquet", "aime_2021_2024.skipped.json", "amc_2022_2023.parquet"]
    failed = subprocess.run(["bash", script, f"raw_dir={SHARED_DATA}", f"output_dir={tmp_path / 'strict'}",
                             "on_invalid=error"], check=False, **run)
    assert failed.returncode == 2 and "aime_2021_2024.jsonl line 7: no answer" in failed.stderr
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "datasets.bad.path='{path}': the input has no rows"),
        ("\n\n", "datasets.bad.path='{path}': the input has no rows"),
        ('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"\n', "{path} line 2: not valid JSON"),
        ('{"problem": "1+1"}\n{"question": "2+2"}\n',
         "datasets.bad.path='{path}': none of its 2 rows can be converted; the first: {path} line 1: no answer"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "prepare_data.sh"), "~datasets.aime_2021_2024", "~datasets.amc_2022_2023",
         f"+datasets.bad.path={path}", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"[prepare_data] error: {message.format(path=path)}"), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_missing_input_names_the_key(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "prepare_data.sh"), "datasets.aime_2021_2024.path=/nonexistent/aime.jsonl",
         f"output_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "[prepare_data] error: datasets.aime_2021_2024.path='/nonexistent/aime.jsonl': no such file or folder")


def test_every_dataset_is_checked_before_any_is_written(tmp_path):
    """A bad setting of the second dataset (dedupe=no: a string, which Python reads as true) stops the command
    before the first one is written."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "prepare_data.sh"), f"raw_dir={SHARED_DATA}", "+datasets.amc_2022_2023.dedupe=no",
         f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "[prepare_data] error: datasets.amc_2022_2023.dedupe='no' is invalid; valid: true, false"
    assert not (tmp_path / "out").exists()


def test_default_datasets_come_from_raw_dir_inside_the_working_folder(tmp_path):
    """No default path outside the repository: the default files are read from data/raw (relative to the
    working folder), and their absence is one line saying how to supply them."""
    env = {**os.environ, "PYTHON": sys.executable}
    script = str(REPO / "scripts" / "prepare_data.sh")
    proc = subprocess.run(["bash", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "[prepare_data] error: datasets.aime_2021_2024.path='data/raw/aime_2021_2024.jsonl': no such file or folder; "
        "the default datasets are read from raw_dir='data/raw' (relative to this folder): copy aime_2021_2024.jsonl "
        "there, give raw_dir=<the folder that has it>, or drop it with ~datasets.aime_2021_2024")
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    for path in (AIME, AMC):
        (raw / path.name).write_bytes(path.read_bytes())
    ok = subprocess.run(["bash", script], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120,
                        check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "aime_2021_2024: 102 rows" in ok.stdout and "amc_2022_2023: 83 rows" in ok.stdout
