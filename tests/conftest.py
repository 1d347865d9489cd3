"""Shared test helpers."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

# Helper modules of this folder (`decoding_reference`) are imported by name: the tests run with
# --import-mode=importlib, which does not put this folder on sys.path.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

_BLOCK = 32768  # wandb's transaction log is a LevelDB-style log of 32 KiB blocks
_HEADER = 7  # record header: crc32 (4) + length (2, little endian) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_log_records(path: str | Path) -> list[bytes]:
    """The serialized records of an offline wandb run file (`run-<id>.wandb`)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending, pos = [], b"", 7  # file header: ':W&B' + magic (2) + version (1)
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too small for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
    return records


def wandb_offline_history(run_dir: str | Path) -> list[dict]:
    """History rows ({key: value}) logged to an offline wandb run folder, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for raw in wandb_log_records(run_file):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


@pytest.fixture(autouse=True)
def _fresh_wandb_settings():
    """wandb reads WANDB_* once per process into a settings singleton: reset it after each test, so
    one test's WANDB_DIR / WANDB_MODE / group never leaks into the next."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@pytest.fixture
def offline_wandb_runs(monkeypatch, tmp_path):
    """`offline_wandb_runs(module, group)`: wandb offline under `tmp_path/wandb` in run group `group`;
    returns the list of the runs that `module.start_run` starts from then on."""
    from verl_ext import wandb_logging

    def record(module, group: str) -> list:
        env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_RUN_GROUP": group}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        started = []

        def start_and_keep(*args, **kwargs):
            started.append(wandb_logging.start_run(*args, **kwargs))
            return started[-1]

        monkeypatch.setattr(module, "start_run", start_and_keep)
        return started

    return record


@pytest.fixture
def read_wandb_history():
    """`read_wandb_history(offline_run_dir) -> list of {metric: value}` (see wandb_offline_history)."""
    return wandb_offline_history


def _console_number(text: str) -> float:
    """A value as verl's console logger prints it: `0.5`, `nan`, `-inf` or `np.float64(0.5)`."""
    match = re.fullmatch(r"(?:np\.\w+\()?\s*([-+0-9.eEinfa]+)\)?", text.strip())
    return float(match.group(1)) if match else math.nan


def console_step_metrics(log: str) -> dict[int, dict[str, float]]:
    """verl's console logger lines `step:N - key:value - ...`, parsed per step."""
    steps = {}
    for line in log.splitlines():
        match = re.search(r"\bstep:(\d+) - (.*)$", line)
        if match:
            items = (item.split(":", 1) for item in match.group(2).split(" - ") if ":" in item)
            steps[int(match.group(1))] = {key.strip(): _console_number(value) for key, value in items}
    return steps


@pytest.fixture
def step_metrics():
    """`step_metrics(console_log) -> {step: {metric: value}}` (see console_step_metrics)."""
    return console_step_metrics


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny matrices: more threads only add contention)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
