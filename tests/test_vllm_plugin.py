"""verl_ext.vllm_plugin: a weight push that fails inside vLLM ends with its error instead of hanging the trainer.

verl's own sender and receiver (shared-memory buckets over ZMQ, as on CPU) in two threads of this
process; the receiver's loader raises on the first bucket, as vLLM's CPU build does without
`keep_cpu_weights_reloadable`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver, BucketedWeightSender

from verl_ext import vllm_plugin

TIMEOUT_S = float(os.environ.get("TEST_PUSH_TIMEOUT_S", "60"))


def use_cpu_platform():
    """verl's transfer code synchronizes the platform's device: make it our `cpu` platform (as in CPU runs)."""
    from verl.plugin.platform import platform_manager

    from verl_ext.cpu.platform import PlatformCPU

    platform_manager._current_platform = PlatformCPU()


def push(weights: dict[str, torch.Tensor], load, bucket_mb: int = 1) -> tuple[bool, BaseException | None, dict]:
    """Send `weights` with verl's sender while verl's receiver calls `load` per bucket.
    Returns (sender finished, receiver's exception, what the receiver loaded)."""
    use_cpu_platform()
    handle = f"ipc:///tmp/verl-ext-test-{uuid.uuid4().hex}.sock"
    loaded, outcome = {}, {}

    def receive():
        def on_bucket(named, is_last):
            load(named)
            loaded.update({name: tensor.clone() for name, tensor in named})

        try:
            BucketedWeightReceiver(handle, torch.device("cpu"), use_shm=True).receive_weights(on_bucket)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = err

    sender = threading.Thread(
        target=lambda: asyncio.run(BucketedWeightSender(handle, bucket_mb, use_shm=True).async_send_weights(iter(weights.items()))),
        daemon=True,
    )
    receiver = threading.Thread(target=receive, daemon=True)
    sender.start()
    receiver.start()
    sender.join(TIMEOUT_S)
    receiver.join(TIMEOUT_S)
    return not sender.is_alive(), outcome.get("error"), loaded


@pytest.fixture
def guarded(monkeypatch):
    from verl.plugin.platform import platform_manager

    monkeypatch.setattr(platform_manager, "_current_platform", platform_manager._current_platform)
    monkeypatch.setattr(BucketedWeightReceiver, "receive_weights", BucketedWeightReceiver.receive_weights)
    monkeypatch.setenv(vllm_plugin.VERL_ROLLOUT_ENV, "0")
    vllm_plugin.report_weight_sync_failures()
    vllm_plugin.report_weight_sync_failures()  # idempotent: vLLM may load plugins more than once
    assert BucketedWeightReceiver.receive_weights._reports_failures


# three buckets of 1 MiB: the failure comes on the first, two more must still be acknowledged
WEIGHTS = {f"layer{i}.weight": torch.full((512, 512), float(i)) for i in range(3)}


def failing_loader(named):
    raise AttributeError("'Parameter' object has no attribute 'weight_loader'")


def test_without_the_guard_the_sender_waits_forever():
    """The bug the guard removes, in a child process (the hung threads die with it). If verl fixes its
    receiver, this fails and the guard can go."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_vllm_plugin import push, failing_loader, WEIGHTS\n"
        "finished, error, _ = push(WEIGHTS, failing_loader)\n"
        "print('finished' if finished else 'hung', flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != vllm_plugin.VERL_ROLLOUT_ENV}
    env["TEST_PUSH_TIMEOUT_S"] = "5"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.stdout.strip().splitlines()[-1:] == ["hung"], done.stdout + done.stderr[-2000:]


def test_with_the_guard_the_push_ends_with_the_loaders_error(guarded):
    finished, error, loaded = push(WEIGHTS, failing_loader)
    assert finished, "the trainer's sender must not wait forever"
    assert isinstance(error, RuntimeError)
    assert "vLLM could not load the weights pushed by the trainer" in str(error)
    assert "AttributeError: 'Parameter' object has no attribute 'weight_loader'" in str(error)
    assert loaded == {}


def test_with_the_guard_a_good_push_loads_every_bucket(guarded):
    finished, error, loaded = push(WEIGHTS, lambda named: None)
    assert finished and error is None
    assert sorted(loaded) == sorted(WEIGHTS)
    for name, tensor in WEIGHTS.items():
        assert torch.equal(loaded[name], tensor)
