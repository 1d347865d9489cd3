"""benchmarks/record.py: a run becomes one complete record, and docs/benchmarks.md is the store's rendering."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recorder():
    spec = importlib.util.spec_from_file_location("benchmark_record", ROOT / "benchmarks" / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


record = _recorder()

FAKE = """
print("warming up")
print("ratio ours/baseline = 0.95")
print('RESULT {"ratio": 0.95, "ratio_of": "ours / baseline", "target": "<= 1.10", "ours_ms": 1.5, "n": 3}')
"""

TEMPLATE = "# Measured numbers\n\nIntro.\n\n## Fake\n\n<!-- records: fake -->\n\nAfter.\n"


def _run(tmp_path: Path, *extra: str) -> int:
    script = tmp_path / "bench_fake.py"
    script.write_text(FAKE)
    return record.main([
        "--store", str(tmp_path / "records.jsonl"), "--template", str(tmp_path / "template.md"),
        "--output", str(tmp_path / "benchmarks.md"), "--note", "test machine", *extra,
        "--", sys.executable, str(script),
    ])


def test_a_run_appends_one_complete_record_and_regenerates(tmp_path, capsys):
    (tmp_path / "template.md").write_text(TEMPLATE)
    assert _run(tmp_path, "--benchmark", "fake") == 0
    assert "ratio ours/baseline = 0.95" in capsys.readouterr().out  # the output streams through
    assert _run(tmp_path, "--benchmark", "fake") == 0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[-1])
    assert set(rec) == set(record.FIELDS)
    assert rec["benchmark"] == "fake" and rec["exit_code"] == 0 and rec["hand_written"] is False
    assert rec["result"] == {"ratio": 0.95, "ratio_of": "ours / baseline", "target": "<= 1.10", "ours_ms": 1.5, "n": 3}
    assert rec["date"].endswith(" UTC") and rec["date"][:4].isdigit()
    assert len(rec["commit"]) >= 7 and isinstance(rec["dirty"], bool)
    assert {"cpu", "cores", "ram_gib", "gpu", "load_before", "load_after"} <= set(rec["machine"])
    assert set(rec["versions"]) == {"python", *record.VERSIONED}
    assert rec["command"].endswith("bench_fake.py") and isinstance(rec["wall_s"], float)
    assert rec["output_tail"][0] == "warming up" and rec["note"] == "test machine"

    md = (tmp_path / "benchmarks.md").read_text()
    assert md.startswith(record.GENERATED)
    assert md.count("ours / baseline = **0.95x** (target <= 1.10); ours_ms 1.5, n 3") == 2
    assert "test machine" in md and "Intro." in md and "After." in md and "<!-- records:" not in md
    # The same store and template give the same bytes.
    assert record.regenerate(tmp_path / "records.jsonl", tmp_path / "template.md", tmp_path / "again.md") == md


def test_key_from_the_command_and_records_without_a_place_get_a_section(tmp_path):
    (tmp_path / "template.md").write_text("# Measured numbers\n")
    assert _run(tmp_path) == 0  # key from the script: bench_fake
    md = (tmp_path / "benchmarks.md").read_text()
    assert "## `benchmarks/bench_fake.py`" in md and "**0.95x**" in md
    assert record.benchmark_key(["python", "-m", "benchmarks.x"]) == "benchmarks.x"
    assert record.benchmark_key(["bash", "benchmarks/gpu_check.sh"]) == "gpu_check"


def test_a_failed_run_is_not_recorded_unless_asked(tmp_path):
    (tmp_path / "template.md").write_text(TEMPLATE)
    script = tmp_path / "bench_fails.py"
    script.write_text("raise SystemExit(3)\n")
    args = ["--store", str(tmp_path / "records.jsonl"), "--template", str(tmp_path / "template.md"),
            "--output", str(tmp_path / "benchmarks.md"), "--benchmark", "fake"]
    assert record.main([*args, "--", sys.executable, str(script)]) == 3
    assert not (tmp_path / "records.jsonl").exists()
    assert record.main([*args, "--keep-failed", "--", sys.executable, str(script)]) == 3
    md = (tmp_path / "benchmarks.md").read_text()
    assert "**exit code 3**" in md and "no output" in md


def test_nested_measurements_render_flat():
    rec = {"result": {"ratio": 0.5, "ratio_of": "a / b", "per_mode": {"x": 1.23456, "y": 2}}, "wall_s": 1.0,
           "exit_code": 0, "output_tail": [], "note": ""}
    assert record.result_cell(rec) == "a / b = **0.5x**; per_mode (x 1.235, y 2); wall 1 s"


def test_the_last_result_line_counts():
    assert record.parse_result(["RESULT {\"ratio\": 1}", "x", "RESULT {\"ratio\": 2}", "done"]) == {"ratio": 2}
    assert record.parse_result(["RESULT not json", "ratio 3"]) is None


def test_committed_benchmarks_md_is_the_generated_one():
    """docs/benchmarks.md is generated: edit docs/benchmarks/template.md or record a run, then
    `python -m benchmarks.record --regenerate`."""
    records = record.load_store(record.STORE)
    assert all(set(r) == set(record.FIELDS) for r in records)
    expected = record.render(records, record.TEMPLATE.read_text(encoding="utf-8"))
    assert record.OUTPUT.read_text(encoding="utf-8") == expected
    assert record.main(["--check"]) == 0


def test_the_gpu_checks_result_line_carries_issue_21s_targets(tmp_path):
    """gpu_summary.py --result: one RESULT line from the benchmarks' own RESULT lines and the step table."""
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "benchmarks" / "gpu_summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "env.txt").write_text("date x\ndevice NVIDIA H100 80GB HBM3\n")
    (raw / "steps.tsv").write_text("check_static\t0\t9\tpython c.py\nbench_1.5b_b32\t0\t80\tpython b.py\n"
                                   "bench_7b_b32\t124\t80\tpython b.py\n")
    roof = {"single static": 0.61, "dlogp static": 0.43, "dlogp step": 0.02}
    (raw / "bench_1.5b_b32.txt").write_text(
        "rows\nRESULT {\"ratio\": 0.5, \"of_roofline\": " + json.dumps(roof) + "}\nRESULT not json, ignored\n")
    (raw / "bench_7b_b32.txt").write_text("killed halfway: no RESULT line\n")
    (raw / "bench_1.5b_b128.txt").write_text("RESULT {\"of_roofline\": {\"dlogp static\": 0.52}}\n")
    (raw / "metrics_1.5b_L4096.txt").write_text("RESULT {\"ratio\": 0.83}\n")
    assert summary.check_result(raw) == {
        "ratio": 0.43, "ratio_of": "Δlog p static tokens/s / two-model memory roofline (1.5B shape, batch 32)",
        "target": ">= 0.40", "single_static_of_roofline": 0.61, "steps": 3, "failed_steps": ["bench_7b_b32"],
        "device": "NVIDIA H100 80GB HBM3", "1.5b_b128_dlogp_static_of_roofline": 0.52,
        "scorer_metrics_vs_bare_1.5b_L4096": 0.83,
    }
