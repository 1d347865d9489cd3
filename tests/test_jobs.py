"""verl_ext.jobs: the worker pool (in process and on Ray), the one "use Ray?" rule, the resume manifest."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

from verl_ext.core.atomic_io import atomic_write_parquet
from verl_ext.core.checks import ConfigError
from verl_ext.jobs import ResumeError, WorkerPool, check_ray, check_resume, shard_name, shard_seed, use_ray


@dataclass(frozen=True)
class Square:
    x: int


class Worker:
    """A worker whose construction is counted (it stands for loading the models)."""

    built: ClassVar[list[int]] = []

    def __init__(self, offset: int):
        Worker.built.append(offset)
        self.offset = offset

    def square(self, task: Square) -> tuple[int, int]:
        return task.x * task.x + self.offset, os.getpid()


# ----------------------------------------------------------------------------- the `ray` block


@pytest.mark.parametrize(
    "block,message",
    [
        ({"enabled": "maybe"}, "ray.enabled='maybe' is invalid; valid: auto, True, False"),
        ({"num_workers": 0}, "ray.num_workers=0 is invalid; valid: an integer >= 1"),
        ({"num_cpus_per_worker": 0}, "ray.num_cpus_per_worker=0 is invalid; valid: a number > 0"),
        ({"address": ""}, "ray.address='' is invalid; valid: null, auto, or a cluster address"),
        ({"use_ray": True}, "ray.use_ray=True is invalid (unknown key); valid: the keys enabled, address"),
    ],
)
def test_bad_ray_settings_are_one_line_errors(block, message):
    with pytest.raises(ConfigError) as err:
        check_ray(block)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_one_auto_rule(monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert use_ray({"enabled": True}) and not use_ray({"enabled": False, "address": "auto"})
    assert not use_ray({}) and not use_ray({"enabled": "auto"})
    assert use_ray({"address": "auto"})
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert use_ray({})
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert use_ray({}) and not use_ray({"enabled": False})


# ----------------------------------------------------------------------------- in process


def test_in_process_pool_builds_its_worker_once_and_lazily():
    Worker.built.clear()
    seen = []
    with WorkerPool(functools.partial(Worker, 10), {"enabled": False}) as pool:
        assert pool.map(Worker.square, []) == [] and Worker.built == []  # nothing to do: nothing loaded
        got = pool.map(Worker.square, [Square(i) for i in range(4)], lambda t, r: seen.append((t.x, r[0])))
        assert [r for r, _ in got] == [10, 11, 14, 19] and seen == [(0, 10), (1, 11), (2, 14), (3, 19)]
        assert pool.call(Worker.square, Square(5))[0] == 35
        assert Worker.built == [10]  # one worker for every call
        pool.restart()
        pool.call(Worker.square, Square(1))
        assert Worker.built == [10, 10]
        with pytest.raises(TypeError, match="function of \\(worker, task\\)"):
            pool.map("square", [Square(1)])


# ----------------------------------------------------------------------------- resume


def test_resume_manifest_refuses_to_mix(tmp_path):
    settings = {"models": {"base": "b", "rl": "r"}, "n": 2}
    check_resume(tmp_path, settings, ["runs"])
    assert json.loads((tmp_path / "manifest.json").read_text()) == settings
    check_resume(tmp_path, {**settings, "n": 3}, ["runs"])  # no shard on disk yet: the manifest is rewritten
    assert json.loads((tmp_path / "manifest.json").read_text())["n"] == 3
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "shard-00000.parquet").write_bytes(b"x")
    check_resume(tmp_path, {**settings, "n": 3}, ["runs"])  # the same settings: resumed
    with pytest.raises(ResumeError) as err:
        check_resume(tmp_path, {"models": {"base": "b", "rl": "r2"}, "n": 2, "k": 1}, ["runs"],
                     redo_hint="overwrite=true to delete them")
    msg = str(err.value)
    assert "\n" not in msg
    assert '(k: <unset> -> 1; models.rl: "r" -> "r2"; n: 3 -> 2)' in msg and msg.endswith("overwrite=true to delete them")
    with pytest.raises(ConfigError, match="overwrite='no' is invalid; valid: true, false"):
        check_resume(tmp_path, settings, ["runs"], overwrite="no")  # a truthy string: refused, nothing deleted
    assert (tmp_path / "runs" / "a" / "shard-00000.parquet").is_file()
    check_resume(tmp_path, settings, ["runs"], overwrite=True)  # the redo path: results deleted
    assert not (tmp_path / "runs").exists()
    # a manifest written by an earlier analysis carries a hash: not a setting
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "shard-00000.parquet").write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps({**settings, "hash": "abc"}))
    check_resume(tmp_path, settings, ["runs"])


def test_shard_seeds_start_at_the_seed_and_never_collide():
    assert shard_seed(5, 0) == 5  # one shard draws what an unsharded run draws
    seeds = {shard_seed(5, s, g) for s in range(1000) for g in range(3)}
    assert len(seeds) == 3000
    assert shard_seed(2**63 - 1, 1) == 7918  # wraps into a valid seed instead of overflowing
    assert shard_name(42) == "shard-00042.parquet"


def test_parquet_shards_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "generations" / shard_name(0)
    table = pa.table({"x": [1, 2], "y": [[1], []]})
    atomic_write_parquet(path, table)
    assert pq.read_table(path).equals(table)
    monkeypatch.setattr("os.replace", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # interrupted before the rename: the old file stays, no temporary left
        atomic_write_parquet(path, pa.table({"x": [3]}))
    assert pq.read_table(path).equals(table) and [p.name for p in path.parent.iterdir()] == [path.name]


# ----------------------------------------------------------------------------- Ray


def test_ray_pool_two_actors_and_clean_shutdown():
    """The pool starts Ray itself (2 CPUs here), spreads calls over 2 actors (worker built once per actor),
    and leaves no actor nor Ray runtime behind, also when the driver fails mid-way."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors need not import this test file
    if ray.is_initialized():
        ray.shutdown()
    pool = WorkerPool(functools.partial(Worker, 1), {"enabled": True, "num_workers": 2}, use_gpus=False)
    try:
        got = pool.map(Worker.square, [Square(i) for i in range(6)])
        assert sorted(r for r, _ in got) == [1, 2, 5, 10, 17, 26]
        pids = {pid for _, pid in got}
        assert len(pids) == 2 and os.getpid() not in pids  # two actors did the work
        assert len(pool.actors()) == 2
        actors = list(pool.actors())

        def fail(task, result):
            raise KeyboardInterrupt  # Ctrl-C in the driver while calls are running

        with pytest.raises(KeyboardInterrupt), pool:
            pool.map(Worker.square, [Square(i) for i in range(6)], fail)
        assert pool._actors == [] and not ray.is_initialized()
    finally:
        pool.close()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized() and len(actors) == 2
