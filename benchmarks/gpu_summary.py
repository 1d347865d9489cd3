"""Summary (markdown) of one `gpu_check.sh` run: its steps, the decoding rows with their roofline
fractions, the static-step check and the token-metric ratios; with `--result`, the run's one
`RESULT {json}` line for `benchmarks/record.py` (issue 21's targets, from the benchmarks' own RESULT lines).

    python benchmarks/gpu_summary.py OUT/raw > OUT/summary.md
    python benchmarks/gpu_summary.py OUT/raw --result
"""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a script beside record.py (also when loaded by path)
from record import parse_result

ROW = re.compile(r"^(?P<mode>\S+(?: \S+)?)\s+(?P<tps>\d+\.\d)\s+(?P<replace>\S+)\s+(?P<stop>\S+)\s+(?P<k>\S+)\s+"
                 r"(?P<same>\S+%)\s+(?P<vs_single>\S+)\s+(?P<vs_official>\S+)(?:\s+(?P<roof>\S+%))?$")


def decoding_rows(text: str) -> list[dict[str, str]]:
    """The per-mode rows of a `bench_decoding.py` table."""
    return [m.groupdict() for line in text.splitlines() if (m := ROW.match(line.strip()))]


def lines_starting(text: str, *prefixes: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefixes)]


def read_file(raw: Path, name: str) -> str:
    """A step's output file of the run folder, "" when the step did not run."""
    return (raw / name).read_text(errors="replace") if (raw / name).exists() else ""


def check_result(raw: Path) -> dict:
    """Issue 21's numbers of one run: two-model static decoding's fraction of the two-model memory
    roofline at the 1.5B shape, batch 32 (`ratio`, target >= 0.40), the single-model static row's
    (target >= 0.50), the other shapes' two-model fractions, and the scorer's metrics / bare ratio."""
    read = functools.partial(read_file, raw)
    steps = [line.split("\t") for line in read("steps.tsv").splitlines() if line.strip()]
    env = read("env.txt")
    device = next((line[len("device "):] for line in env.splitlines() if line.startswith("device ")), "unknown")
    out: dict = {"steps": len(steps), "failed_steps": [s[0] for s in steps if len(s) < 2 or s[1] != "0"],
                 "device": device}
    main = parse_result(read("bench_1.5b_b32.txt").splitlines()) or {}
    fractions = main.get("of_roofline", {})
    if "dlogp static" in fractions:
        out = {"ratio": fractions["dlogp static"],
               "ratio_of": "Δlog p static tokens/s / two-model memory roofline (1.5B shape, batch 32)",
               "target": ">= 0.40", "single_static_of_roofline": fractions.get("single static"), **out}
    for path in sorted(raw.glob("bench_*.txt")):
        if path.stem != "bench_1.5b_b32":
            result = parse_result(path.read_text(errors="replace").splitlines()) or {}
            fraction = (result.get("of_roofline") or {}).get("dlogp static")
            if fraction is not None:
                out[f"{path.stem.removeprefix('bench_')}_dlogp_static_of_roofline"] = fraction
    metrics = parse_result(read("metrics_1.5b_L4096.txt").splitlines())
    if metrics and "ratio" in metrics:
        out["scorer_metrics_vs_bare_1.5b_L4096"] = metrics["ratio"]
    return out


def main() -> None:
    raw = Path(sys.argv[1])
    if "--result" in sys.argv[2:]:
        print("RESULT " + json.dumps(check_result(raw), ensure_ascii=False))
        return
    read = functools.partial(read_file, raw)
    print("# GPU check (issue 21)\n")
    print("```\n" + read("env.txt").strip() + "\n```\n")
    print("| step | exit | seconds | command |\n| --- | --- | --- | --- |")
    for line in read("steps.tsv").splitlines():
        name, rc, secs, cmd = (line.split("\t") + ["", "", ""])[:4]
        print(f"| {name} | {rc} | {secs} | `{cmd}` |")
    print("\n## Static step replayed as CUDA graphs vs the step loop\n")
    print("```\n" + "\n".join(read("check_static.txt").strip().splitlines()[-12:]) + "\n```")
    for path in sorted(raw.glob("bench_*.txt")):
        text = path.read_text(errors="replace")
        print(f"\n## {path.stem}\n")
        print("\n".join(lines_starting(text, "models:")))
        rows = decoding_rows(text)
        if rows:
            print("\n| mode | tokens/s | vs single | of roofline | =step | replace |\n| --- | --- | --- | --- | --- | --- |")
            for r in rows:
                print(f"| {r['mode']} | {r['tps']} | {r['vs_single']} | {r['roof'] or ''} | {r['same']} | {r['replace']} |")
        tail = lines_starting(text, "memory roofline", "static /", "step /", "best spec", "  π_")
        print("\n" + "\n".join(f"- {line.strip()}" for line in tail) if tail else "\n(no result lines: see the raw log)")
        if not rows:
            print("\n```\n" + "\n".join(text.strip().splitlines()[-15:]) + "\n```")
    for path in sorted(raw.glob("profile_*.txt")):
        text = path.read_text(errors="replace")
        print(f"\n## {path.stem}\n")
        keep = [line for line in text.splitlines() if not line.startswith(("STAGE:", "USDT:", "[W", "W1"))]
        print("```\n" + "\n".join(keep[-34:]) + "\n```")
    for path in sorted(raw.glob("metrics_*.txt")):
        text = path.read_text(errors="replace")
        print(f"\n## {path.stem}\n")
        keep = lines_starting(text, "device=", "two bare", "full metrics", "ratio")
        print("```\n" + "\n".join(keep or text.strip().splitlines()[-10:]) + "\n```")


if __name__ == "__main__":
    main()
