"""The training run's log: one file per launch, kept, without ANSI codes; a short console.

`recipe.dapo_reweight.main` calls `start(...)` once the run's folder is known: from then on everything
the driver process writes to its stdout and stderr (its own prints, verl's, and the output Ray
forwards from every worker) goes through a pipe to a small filter process (`python -m
verl_ext.run_log`), which

- appends every line, ANSI colour codes removed, to `<run dir>/logs/train-<UTC time>.log` (a new
  file per launch: a rerun never overwrites the previous launch's log);
- shows on the console only what a person follows a run by: a progress bar with one short line per
  training step (reward, validation accuracy, response length, the weighting and top-p metrics, seconds per
  step), this project's own `[...]` messages, errors with their tracebacks, and wandb's run links.
  The full config, verl's per-step metric dump and the libraries' repeated warnings stay in the file.
  `RUN_LOG_CONSOLE=full` shows everything on the console as well.

The filter runs in its own session, so a Ctrl-C in the terminal stops the training but not the
filter: it drains what the driver still writes (the "how to resume" line) and ends at end of file,
also when the driver is killed outright.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")
RAY_PREFIX = re.compile(r"^\((?:[\w.-]+ )?pid=\d+(?:, ip=[\d.]+)?\)\s?")
STEP_LINE = re.compile(r"\bstep:(\d+) - (.*)$")
OWN_MESSAGE = re.compile(r"^\[(dapo_reweight|run_dapo_reweight|run_top_p_ablation|run_baselines|setup|merge)\]")
CONSOLE_ALSO = re.compile(
    r"^(Resuming from|Training from scratch|wandb: .*(View run|Syncing run|run history|offline|sync )|KeyboardInterrupt)"
)
CONSOLE_PHRASES = re.compile(r"Connecting to existing Ray cluster at address|Started a local Ray instance")
TRACEBACK_START = re.compile(r"^Traceback \(most recent call last\)|^\*\*\* SIGTERM|^Error executing job")
TRACEBACK_END = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*")
ERROR_LINE = re.compile(r"^(ERROR|CRITICAL)\b|\berror: ")

# (label, metric keys tried in order, format) of the console's per-step line
SHORT_METRICS = (
    ("reward", ("critic/score/mean", "critic/rewards/mean"), "{:.3f}"),
    ("resp len", ("response_length/mean",), "{:.1f}"),
    ("w mean", ("actor/reweight/weight_mean",), "{:.3f}"),
    ("w max", ("actor/reweight/weight_max",), "{:.3f}"),
    ("top-p cut", ("rollout/top_p_truncated_mass_net_mean", "rollout/top_p_truncated_mass_mean"), "{:.4f}"),
    ("val acc", ("val-core/*/acc/mean@*",), "{:.3f}"),
    ("s/step", ("timing_s/step",), "{:.1f}"),
)


def strip_ansi(text: str) -> str:
    """`text` without ANSI escape sequences (colours, cursor moves)."""
    return ANSI.sub("", text)


def without_ray_prefix(line: str) -> str:
    """`(TaskRunner pid=12) step:1 - ...` -> `step:1 - ...` (Ray's prefix on forwarded worker output)."""
    return RAY_PREFIX.sub("", line)


def _number(text: str) -> float:
    match = re.fullmatch(r"(?:np\.\w+\()?\s*([-+0-9.eEinfa]+)\)?", text.strip())
    try:
        return float(match.group(1)) if match else math.nan
    except ValueError:
        return math.nan


def parse_step_line(line: str) -> tuple[int, dict[str, float]] | None:
    """verl's console logger line `step:N - key:value - ...` as (N, {key: value}); None for other lines."""
    match = STEP_LINE.search(without_ray_prefix(strip_ansi(line)))
    if not match:
        return None
    items = (item.split(":", 1) for item in match.group(2).split(" - ") if ":" in item)
    return int(match.group(1)), {key.strip(): _number(value) for key, value in items}


def _lookup(metrics: Mapping[str, float], pattern: str) -> float | None:
    if "*" not in pattern:
        return metrics.get(pattern)
    regex = re.compile("^" + re.escape(pattern).replace(r"\*", "[^ ]*") + "$")
    return next((v for k, v in sorted(metrics.items()) if regex.match(k)), None)


def short_step_line(step: int, total: int | None, metrics: Mapping[str, float], width: int = 20) -> str:
    """`[#####-----] 3/12 | reward 0.250 | acc 0.500 | ...`: a progress bar and the metrics that matter
    (those of `SHORT_METRICS` the step logged)."""
    parts = []
    if total:
        done = min(width, round(width * step / total))
        parts.append(f"[{'#' * done}{'-' * (width - done)}] {step}/{total}")
    else:
        parts.append(f"step {step}")
    for label, keys, fmt in SHORT_METRICS:
        value = next((v for v in (_lookup(metrics, k) for k in keys) if v is not None), None)
        if value is not None:
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


class ConsoleFilter:
    """Decides, line by line, what the console shows (see the module docstring); keeps traceback state."""

    def __init__(self, total_steps: int | None = None, full: bool = False):
        self.total_steps = total_steps
        self.full = full
        self.in_traceback = False

    def console_lines(self, line: str) -> list[str]:
        """What to show for one clean (ANSI-free) line: [], [line] or [short step line]."""
        text = without_ray_prefix(line).rstrip("\n")
        step = parse_step_line(text)
        if step is not None:
            return [short_step_line(step[0], self.total_steps, step[1])]
        if self.full:
            return [text]
        if self.in_traceback:
            if TRACEBACK_END.match(text):
                self.in_traceback = False
            return [text]
        if TRACEBACK_START.search(text):
            self.in_traceback = True
            return [text]
        if OWN_MESSAGE.match(text) or CONSOLE_ALSO.match(text) or CONSOLE_PHRASES.search(text) or ERROR_LINE.search(text):
            return [text]
        return []


def filter_stream(lines: Iterable[str], log: TextIO, console: TextIO, console_filter: ConsoleFilter) -> None:
    """Every line, ANSI-free, to `log` (flushed per line); the filter's choice to `console`."""
    for raw in lines:
        line = strip_ansi(raw).replace("\r", "\n")
        for part in line.splitlines():
            log.write(part + "\n")
            console.writelines(shown + "\n" for shown in console_filter.console_lines(part))
        log.flush()
        console.flush()


def log_path(log_dir: str | os.PathLike, now: float | None = None) -> Path:
    """`<log_dir>/train-<UTC time>.log`, never an existing file (a suffix is added if needed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    path, n = Path(log_dir) / f"train-{stamp}.log", 1
    while path.exists():
        n += 1
        path = Path(log_dir) / f"train-{stamp}-{n}.log"
    return path


class RunLog:
    """The driver's end of the log: stdout/stderr redirected into the filter process (see `start`)."""

    def __init__(self, path: Path, process: subprocess.Popen, saved_fds: tuple[int, int]):
        self.path = path
        self.process = process
        self.saved_fds = saved_fds

    def close(self, timeout_s: float = 30.0) -> None:
        """Give stdout/stderr back to the terminal and wait until the filter has written everything."""
        if self.process is None:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(self.saved_fds[0], 1)
        os.dup2(self.saved_fds[1], 2)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process = None


def start(log_dir: str | os.PathLike, total_steps: int | None = None) -> RunLog:
    """Start the filter process and send this process's stdout and stderr (file descriptors 1 and 2,
    so also what C code and Ray's log forwarding write) through it. Returns the handle to `close`."""
    path = log_path(log_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = (os.dup(1), os.dup(2))
    cmd = [sys.executable, "-m", "verl_ext.run_log", "--log", str(path)]
    if total_steps:
        cmd += ["--total", str(total_steps)]
    process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=saved[0], stderr=saved[1], start_new_session=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(process.stdin.fileno(), 1)
    os.dup2(process.stdin.fileno(), 2)
    process.stdin.close()  # descriptors 1 and 2 hold the pipe open; closing them ends the filter
    return RunLog(path, process, saved)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="run_log", description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="log file to append to")
    parser.add_argument("--total", type=int, default=None, help="total training steps (progress bar)")
    args = parser.parse_args(argv)
    full = os.environ.get("RUN_LOG_CONSOLE", "short") == "full"
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", newline="", closefd=False)  # noqa: SIM115
    with open(args.log, "a", encoding="utf-8") as log:
        filter_stream(stdin, log, sys.stdout, ConsoleFilter(args.total, full))


if __name__ == "__main__":
    main()
