#!/usr/bin/env bash
# Start / join / inspect / stop a Ray cluster for the training, analysis and decoding jobs.
#
#   bash scripts/ray_cluster.sh head   [--port 6379] [OPTIONS] [ray start args...]   # on the head node
#   bash scripts/ray_cluster.sh worker HEAD_IP:6379   [OPTIONS] [ray start args...]   # on every other node
#   bash scripts/ray_cluster.sh status [--temp-dir DIR] [ray status args...]
#   bash scripts/ray_cluster.sh stop   [--temp-dir DIR]                               # on every node
#
# OPTIONS (give the same ones to the head and to the workers):
#   --node-ip-address IP  the IP this node announces. Ray replaces 127.0.0.1 / localhost by the
#                         machine's routable IP; for a cluster on one machine that stays on the
#                         loopback interface, give every node another 127.x address (127.0.0.2).
#   --temp-dir DIR        Ray's folder for this cluster (sessions, logs, sockets; keep it short:
#                         socket paths are limited to 107 bytes). `stop --temp-dir DIR` then stops
#                         this cluster only; plain `stop` is `ray stop`: every Ray on the machine.
#
# Token authentication is decided the same way for the head and the workers: RAY_AUTH_MODE if set,
# else on when a token is available (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or
# ~/.ray/auth_token, which Ray itself reads), else off. (Left to Ray, a head turns it on when
# ~/.ray/auth_token exists and a worker does not, which then fails with InvalidAuthToken.) Every
# node and every job needs the same token; run_dapo_reweight.sh given RAY_ADDRESS applies the same
# rule to the job's driver (Ray enables token auth by itself only for RAY_ADDRESS=auto).
#
# Then, on the head node, run any job with RAY_ADDRESS set: the scripts connect to the cluster
# instead of starting a local Ray:
#   RAY_ADDRESS=auto bash scripts/run_dapo_reweight.sh trainer.nnodes=4 trainer.n_gpus_per_node=8
#
# Every node needs this project installed in the same Python (a shared file system or the same
# image): verl imports our plugin in every worker. Secrets are never put in the job config:
# export WANDB_API_KEY (or `wandb login` with a shared home) before `ray start` on each node, so
# workers inherit it. Non-secret settings (WANDB_MODE, WANDB_PROJECT, WANDB_RUN_GROUP,
# VERL_PLATFORM, ...) are forwarded to the workers by run_dapo_reweight.sh.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
RAY=("$PY" -m ray.scripts.scripts)

# Parsed from the command line by parse_node_options; REST keeps the other arguments, in order.
PORT=6379 NODE_IP="" TEMP_DIR="" REST=()

parse_node_options() {
  REST=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) PORT="${2:?--port needs a value}"; shift 2 ;;
      --port=*) PORT="${1#*=}"; shift ;;
      --node-ip-address) NODE_IP="${2:?--node-ip-address needs a value}"; shift 2 ;;
      --node-ip-address=*) NODE_IP="${1#*=}"; shift ;;
      --temp-dir) TEMP_DIR="${2:?--temp-dir needs a value}"; shift 2 ;;
      --temp-dir=*) TEMP_DIR="${1#*=}"; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  if [ -n "$TEMP_DIR" ]; then TEMP_DIR="$(mkdir -p "$TEMP_DIR" && cd "$TEMP_DIR" && pwd)"; fi
}

# The node options for `ray start`, from what parse_node_options found.
node_start_args() {
  NODE_ARGS=()
  if [ -n "$NODE_IP" ]; then
    case "$NODE_IP" in
      127.0.0.1|localhost|::1)
        echo "[ray_cluster] note: Ray announces $NODE_IP as this machine's routable IP; use e.g. 127.0.0.2 to stay on loopback" >&2 ;;
    esac
    NODE_ARGS+=("--node-ip-address=$NODE_IP")
  fi
  if [ -n "$TEMP_DIR" ]; then NODE_ARGS+=("--temp-dir=$TEMP_DIR"); fi
  return 0
}

# Where the head records its address: Ray's ray_current_cluster file in its temp dir.
address_file() {
  echo "${TEMP_DIR:-${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray}/ray_current_cluster"
}

start_head() {
  parse_node_options "$@"
  node_start_args
  export_ray_auth_mode ray_cluster
  has_gpu || use_cpu_backend
  "${RAY[@]}" start --head --port="$PORT" --include-dashboard=false "${NODE_ARGS[@]}" "${REST[@]}"
  local address
  address="$(cat "$(address_file)" 2>/dev/null || echo "HEAD_IP:$PORT")"
  echo "[ray_cluster] head started at $address; join with: bash scripts/ray_cluster.sh worker $address" \
       "${NODE_IP:+--node-ip-address IP }${TEMP_DIR:+--temp-dir $TEMP_DIR}"
}

