#!/usr/bin/env bash
# The paper in miniature on one CPU: SFT base -> verl DAPO per weighting -> Avg@k/Pass@k ->
# Δlog p analysis -> token replacement and extrapolation sweeps -> <output_dir>/report.md.
#
#   bash scripts/reproduce_mini.sh                        # full run: 2 schemes x 1 training seed (wall times: docs/benchmarks.md)
#   bash scripts/reproduce_mini.sh 'seeds=[0,1,2]' 'schemes=[none,lowprob,ppl,dominate]'   # every scheme, 3 seeds
#   bash scripts/reproduce_mini.sh mini_size=smoke output_dir=outputs/mini_smoke   # CI-sized (minutes)
#   bash scripts/reproduce_mini.sh 'schemes=[none,lowprob,ppl,dominate]' train.steps=60
#   bash scripts/reproduce_mini.sh redo=[report]          # rebuild the report from finished stages
#
# Rerunning resumes from the last finished stage. Knobs: configs/reproduce_mini.yaml.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
PY="$(project_python)"
use_cpu_backend
cd "$REPO"
exec "$PY" -m verl_ext.mini.pipeline "$@"
