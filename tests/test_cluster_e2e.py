"""End to end on a 2-node Ray cluster (loopback only): the top-p ablation joins it and trains.

One run, about 2-3 minutes on a 2-core machine:

- a local cluster of two Ray nodes (a head and a worker node, each with its own raylet) on
  127.0.0.1, started by Ray's own multi-node-on-one-machine utility `ray.cluster_utils.Cluster`
  in a helper process. The fake `GPU` is on the *worker* node only, so verl's GPU resource pool
  (the FSDP actor and the rollout) can only be placed on the second node;
- `RAY_ADDRESS=<head> bash scripts/run_top_p_ablation.sh` with TOP_PS=0.9, WEIGHTING=ppl, wandb
  offline, 1 training step: it must join that cluster (not start its own Ray), exit 0, and log
  the top-p truncation, the ppl reweighting and a gradient, in the console log and in wandb;
- the cluster is always shut down (Ray's own per-node process kill, then the helper's process
  group), and nothing of it may be left running.

Why not `scripts/ray_cluster.sh head|worker` (the user's path for real, multi-machine clusters):
with Ray 2.60 on Linux, `ray start` turns 127.0.0.1 (`--node-ip-address`, `--address`) into the
machine's other IP (`services.resolve_ip_for_localhost`); the only switch that keeps loopback,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, makes `ray start --address=...` refuse to start a worker
node ("Multi-node Ray clusters are not supported on Windows and OSX"). So a head can be started
on loopback by the script, a second node cannot. `Cluster` starts the same node processes
(gcs_server, raylet, ...) without that guard.

Never `ray stop` here: it kills every Ray process on the machine, including other users' runs.
Token authentication is on, with a token file of this test's own (RAY_AUTH_TOKEN_PATH) shared by
the nodes and the driver: Ray 2.60 turns token auth on for a new cluster when ~/.ray/auth_token
exists, and a process that does not send it gets `AuthenticationError: InvalidAuthToken`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 480
CLUSTER_START_TIMEOUT_S = 120

# Runs in its own session (process group): Ray's reaper, started by Cluster, kills that group if
# the helper dies, and the teardown kills what is left of it. Commands on stdin, one per line:
# `nodes` -> one JSON line with the GCS node table (what ray.nodes() returns); EOF -> shut down.
CLUSTER_HELPER = r"""
import json, sys
from ray.cluster_utils import Cluster

port = int(sys.argv[1])
cluster = Cluster(  # Ray's temp dir: $RAY_TMPDIR/ray
    initialize_head=True,
    head_node_args=dict(node_ip_address="127.0.0.1", gcs_server_port=port, num_cpus=4,
                        include_dashboard=False, resources={"head_node": 1}),
)
try:
    cluster.add_node(node_ip_address="127.0.0.1", num_cpus=4, num_gpus=1, resources={"worker_node": 1})
    cluster.wait_for_nodes(timeout=60)
    print(json.dumps({"address": cluster.address}), flush=True)
    for line in sys.stdin:
        if line.strip() == "nodes":
            nodes = [
                {"id": n["NodeID"], "alive": n["Alive"], "ip": n["NodeManagerAddress"],
                 "resources": n["Resources"]}
                for n in cluster.global_state.node_table()
            ]
            print(json.dumps({"nodes": nodes}), flush=True)
finally:
    cluster.shutdown()
    print(json.dumps({"shutdown": True}), flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                pids.append(proc.info["pid"])
        except (ProcessLookupError, psutil.Error):
            pass
    return pids


def _pids_using(temp_dir: str) -> list[int]:
    """Live processes whose command line names the cluster's temp dir (gcs_server, raylet, ...)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and temp_dir in " ".join(proc.info["cmdline"] or []):
                pids.append(proc.info["pid"])
        except psutil.Error:
            pass
    return pids


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM a process group we started, then SIGKILL whatever is still there after grace_s."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _group_pids(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)


class LocalCluster:
    """Two Ray nodes on 127.0.0.1 in a helper process (see CLUSTER_HELPER)."""

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.token_file = Path(temp_dir) / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.leftovers: list[int] = []
        self.helper_log = Path(temp_dir) / "cluster_helper.log"

    def env(self) -> dict[str, str]:
        """Environment for every process of the cluster and for its drivers."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES")}
        env.update(
            # keep 127.0.0.1 as the node IP / GCS address: Ray turns it into the machine's IP otherwise
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            RAY_USAGE_STATS_ENABLED="0",
            # ray_current_cluster goes under here, not /tmp/ray (where another user's ray.init() looks)
            RAY_TMPDIR=self.temp_dir,
            # the CPU backend in every Ray worker process (the raylets' environment is inherited)
            VERL_PLATFORM="cpu",
            VERL_ENGINE_DEVICE="cuda",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        return env

    def start(self) -> None:
        self._helper_err = self.helper_log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLUSTER_HELPER, str(self.port)],
            cwd=REPO,
            env=self.env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._helper_err,
            text=True,
            start_new_session=True,
        )
        reply = self._read_reply(CLUSTER_START_TIMEOUT_S)
        assert reply.get("address") == self.address, (reply, self._helper_tail())

    def nodes(self) -> list[dict]:
        assert self.proc is not None and self.proc.poll() is None, self._helper_tail()
        self.proc.stdin.write("nodes\n")
        self.proc.stdin.flush()
        return self._read_reply(30)["nodes"]

    def _read_reply(self, timeout_s: float) -> dict:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        assert box and box[0].strip(), f"no answer from the cluster helper\n{self._helper_tail()}"
        return json.loads(box[0])

    def _helper_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.helper_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Ray's own shutdown of both nodes (the helper's Cluster.shutdown), then kill its group."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the helper leads its own group
        try:
            if self.proc.poll() is None:
                self.proc.stdin.close()  # EOF -> cluster.shutdown()
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            _kill_group(pgid, grace_s=10)
            for pid in _pids_using(self.temp_dir):  # anything that left the group
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            self._helper_err.close()
            self.leftovers = _group_pids(pgid) + _pids_using(self.temp_dir)


