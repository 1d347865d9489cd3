#!/usr/bin/env bash
# A training run's actor checkpoint as a Hugging Face model (verl's model merger), for evaluation/analysis:
#
#   bash scripts/merge_checkpoint.sh runs/dapo_reweight/tiny-cpu-lowprob-a0.2-topp1.0     # the latest step
#   bash scripts/merge_checkpoint.sh RUN_DIR --step 20                                     # another step
#   bash scripts/merge_checkpoint.sh RUN_DIR/global_step_20
#
# Writes RUN_DIR/global_step_N/merged_hf. Training does this for the last step itself (run.merge_at_end),
# and scripts/evaluate.sh, analyze_logp_diff.sh and the decoding sweeps accept the run folder directly.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
exec "$PY" -m verl_ext.merge "$@"
