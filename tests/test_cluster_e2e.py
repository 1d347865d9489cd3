"""End to end on a 2-node Ray cluster built by `scripts/ray_cluster.sh`: the top-p ablation joins it.

One run, about 3-4 minutes on a 2-core machine:

- `ray_cluster.sh head` and `ray_cluster.sh worker` start two Ray nodes (each its own raylet) on
  this machine, both announcing 127.0.0.2: Ray rewrites 127.0.0.1 / localhost into the
  machine's routable IP, any other 127.x address is kept, and all of 127.0.0.0/8 is loopback, so
  no traffic leaves the loopback interface. The fake `GPU` is on the *worker* node only, so verl's
  GPU resource pool (the FSDP actor `WorkerDict`) can only be placed on the second node; the test
  checks that it ran under that node's raylet;
- `RAY_ADDRESS=<head> bash scripts/run_top_p_ablation.sh` with TOP_PS=0.9, WEIGHTING=ppl, wandb
  offline, 1 training step: it must join that cluster (not start its own Ray), exit 0, and log
  the top-p truncation, the ppl reweighting and a gradient, in the console log and in wandb;
- `ray_cluster.sh stop --temp-dir DIR` always stops the cluster (try/finally), stops nothing else
  (a decoy that plain `ray stop` would kill must survive), and nothing of the cluster may be left.

Isolation from other Ray instances on the machine: a temp dir of its own, free ports of its own
where Ray's defaults are fixed (6379, 10001, 52365: the same for every cluster and every node),
and token authentication with a token file of its own (RAY_AUTH_TOKEN_PATH) for the nodes and the
driver.
The test skips only when Ray cannot start a local instance on this machine at all.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ray_cluster.sh"
NODE_IP = "127.0.0.2"
RUN_TIMEOUT_S = 480
NODE_START_TIMEOUT_S = 180
QUERY_TIMEOUT_S = 90

# A driver that prints the cluster's node table (ray.nodes()) as one JSON line.
NODES_QUERY = r"""
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([
    {"id": n["NodeID"], "alive": n["Alive"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
    for n in ray.nodes()
]))
ray.shutdown()
"""

# Whether Ray can start at all here: a plain local instance in its own temp dir.
RAY_PROBE = r"""
import sys, ray
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="ERROR")
ray.shutdown()
"""


def _bindable(port: int) -> bool:
    """Whether port is free on every address (IPv4, and IPv6 where there is one), as Ray binds."""
    families = [(socket.AF_INET, "")] + ([(socket.AF_INET6, "::")] if socket.has_ipv6 else [])
    for family, host in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
        except OSError as error:
            if family == socket.AF_INET6 and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # no IPv6 on this machine
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """n distinct free ports between Ray's worker ports (10002-19999) and the kernel's ephemeral
    ones (32768+): no Ray component or outgoing connection takes one of them between this pick and
    the node's start, which a port the kernel handed out (bind to port 0) does not guarantee."""
    candidates = random.sample(range(20000, 32768), 200)
    ports = [port for port in candidates if _bindable(port)][:n]
    assert len(ports) == n, "no free ports in 20000-32767"
    return ports


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM a process group we started, SIGKILL after grace_s (a job that ran past its time)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tail(log: str, n: int = 80) -> str:
    return "\n".join(log.splitlines()[-n:])


