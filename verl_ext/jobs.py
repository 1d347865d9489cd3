"""One job runner for the offline commands (Δlog p analysis, decoding sweeps, evaluation): workers that hold the
models, run in this process or as Ray actors, and one resume manifest.

    pool = WorkerPool(functools.partial(ShardWorker, settings), cfg.ray, use_gpus=device != "cpu")
    with pool:
        for task, path in pool.imap_unordered(ShardWorker.run_shard, shards, progress="shards"):
            ...

- **Workers.** `factory()` builds one worker (it loads the models, once); the pool builds it lazily,
  at the first call that has work: nothing is loaded, and Ray is not started, when every shard is
  already on disk.
- **In-process or Ray: one rule** (`use_ray`). `ray.enabled`: `auto` = Ray when `ray.address` is
  set, or RAY_ADDRESS is set, or more than one CUDA GPU is visible; `true`; `false`. With Ray there
  is one actor per GPU of the cluster (one GPU each), or `ray.num_workers` of them
  (`ray.num_cpus_per_worker` CPUs each); without GPUs (or `use_gpus=False`) one CPU actor.
- **Typed calls.** A call is a function of (worker, task), usually an unbound method
  (`ShardWorker.run_shard`) and a task object (a dataclass); no method names as strings.
- **Unordered completion.** Results come back as they finish (`imap_unordered` / `map` with an
  `on_result(task, result)` callback, run by the driver), with an optional tqdm bar. A worker may
  write its own result files (the sweeps) or return them for the driver to write (the analysis).
- **Clean shutdown.** `close()` (or leaving `with`, also on an exception or Ctrl-C) kills the
  actors and shuts down a Ray runtime the pool started itself; `restart()` drops the workers so the
  next call builds them afresh (e.g. after vLLM sampling, before scoring with both models).
- **Resume.** `check_resume` keeps a JSON of the settings that decide what a shard file holds next to
  the results, and refuses to mix results of other settings (one line listing the differing keys).
  The commands skip shards already on disk.

Verl-free; Ray and torch are imported only when used.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from verl_ext.core.atomic_io import atomic_write_bytes
from verl_ext.core.checks import ConfigError, check_choice, check_flag, check_number, invalid

W = TypeVar("W")  # a worker
T = TypeVar("T")  # a task
R = TypeVar("R")  # a result

RAY_DEFAULTS = {"enabled": "auto", "address": None, "num_workers": None, "num_cpus_per_worker": 1}


# ----------------------------------------------------------------------------- the `ray` block


def check_ray(ray_cfg: Any, key: str = "ray") -> dict:
    """The `ray` block as a plain dict, each key checked (a ConfigError naming key, value and choices)."""
    plain = dict(ray_cfg or {})
    unknown = sorted(set(plain) - set(RAY_DEFAULTS))
    if unknown:
        raise invalid(f"{key}.{unknown[0]}", plain[unknown[0]], f"the keys {', '.join(RAY_DEFAULTS)}", "unknown key")
    plain = {**RAY_DEFAULTS, **plain}
    check_choice(plain["enabled"], f"{key}.enabled", ("auto", True, False))
    if plain["address"] is not None and (not isinstance(plain["address"], str) or not plain["address"]):
        raise invalid(f"{key}.address", plain["address"], "null, auto, or a cluster address such as ray://host:10001")
    check_number(plain["num_workers"], f"{key}.num_workers", low=1, integer=True, allow_none=True)
    check_number(plain["num_cpus_per_worker"], f"{key}.num_cpus_per_worker", low=0, low_open=True)
    return plain


def use_ray(ray_cfg: Any) -> bool:
    """`ray.enabled`: true/false, or auto = `ray.address` set, RAY_ADDRESS set, or more than one CUDA GPU visible."""
    enabled = check_ray(ray_cfg)["enabled"]
    if enabled != "auto":
        return enabled
    if dict(ray_cfg or {}).get("address") is not None or os.environ.get("RAY_ADDRESS"):
        return True
    import torch

    return torch.cuda.device_count() > 1


# ----------------------------------------------------------------------------- the pool


class _Host:
    """A Ray actor holding one worker (built once, in the actor's process)."""

    def __init__(self, factory: Callable[[], Any]):
        self.worker = factory()

    def call(self, fn: Callable, task: Any) -> Any:
        return fn(self.worker, task)

    def pid(self) -> int:
        return os.getpid()


class WorkerPool(Generic[W]):
    """Runs `fn(worker, task)` calls on workers built by `factory`, in this process or on Ray actors."""

    def __init__(self, factory: Callable[[], W], ray_cfg: Any = None, *, use_gpus: bool = True, show_progress: bool = True):
        self.factory = factory
        self.cfg = check_ray(ray_cfg)
        self.ray = use_ray(self.cfg)
        self.use_gpus = use_gpus
        self.show_progress = show_progress
        self._local: W | None = None
        self._actors: list = []
        self._started_ray = False

    # -- workers

    def actors(self) -> list:
        """The Ray actors (started on first use); each has `call(fn, task)` and `pid()`."""
        if not self._actors:
            import ray

            if not ray.is_initialized():
                ray.init(address=self.cfg["address"])
                self._started_ray = True
            gpus = int(ray.cluster_resources().get("GPU", 0)) if self.use_gpus else 0
            n = self.cfg["num_workers"] or max(gpus, 1)
            if gpus and n > gpus:
                raise ConfigError(f"ray.num_workers={n} is invalid; valid: at most the cluster's {gpus} GPU(s), one worker per GPU")
            host = ray.remote(_Host).options(num_cpus=self.cfg["num_cpus_per_worker"], num_gpus=1 if gpus else 0)
            self._actors = [host.remote(self.factory) for _ in range(n)]
        return self._actors

    def local(self) -> W:
        """The in-process worker (built on first use)."""
        if self._local is None:
            self._local = self.factory()
        return self._local

    # -- calls

    def imap_unordered(self, fn: Callable[[W, T], R], tasks: Iterable[T], progress: str | None = None) -> Iterator[tuple[T, R]]:
        """(task, fn(worker, task)) for every task, in order of completion; `progress`: a tqdm bar's label."""
        if isinstance(fn, str) or not callable(fn):
            raise TypeError(f"fn must be a function of (worker, task), e.g. Worker.method; got {fn!r}")
        tasks = list(tasks)
        if not tasks:
            return
        from tqdm import tqdm

        with tqdm(total=len(tasks), desc=progress, unit="shard", disable=progress is None or not self.show_progress) as bar:
            for item in (self._ray_calls(fn, tasks) if self.ray else ((t, fn(self.local(), t)) for t in tasks)):
                bar.update(1)
                yield item

    def _ray_calls(self, fn, tasks: list) -> Iterator[tuple[Any, Any]]:
        import ray

        queue, idle, pending = list(tasks), list(self.actors()), {}
        while queue or pending:
            while queue and idle:
                actor, task = idle.pop(), queue.pop(0)
                pending[actor.call.remote(fn, task)] = (actor, task)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, task = pending.pop(ref)
            result = ray.get(ref)
            idle.append(actor)
            yield task, result

    def map(self, fn: Callable[[W, T], R], tasks: Iterable[T], on_result: Callable[[T, R], Any] | None = None,
            progress: str | None = None) -> list[R]:
        """Every call; `on_result(task, result)` in this process as each finishes; the results in that order."""
        results = []
        for task, result in self.imap_unordered(fn, tasks, progress):
            if on_result is not None:
                on_result(task, result)
            results.append(result)
        return results

    def call(self, fn: Callable[[W, T], R], task: T) -> R:
        """One call (`fn(worker, task)`) on a worker."""
        return self.map(fn, [task])[0]

    # -- shutdown

    def restart(self) -> None:
        """Drop the workers (and their models); the next call builds them afresh."""
        self._local = None
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
            self._actors = []
        gc.collect()

    def close(self) -> None:
        """Drop the workers, and shut Ray down if this pool started it."""
        self.restart()
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> WorkerPool[W]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- resume


def shard_name(index: int) -> str:
    """The file of shard `index` (what `check_resume` looks for): shard-00042.parquet."""
    return f"shard-{index:05d}.parquet"


def shard_seed(seed: int, shard: int, stream: int = 0) -> int:
    """The sampling seed of shard `shard` (and of `stream`, e.g. the analysis' second generator).

    seed_{s,g} = (seed + 7919·s + g) mod 2^63: shard 0 of stream 0 samples with `seed` itself, so a
    run that fits in one shard draws what an unsharded run draws; the others are distinct and
    reproducible (7919 is a prime larger than any stream count, so (s, g) pairs never collide).
    """
    return (seed + 7919 * shard + stream) % (2**63)


class ResumeError(ConfigError):
    """An output folder holds results made under other settings."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def settings_diff(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (missing: <unset>)."""
    a, b, unset = _flat(old), _flat(new), object()
    show = lambda v: "<unset>" if v is unset else json.dumps(v)
    pairs = ((k, a.get(k, unset), b.get(k, unset)) for k in sorted(set(a) | set(b)))
    return [f"{k}: {show(x)} -> {show(y)}" for k, x, y in pairs if x != y]


def check_resume(out_dir: str | Path, settings: dict, results: Iterable[str], *, overwrite: bool = False,
                 redo_hint: str = "delete them to start over", manifest: str = "manifest.json") -> None:
    """Resume only results made under the same `settings` (what decides a shard file's contents).

    `results`: the folders under `out_dir` that hold the `shard-*.parquet` files. With `overwrite` they
    are deleted (and the manifest) first. If shard files exist and `<out_dir>/<manifest>` records
    other settings, a ResumeError lists the differing keys; otherwise the manifest is (re)written.
    """
    out = Path(out_dir)
    path = out / manifest
    folders = [out / r for r in results]
    if check_flag(overwrite, "overwrite"):  # a string such as "no" must never delete results
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        path.unlink(missing_ok=True)
    new = json.loads(json.dumps(settings, sort_keys=True))
    if path.is_file() and any(next(f.rglob("shard-*.parquet"), None) for f in folders if f.is_dir()):
        old = json.loads(path.read_text())
        old.pop("hash", None)  # written by earlier versions of the analysis
        changed = settings_diff(old, new)
        if changed:
            raise ResumeError(
                f"{out} holds results of other settings ({'; '.join(changed)}); resuming would mix them "
                f"into these results. Use another output_dir, or {redo_hint}"
            )
    atomic_write_bytes(path, json.dumps(new, indent=1, sort_keys=True).encode())
