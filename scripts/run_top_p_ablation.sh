#!/usr/bin/env bash
# Rollout top-p ablation (paper Fig. 3c): the same DAPO run at several rollout top-p values,
# everything else equal; validation keeps top-p 0.7. One wandb run per value, one wandb group.
#
#   bash scripts/run_top_p_ablation.sh                         # TOP_PS="1.0 0.95 0.9 0.8"
#   TOP_PS="1.0 0.9" WEIGHTING=none bash scripts/run_top_p_ablation.sh trainer.total_training_steps=200
#   CORRECTION=1 bash scripts/run_top_p_ablation.sh            # + verl's rollout correction (token IS)
#
# With top-p < 1 the engine samples from the renormalised nucleus while verl recomputes
# π_old over the full vocabulary, so the batch is off-policy w.r.t. π_old. The dapo_reweight
# trainer logs the cut mass per token (rollout/top_p_truncated_mass_*), verl logs
# training/rollout_probs_diff_* and rollout_corr/*. CORRECTION=1 turns on verl's truncated
# token-level importance sampling (algorithm.rollout_correction.rollout_is=token) so that
# corrected and uncorrected runs can be compared. Every run has its own folder (run name
# <preset>-<scheme>-a<alpha>-topp<p>[-is]; a trainer.default_local_dir=DIR you pass becomes DIR/<run name>),
# and a run never resumes from another configuration's checkpoints (verl_ext/run_dir.py).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
TOP_PS="${TOP_PS:-1.0 0.95 0.9 0.8}"
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-top-p-ablation-${PRESET:-default}-$(date +%Y%m%d-%H%M%S)}"
extra=()
tag=""
if [ "${CORRECTION:-0}" = "1" ]; then
  tag="-is"
  # run.tag: corrected runs get their own name, wandb run and folder (-is), never the plain run's checkpoints
  extra+=(algorithm.rollout_correction.rollout_is=token algorithm.rollout_correction.rollout_is_threshold=2.0
          "run.tag=-is")
fi
per_run_dir_args "$@"
for p in $TOP_PS; do
  python3 -c "import sys; v=float('$p'); sys.exit(0 if 0 < v <= 1 else 1)" 2>/dev/null \
    || { echo "error: TOP_PS value '$p' is not a number in (0, 1]" >&2; exit 2; }
done
for p in $TOP_PS; do
  echo "=== rollout top_p=$p${tag:+ with rollout correction} ==="
  # LOG_DIR_ROOT: the launches' log files go to LOG_DIR_ROOT/top_p-<p> instead of each run's own logs/
  LOG_DIR="${LOG_DIR_ROOT:+$LOG_DIR_ROOT/top_p-$p$tag}" bash "$REPO/scripts/run_dapo_reweight.sh" \
    "actor_rollout_ref.rollout.top_p=$p" "actor_rollout_ref.rollout.val_kwargs.top_p=0.7" \
    "${extra[@]}" "${RUN_ARGS[@]}"
done
