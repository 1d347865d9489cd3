"""Summary (markdown) of one `gpu_check.sh` run: its steps, the decoding rows with their roofline
fractions, the static-step check and the token-metric ratios.

    python benchmarks/gpu_summary.py OUT/raw > OUT/summary.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROW = re.compile(r"^(?P<mode>\S+(?: \S+)?)\s+(?P<tps>\d+\.\d)\s+(?P<replace>\S+)\s+(?P<stop>\S+)\s+(?P<k>\S+)\s+"
                 r"(?P<same>\S+%)\s+(?P<vs_single>\S+)\s+(?P<vs_official>\S+)(?:\s+(?P<roof>\S+%))?$")


def decoding_rows(text: str) -> list[dict[str, str]]:
    """The per-mode rows of a `bench_decoding.py` table."""
    return [m.groupdict() for line in text.splitlines() if (m := ROW.match(line.strip()))]


def lines_starting(text: str, *prefixes: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefixes)]


def main() -> None:
    raw = Path(sys.argv[1])
    read = lambda name: (raw / name).read_text(errors="replace") if (raw / name).exists() else ""
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
