#!/usr/bin/env bash
# Selective token replacement sweep (paper Alg. 1 / Fig. 2). Hydra overrides pass through:
#
#   bash scripts/run_token_replacement.sh                                  # tiny CPU models (no GPU needed)
#   bash scripts/run_token_replacement.sh models.base=/m/Qwen2.5-32B models.rl=/m/DAPO-Qwen-32B \
#       data.files=[data/prepared/aime_2021_2024.parquet] decoding.max_new_tokens=20480
#   bash scripts/run_token_replacement.sh sweep.target_ratios=[0.05,0.1,0.2]   # calibrate τ to ratios
#   bash scripts/run_token_replacement.sh 'sweep.thresholds={delta_logp:[-0.3,-0.5]}'  # only these τ (replaces the defaults)
#   bash scripts/run_token_replacement.sh ray.address=auto                 # shards over a Ray cluster
#
# Results: <output_dir>/results.{parquet,json}, accuracy_vs_replace_ratio.png; rerun to resume.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
export TOKENIZERS_PARALLELISM=false
exec "$PY" -m verl_ext.decoding.sweep --config-name token_replacement "$@"