start_worker() {
  if [ $# -eq 0 ] || [[ "$1" == -* ]]; then
    echo "[ray_cluster] error: worker needs the head's address first; usage: bash scripts/ray_cluster.sh worker HEAD_IP:PORT [options]" >&2
    exit 2
  fi
  local address="$1"; shift
  parse_node_options "$@"
  node_start_args
  export_ray_auth_mode ray_cluster
  has_gpu || use_cpu_backend
  "${RAY[@]}" start --address="$address" "${NODE_ARGS[@]}" "${REST[@]}"
}

show_status() {
  parse_node_options "$@"
  export_ray_auth_mode ray_cluster
  if [ -n "$TEMP_DIR" ]; then
    "${RAY[@]}" status --address="$(cat "$(address_file)")" "${REST[@]}"
  else
    "${RAY[@]}" status "${REST[@]}"
  fi
}

# The processes of the Ray cluster(s) whose temp dir is $1 on this machine: those naming a path
# under it (gcs_server, raylets, monitors, dashboard, agents), those naming their GCS address (the
# Ray client server), and all their descendants (Ray workers rename themselves `ray::...`).
# SIGTERM, then SIGKILL after $2 seconds. Exit status 1 if any is still alive.
STOP_SCOPED=$(cat <<'PYEOF'
import os, re, sys, psutil


def cmdline(proc):
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def name(proc):
    try:
        return proc.name()
    except psutil.Error:
        return "?"


def cluster_processes(temp_dir):
    names_dir = re.compile(re.escape(temp_dir) + r"(/|\s|$)")  # the folder itself, not /tmp/ray2 for /tmp/ray
    procs = list(psutil.process_iter())
    roots = [p for p in procs if names_dir.search(cmdline(p))]
    gcs = {f"--address={a}" for p in roots for a in re.findall(r"--gcs-address=(\S+)", cmdline(p))}
    roots += [p for p in procs if p not in roots and gcs & set(cmdline(p).split())]
    found = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                found.setdefault(proc.pid, proc)
        except psutil.Error:
            pass
    # never this process or whoever runs it (a `ray_cluster.sh ... --block` shell, a test)
    protected = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    return [p for pid, p in found.items() if pid not in protected]


def signal_all(procs, method):
    for proc in procs:
        try:
            getattr(proc, method)()
        except psutil.Error:
            pass


def stop(procs, grace_s):
    """SIGTERM, SIGKILL after grace_s: (names of those that needed SIGKILL, those still alive)."""
    signal_all(procs, "terminate")
    _, stubborn = psutil.wait_procs(procs, timeout=grace_s)
    stubborn_names = [name(p) for p in stubborn]
    signal_all(stubborn, "kill")
    _, alive = psutil.wait_procs(stubborn, timeout=5)
    return stubborn_names, alive


temp_dir, grace_s = os.path.realpath(sys.argv[1]), float(sys.argv[2])
targets = cluster_processes(temp_dir)
# Ray's own order (`ray stop`): raylets first (their workers and agents share their fate), the
# GCS last (the others report to it until they exit).
buckets = [
    [p for p in targets if name(p) == "raylet"],
    [p for p in targets if name(p) not in ("raylet", "gcs_server")],
    [p for p in targets if name(p) == "gcs_server"],
]
stubborn, alive = [], []
for bucket in buckets:
    bucket_stubborn, bucket_alive = stop(bucket, grace_s)
    stubborn += bucket_stubborn
    alive += bucket_alive
print(f"[ray_cluster] stopped {len(targets) - len(alive)} Ray processes of {temp_dir}"
      f" ({len(stubborn)} killed after {grace_s:g} s: {sorted(stubborn)})", file=sys.stderr)
if alive:
    print(f"[ray_cluster] still alive: {[p.pid for p in alive]}", file=sys.stderr)
sys.exit(1 if alive else 0)
PYEOF
)

stop_cluster() {
  parse_node_options "$@"
  if [ -n "$TEMP_DIR" ]; then
    "$PY" -c "$STOP_SCOPED" "$TEMP_DIR" "${RAY_STOP_GRACE_S:-10}"
  else
    # Ray's own stop: every Ray process on this machine, whatever cluster it belongs to.
    "${RAY[@]}" stop --force "${REST[@]}"
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  head) start_head "$@" ;;
  worker) start_worker "$@" ;;
  status) show_status "$@" ;;
  stop) stop_cluster "$@" ;;
  *) echo "usage: bash scripts/ray_cluster.sh head|worker HEAD:PORT|status|stop [options] [ray args]" >&2; exit 2 ;;
esac
