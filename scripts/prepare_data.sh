#!/usr/bin/env bash
# Convert math datasets (local parquet / jsonl) into verl's RL parquet format. Hydra overrides pass through:
#
#   bash scripts/prepare_data.sh raw_dir=../shared/data                   # AIME + AMC files in that folder -> data/prepared/
#   bash scripts/prepare_data.sh                                          # the same from data/raw/ (the default raw_dir)
#   bash scripts/prepare_data.sh on_invalid=error                         # stop at rows without problem/answer (default: skip and list them)
#   bash scripts/prepare_data.sh '+datasets.aime24={path: /data/aime.jsonl, data_source: aime24, keep: {year: [2024]}}'
#   bash scripts/prepare_data.sh +datasets.dapo_math.path=/data/DAPO-Math-17k/data +datasets.dapo_math.split=train \
#       +datasets.dapo_math.data_source=math_dapo +datasets.dapo_math.dedupe=true
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
"$PY" -m verl_ext.data_prep "$@"
