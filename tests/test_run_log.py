"""verl_ext.run_log: every line to a kept, ANSI-free log file; a short console."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from verl_ext.run_log import ConsoleFilter, filter_stream, log_path, parse_step_line, short_step_line, strip_ansi

REPO = Path(__file__).resolve().parents[1]
STEP = (
    "(TaskRunner pid=4242) step:3 - actor/reweight/weight_mean:np.float64(1.0331) - actor/reweight/weight_max:1.2 - "
    "critic/score/mean:0.125 - response_length/mean:5.5 - val-core/tiny_arith/acc/mean@2:np.float64(0.46875) - "
    "rollout/top_p_truncated_mass_net_mean:0.0 - timing_s/step:1.38 - actor/pg_loss:0.02"
)


def test_step_line_becomes_a_progress_bar_with_the_metrics_that_matter():
    step, metrics = parse_step_line(STEP)
    assert step == 3 and metrics["actor/reweight/weight_mean"] == 1.0331 and metrics["actor/pg_loss"] == 0.02
    assert short_step_line(step, 12, metrics, width=12) == (
        "[###---------] 3/12 | reward 0.125 | resp len 5.5 | w mean 1.033 | w max 1.200 | top-p cut 0.0000 | "
        "val acc 0.469 | s/step 1.4"
    )
    assert short_step_line(1, None, {}).startswith("step 1")
    assert parse_step_line("(TaskRunner pid=1) Training Progress: 50%") is None


def test_console_shows_progress_own_messages_and_errors_the_log_keeps_everything():
    lines = [
        "\x1b[36m(TaskRunner pid=1)\x1b[0m {'actor_rollout_ref': {'model': ...}}",  # config dump
        "[dapo_reweight] run directory: /r",
        "(WorkerDict pid=2) UserWarning: torchtitan engine is not available",
        STEP,
        "(TaskRunner pid=1) Traceback (most recent call last):",
        '(TaskRunner pid=1)   File "x.py", line 1, in <module>',
        "(TaskRunner pid=1) ValueError: bad",
        "(TaskRunner pid=1) after the traceback",
        "wandb: 🚀 View run tiny at: https://wandb.ai/x",
        "2026-12-05 07:00:00,000\tINFO worker.py:1 -- Connecting to existing Ray cluster at address: 127.0.0.2:6390...",
    ]
    log, console = io.StringIO(), io.StringIO()
    filter_stream((line + "\n" for line in lines), log, console, ConsoleFilter(total_steps=12))
    assert log.getvalue().splitlines() == [strip_ansi(line) for line in lines]
    assert "\x1b" not in log.getvalue()
    shown = console.getvalue().splitlines()
    assert shown[0] == "[dapo_reweight] run directory: /r"
    assert shown[1].startswith("[##") and "reward 0.125" in shown[1]
    assert shown[2:5] == ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>', "ValueError: bad"]
    assert shown[5].startswith("wandb: 🚀 View run") and "Connecting to existing Ray cluster" in shown[6]
    assert len(shown) == 7


def test_every_launch_gets_its_own_log_file(tmp_path):
    first = log_path(tmp_path, now=0)
    first.write_text("launch 1")
    second = log_path(tmp_path, now=0)
    assert first.name == "train-19700101-000000.log" and second.name == "train-19700101-000000-2.log"


def test_filter_process_keeps_writing_after_the_writer_is_interrupted(tmp_path):
    """The filter gets the driver's output through a pipe and ends at end of file: what the driver
    prints while it handles a Ctrl-C still reaches the log and the console."""
    log = tmp_path / "train.log"
    code = (
        "import os, signal, sys, time\n"
        "from verl_ext import run_log\n"
        f"handle = run_log.start({str(tmp_path)!r}, 4)\n"
        "print('(TaskRunner pid=1) step:1 - critic/score/mean:0.5', flush=True)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('[dapo_reweight] interrupted; to resume, run the same command again', flush=True)\n"
        "    os.write(1, b'\\x1b[31mraw fd write\\x1b[0m\\n')\n"
        "handle.close()\n"
        "print('after close: back on the terminal')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == 0, proc.stderr
    (log,) = tmp_path.glob("train-*.log")
    text = log.read_text()
    assert "step:1 - critic/score/mean:0.5" in text and "raw fd write" in text and "\x1b" not in text
    assert "after close" not in text
    assert proc.stdout.splitlines() == [
        "[#####---------------] 1/4 | reward 0.500",
        "[dapo_reweight] interrupted; to resume, run the same command again",
        "after close: back on the terminal",
    ]
    assert oct(log.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