class ScriptCluster:
    """A head and a worker node on NODE_IP, started and stopped with scripts/ray_cluster.sh."""

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.token_file = Path(temp_dir) / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.log = Path(temp_dir) / "ray_cluster_sh.log"
        ports = _free_ports(4)
        self.address = f"{NODE_IP}:{ports[0]}"
        # The ports whose defaults are fixed (6379, 10001, 52365): they would clash with other
        # clusters on the machine, and the two nodes' agents with each other. The other ports
        # are picked by the components themselves (port 0).
        self.head_args = [
            f"--port={ports[0]}",
            f"--ray-client-server-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            "--num-cpus=4",
            '--resources={"head_node": 1}',
        ]
        self.worker_args = [
            f"--dashboard-agent-listen-port={ports[3]}",
            "--num-cpus=4",
            "--num-gpus=1",
            '--resources={"worker_node": 1}',
        ]

    def env(self) -> dict[str, str]:
        """Environment for the script (so for every node) and for the drivers."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1",
        )
        return env

    def script(self, *args: str, timeout: float = NODE_START_TIMEOUT_S) -> subprocess.CompletedProcess:
        """`bash scripts/ray_cluster.sh ARGS`, its output appended to self.log. In a session of its
        own: the Ray processes it starts must not share pytest's process group."""
        proc = subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=REPO,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
        with self.log.open("a") as log:
            log.write(f"$ ray_cluster.sh {' '.join(args)}\n{proc.stdout}\n[exit {proc.returncode}]\n")
        return proc

    def start(self) -> None:
        """The head, then the worker node. Twice at most: on a busy machine a raylet can exit
        because its agents took longer than Ray's fixed 30 s to write their port files; the
        half-started cluster is then stopped and started again."""
        for _ in range(2):
            failed, output = self._start_nodes()
            if failed is None:
                return
            self.stop()
        if failed == "head":
            _skip_if_ray_cannot_start()
        pytest.fail(f"ray_cluster.sh {failed} failed twice (Ray itself starts here):\n{_tail(output)}")

    def _start_nodes(self) -> tuple[str | None, str]:
        """(None, "") once both nodes run, else ("head" or "worker", that command's output)."""
        node = ["--node-ip-address", NODE_IP, "--temp-dir", self.temp_dir]
        head = self.script("head", *node, *self.head_args)
        if head.returncode != 0:
            return "head", head.stdout
        worker = self.script("worker", self.address, *node, *self.worker_args)
        if worker.returncode != 0:
            return "worker", worker.stdout
        return None, ""

    def status_listing(self, node_ids: list[str], temp_dir: str) -> subprocess.CompletedProcess:
        """`ray_cluster.sh status`, asked again until it lists every node of the node table: Ray's
        autoscaler report lags the node table by a few seconds on a busy machine (seen in CI: the
        worker was in ray.nodes() but not yet in the report)."""
        deadline = time.monotonic() + QUERY_TIMEOUT_S
        while True:
            status = self.script("status", "--temp-dir", temp_dir, timeout=QUERY_TIMEOUT_S)
            listed = status.returncode == 0 and all(i in status.stdout for i in node_ids)
            if listed or time.monotonic() >= deadline:
                return status
            time.sleep(2)

    def nodes(self) -> list[dict]:
        """The node table, as a driver connected to the cluster sees it."""
        proc = subprocess.run(
            [sys.executable, "-c", NODES_QUERY, self.address],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
            check=False,
        )
        assert proc.returncode == 0, f"node table query failed:\n{_tail(proc.stdout + proc.stderr)}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: those naming its temp dir or GCS address, and their children."""
        marks = (
            self.temp_dir + "/",
            f"--temp-dir={self.temp_dir}",
            f"--address={self.address}",
            f"--gcs-address={self.address}",
        )
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            if any(mark in _cmdline(proc) for mark in marks):
                try:
                    for member in [proc, *proc.children(recursive=True)]:
                        found.setdefault(member.pid, member)
                except psutil.Error:
                    pass
        return [p for p in found.values() if p.pid != os.getpid()]

    def actors_by_node(self) -> dict[str, set[str]]:
        """{node id: process titles of the Ray workers under that node's raylet} (e.g. `ray::WorkerDict`)."""
        by_node: dict[str, set[str]] = {}
        for raylet in self.processes():
            match = re.search(r"--node_id=(\w+)", _cmdline(raylet))
            if match:
                try:
                    children = raylet.children()
                except psutil.Error:
                    continue
                by_node.setdefault(match.group(1), set()).update(_cmdline(c)[:80] for c in children)
        return by_node

    def stop(self) -> subprocess.CompletedProcess:
        return self.script("stop", "--temp-dir", self.temp_dir, timeout=120)


def _skip_if_ray_cannot_start() -> None:
    """Skip (with Ray's own error) when a plain local Ray cannot start on this machine either."""
    probe_dir = tempfile.mkdtemp(prefix="rayprobe", dir="/tmp")
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        probe = subprocess.run(
            [sys.executable, "-c", RAY_PROBE, probe_dir],
            env=env,
            capture_output=True,
            text=True,
            timeout=NODE_START_TIMEOUT_S,
            check=False,
        )
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if probe.returncode != 0:
        pytest.skip(f"Ray cannot start on this machine: {_tail(probe.stderr, 5)}")


def _run_ablation_on(cluster: ScriptCluster, out: Path) -> dict:
    """The top-p ablation (TOP_PS=0.9, ppl) on the cluster; node table and actors are read while it runs."""
    env = cluster.env()
    del env["RAY_AUTH_MODE"]  # run_dapo_reweight.sh must derive it from the token file, as the nodes do
    env.update(
        RAY_ADDRESS=cluster.address,
        PRESET="tiny-cpu",
        TOP_PS="0.9",
        WEIGHTING="ppl",
        WANDB_MODE="offline",
        WANDB_DIR=str(out / "wandb_root"),
        WANDB_RUN_GROUP="cluster-e2e-test",
        TINY_RUN_DIR=str(out / "run"),
        LOG_DIR_ROOT=str(out / "logs"),
    )
    (out / "wandb_root").mkdir()
    command = ["bash", str(REPO / "scripts" / "run_top_p_ablation.sh"), "trainer.total_training_steps=1"]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    nodes_during: list[dict] | None = None
    actors: dict[str, set[str]] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for node_id, titles in cluster.actors_by_node().items():
                actors.setdefault(node_id, set()).update(titles)
            # the node table, once the driver has joined the cluster
            if nodes_during is None and any("Connecting to existing Ray cluster" in line for line in lines):
                nodes_during = cluster.nodes()
            time.sleep(0.5)
    finally:
        if proc.poll() is None:  # timed out: the driver and its process group only
            _kill_group(proc.pid, grace_s=5)
        code = proc.wait(timeout=30)
        reader.join(timeout=30)
    log = "".join(lines)
    (out / "driver.log").write_text(log)
    return {
        "code": code,
        "log": log,
        "nodes_during": nodes_during,
        "actors": actors,
        "timed_out": time.monotonic() >= deadline,
    }


