#!/usr/bin/env bash
# Start / join / inspect / stop a Ray cluster for the training, analysis and decoding jobs.
#
#   bash scripts/ray_cluster.sh head   [--port 6379] [ray start args...]   # on the head node
#   bash scripts/ray_cluster.sh worker HEAD_IP:6379 [ray start args...]     # on every other node
#   bash scripts/ray_cluster.sh status
#   bash scripts/ray_cluster.sh stop                                         # on every node
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
cmd="${1:-}"; shift || true
case "$cmd" in
  head)
    port=6379
    if [ "${1:-}" = "--port" ]; then port="$2"; shift 2; fi
    has_gpu || use_cpu_backend
    "${RAY[@]}" start --head --port="$port" --include-dashboard=false "$@"
    echo "[ray_cluster] head started; join with: bash scripts/ray_cluster.sh worker $(hostname -I 2>/dev/null | awk '{print $1}'):$port"
    ;;
  worker)
    addr="${1:?usage: ray_cluster.sh worker HEAD_IP:PORT}"; shift
    has_gpu || use_cpu_backend
    "${RAY[@]}" start --address="$addr" "$@"
    ;;
  status) "${RAY[@]}" status ;;
  stop) "${RAY[@]}" stop --force ;;
  *) echo "usage: bash scripts/ray_cluster.sh head|worker HEAD:PORT|status|stop [ray start args]" >&2; exit 2 ;;
esac