def _number(text: str) -> float:
    match = re.fullmatch(r"(?:np\.\w+\()?\s*([-+0-9.eEinfa]+)\)?", text.strip())
    return float(match.group(1)) if match else math.nan


def step_metrics(log: str) -> dict[int, dict[str, float]]:
    """verl's console logger lines `step:N - key:value - ...`, parsed per step."""
    steps = {}
    for line in log.splitlines():
        match = re.search(r"\bstep:(\d+) - (.*)$", line)
        if match:
            items = (item.split(":", 1) for item in match.group(2).split(" - ") if ":" in item)
            steps[int(match.group(1))] = {key.strip(): _number(value) for key, value in items}
    return steps


def _tail(log: str, n: int = 80) -> str:
    return "\n".join(log.splitlines()[-n:])


def _run_ablation_on(cluster: LocalCluster, out: Path) -> dict:
    """The top-p ablation (TOP_PS=0.9, ppl) on the cluster; the node table is read while it runs."""
    env = cluster.env()
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
    nodes_during = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
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
    return {"code": code, "log": log, "nodes_during": nodes_during, "timed_out": time.monotonic() >= deadline}


@pytest.mark.slow
def test_top_p_ablation_trains_on_a_two_node_loopback_cluster(tmp_path, read_wandb_history):
    # short: Ray's unix socket paths live under it (108-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="raytc", dir="/tmp")
    cluster = LocalCluster(temp_dir)
    try:
        cluster.start()
        nodes_before = cluster.nodes()
        result = _run_ablation_on(cluster, tmp_path)
        nodes_after = cluster.nodes()
    finally:
        cluster.stop()
        if not cluster.leftovers:
            shutil.rmtree(temp_dir, ignore_errors=True)
    # 3. nothing of the cluster is left running
    assert cluster.leftovers == [], f"processes left after the cluster's shutdown: {cluster.leftovers}"

    log = result["log"]
    assert not result["timed_out"], f"training did not finish in {RUN_TIMEOUT_S} s\n{_tail(log)}"
    # 1. two live nodes on loopback, the fake GPU on the worker node only; the driver joined them
    assert len(nodes_before) == 2 and all(n["alive"] and n["ip"] == "127.0.0.1" for n in nodes_before), nodes_before
    worker = [n for n in nodes_before if "worker_node" in n["resources"]]
    assert len(worker) == 1 and worker[0]["resources"].get("GPU") == 1.0, nodes_before
    assert sum(n["resources"].get("GPU", 0) for n in nodes_before) == 1.0, nodes_before
    assert result["code"] == 0, _tail(log)
    assert re.search(rf"Connecting to existing Ray cluster at address: {re.escape(cluster.address)}", log), _tail(log)
    assert result["nodes_during"] is not None, "the node table was not read while the job ran"
    for table in (result["nodes_during"], nodes_after):
        # the same two nodes, alive, during and after the job
        assert {(n["id"], n["alive"]) for n in table} == {(n["id"], True) for n in nodes_before}, table

    # 2. the metrics in the console log and in the wandb offline history
    train_log = (tmp_path / "logs" / "top_p-0.9" / "train.log").read_text()
    metrics = step_metrics(train_log)
    assert sorted(metrics) == [1], _tail(train_log)
    values = metrics[1]
    # top-p 0.9 cuts real mass (with top-p 1.0 it is ~0.001, the engines' mismatch only)
    assert values["rollout/top_p_truncated_mass_mean"] > 0.01, values
    assert values["actor/reweight/ppl_abs_z_mean"] > 0, values
    assert values["actor/grad_norm"] > 0 and math.isfinite(values["actor/grad_norm"]), values
    (wandb_run,) = (tmp_path / "wandb_root" / "wandb").glob("offline-run-*")
    rows = read_wandb_history(wandb_run)
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["rollout/top_p_truncated_mass_mean"] > 0.01, row
    assert row["actor/reweight/ppl_abs_z_mean"] > 0, row
    assert row["actor/grad_norm"] > 0, row
    run_names = set(re.findall(r"finished (\S+): preset tiny-cpu", train_log))
    assert len(run_names) == 1, _tail(train_log)
    (run_name,) = run_names
    assert "topp0.9" in run_name and "ppl" in run_name, run_name
    assert (tmp_path / "run" / "dapo_reweight" / run_name / "global_step_1").is_dir()  # checkpoints under that name
