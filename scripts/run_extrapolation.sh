#!/usr/bin/env bash
# Selective extrapolation sweep (paper Eq. 7, Table 1). Hydra overrides pass through:
#
#   bash scripts/run_extrapolation.sh                                  # tiny CPU models (no GPU needed)
#   bash scripts/run_extrapolation.sh models.base=/m/Qwen2.5-32B models.rl=/m/DAPO-Qwen-32B \
#       data.files=[data/prepared/aime_2021_2024.parquet] decoding.max_new_tokens=20480
#   bash scripts/run_extrapolation.sh sweep.gammas=[0.05,0.1] decoding.propose_from=rl   # Table 1 variant
#   bash scripts/run_extrapolation.sh ray.address=auto                 # shards over a Ray cluster
#
# Results: <output_dir>/results.{parquet,json}, accuracy_vs_replace_ratio.png; rerun to resume.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
export TOKENIZERS_PARALLELISM=false
exec "$PY" -m verl_ext.decoding.sweep --config-name extrapolation "$@"
