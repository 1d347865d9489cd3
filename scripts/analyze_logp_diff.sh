#!/usr/bin/env bash
# Token-level Δlog p / entropy / KL between a base and an RLVR model, with histograms (issue #5).
# Hydra overrides pass through (see configs/analyze_logp_diff.yaml):
#
#   bash scripts/analyze_logp_diff.sh                                   # tiny CPU default, seconds
#   bash scripts/analyze_logp_diff.sh models.base=Qwen/Qwen2.5-Math-7B models.rl=/ckpt/dapo-7b \
#       input.prompts=shared/data/aime_2021_2024.jsonl input.prompt_key=question sampling.n=8
#   bash scripts/analyze_logp_diff.sh input.source=files 'input.files=[{path: runs/val_dumps, generator: rl}]'
#
# Several GPUs (or ray.address / RAY_ADDRESS set): shards go to Ray actors, one per GPU. WANDB_MODE or
# WANDB_API_KEY set: histograms and tables are also logged to wandb.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
if ! has_gpu; then
  export TOKENIZERS_PARALLELISM=false
  export TINY_ASSETS_DIR="${TINY_ASSETS_DIR:-$REPO/.assets/tiny}"
fi
exec "$PY" -m verl_ext.analysis.logp_diff "$@"