@pytest.mark.slow
def test_top_p_ablation_trains_on_a_two_node_cluster_from_ray_cluster_sh(tmp_path, read_wandb_history, step_metrics):
    # short: Ray's unix socket paths live under it (107-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="raytc", dir="/tmp")
    cluster = ScriptCluster(temp_dir)
    # what plain `ray stop` would kill ("default_worker.py" in its command line): must survive ours
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "default_worker.py"])
    stop, result, nodes_before, nodes_after = None, None, [], []
    try:
        cluster.start()
        nodes_before = cluster.nodes()
        status = cluster.status_listing([n["id"] for n in nodes_before], temp_dir)
        result = _run_ablation_on(cluster, tmp_path)
        nodes_after = cluster.nodes()
    finally:
        try:
            stop = cluster.stop()
        finally:
            leftovers = [p.pid for p in cluster.processes() if _alive(p)]
            decoy_survived = decoy.poll() is None
            decoy.kill()
            decoy.wait(timeout=10)
            if not leftovers:
                shutil.rmtree(temp_dir, ignore_errors=True)
    # 3. the script stopped this cluster, all of it, and nothing else
    assert stop.returncode == 0, stop.stdout
    assert leftovers == [], f"processes left after `ray_cluster.sh stop`: {leftovers}"
    assert decoy_survived, "`ray_cluster.sh stop --temp-dir` killed a process of no cluster of its"

    log = result["log"]
    assert not result["timed_out"], f"training did not finish in {RUN_TIMEOUT_S} s\n{_tail(log)}"
    # 1. two live nodes on loopback, the fake GPU on the worker node only; the driver joined them
    assert len(nodes_before) == 2 and all(n["alive"] and n["ip"] == NODE_IP for n in nodes_before), nodes_before
    (head,) = [n for n in nodes_before if "head_node" in n["resources"]]
    (worker,) = [n for n in nodes_before if "worker_node" in n["resources"]]
    assert worker["resources"].get("GPU") == 1.0 and "GPU" not in head["resources"], nodes_before
    assert status.returncode == 0 and all(n["id"] in status.stdout for n in nodes_before), status.stdout
    assert result["code"] == 0, _tail(log)
    assert "[run_dapo_reweight] RAY_AUTH_MODE=token" in log, _tail(log)  # from the token file alone
    assert re.search(rf"Connecting to existing Ray cluster at address: {re.escape(cluster.address)}", log), _tail(log)
    assert result["nodes_during"] is not None, "the node table was not read while the job ran"
    for table in (result["nodes_during"], nodes_after):
        # the same two nodes, alive, during and after the job
        assert {(n["id"], n["alive"]) for n in table} == {(n["id"], True) for n in nodes_before}, table
    # verl's FSDP actor (the GPU pool) ran under the second node's raylet, not the head's
    actors = result["actors"]
    assert any(t.startswith("ray::WorkerDict") for t in actors.get(worker["id"], ())), actors
    assert not any(t.startswith("ray::WorkerDict") for t in actors.get(head["id"], ())), actors

    # 2. the metrics in the console log and in the wandb offline history
    (log_file,) = (tmp_path / "logs" / "top_p-0.9").glob("train-*.log")  # verl_ext.run_log: one file per launch
    train_log = log_file.read_text()
    metrics = step_metrics(train_log)
    assert sorted(metrics) == [1], _tail(train_log)
    values = metrics[1]
    # top-p 0.9 cuts real mass: 0.009-0.020 per step in the runs seen (one step of this tiny model can
    # fall under 0.01); top-p 1.0 gives 0.0012-0.0014, the engines' mismatch only (docs/benchmarks.md)
    assert values["rollout/top_p_truncated_mass_mean"] > 0.004, values
    assert values["actor/reweight/ppl_abs_z_mean"] > 0, values
    assert values["actor/grad_norm"] > 0 and math.isfinite(values["actor/grad_norm"]), values
    (wandb_run,) = (tmp_path / "wandb_root" / "wandb").glob("offline-run-*")
    rows = read_wandb_history(wandb_run)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["rollout/top_p_truncated_mass_mean"] == pytest.approx(values["rollout/top_p_truncated_mass_mean"], rel=1e-6), row
    assert row["actor/reweight/ppl_abs_z_mean"] > 0, row
    assert row["actor/grad_norm"] > 0, row
    run_names = set(re.findall(r"finished (\S+): preset tiny-cpu", train_log))
    assert len(run_names) == 1, _tail(train_log)
    (run_name,) = run_names
    assert "topp0.9" in run_name and "ppl" in run_name, run_name
    assert (tmp_path / "run" / "dapo_reweight" / run_name / "global_step_1").is_dir()  # checkpoints under that name
