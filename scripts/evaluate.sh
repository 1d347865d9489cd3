#!/usr/bin/env bash
# Avg@k / Pass@k evaluation with Math-Verify. Hydra overrides pass through (see configs/evaluate.yaml):
#
#   bash scripts/evaluate.sh                                                          # tiny CPU default (seconds)
#   bash scripts/evaluate.sh generations=outputs/gens.jsonl metrics.pass_ks=[1,16]   # grade existing generations
#   bash scripts/evaluate.sh model.path=/models/Qwen2.5-Math-7B                       # generate (32 x T=1.0, top-p 0.7), grade
#   bash scripts/evaluate.sh model.path=... data.files=[data/prepared/aime24.parquet] sampling.max_new_tokens=20000
#
# Prepare the data first: bash scripts/prepare_data.sh. WANDB_API_KEY or WANDB_MODE set -> also log to wandb.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if [ "$#" -eq 0 ]; then
  echo "[evaluate] no argument: the tiny CPU default (tiny=true, 4 samples x 32 tokens); give model.path=... or generations=... for a real run" >&2
  set -- tiny=true model.backend=hf sampling.n=4 sampling.max_new_tokens=32 'metrics.pass_ks=[1,2]' output_dir=outputs/eval/tiny
fi
"$PY" -m verl_ext.evaluation "$@"
