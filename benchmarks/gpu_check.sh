#!/usr/bin/env bash
# The GPU measurements of issue 21 as one prepared run (< 8 minutes on an H100/H200):
#
#   1. check_static_gpu.py        static step replayed as CUDA graphs = eager = the step loop's tokens
#   2. bench_decoding 1.5b, b=32  every row incl. the experimental speculative k=4 and π_RL drafts (vs the
#                                 static step: do they earn a place in the main path?), roofline fractions
#   3. profile_static_step 1.5b   one static step: kernel time by kind, replay vs kernel sum, roofline
#   4. bench_decoding 7b,   b=32  single/step/static rows (--no-spec), roofline fractions
#   5. bench_decoding 1.5b, b=128 the same
#   6. bench_decoding 7b,   b=128 the same
#   7. bench_token_metrics L=4096 (default tiny model, then a 1.5B-shaped bf16 pair)
#   8. bench_decoding 1.5b, b=32 with --compile-layers (torch.compile of each layer's pure parts), if time is left
#
# Each step gets min(its own limit, the time left of BUDGET_S) and is skipped when less than
# MIN_STEP_S is left; its output goes to $OUT/raw/<step>.txt, then gpu_summary.py writes
# $OUT/summary.md, and raw/ (with summary.md) is packed into $OUT/gpu_check.tar.gz and removed:
# two files come back.
#
#   bash benchmarks/gpu_check.sh                                   # on the GPU machine (python3 there)
#   SMOKE=1 OUT=/tmp/gpu_smoke PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # CPU dry run, ~1 min
#
# Environment: OUT (default ./outputs/gpu_check), BUDGET_S (default 470), MIN_STEP_S (default 20),
# PYTHON (default python3), SMOKE=1 (CPU, tiny shapes, one repeat: checks the script, measures nothing).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/outputs/gpu_check}
BUDGET_S=${BUDGET_S:-470}
MIN_STEP_S=${MIN_STEP_S:-20}
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # steps run in benchmarks/
SMOKE=${SMOKE:-0}
RAW=$OUT/raw
mkdir -p "$RAW"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
: >"$RAW/steps.tsv"

if [ "$SMOKE" = 1 ]; then
  DEV=cpu
  SHAPE_15="--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 1024"
  SHAPE_7="--hidden 96 --layers 2 --heads 6 --kv-heads 2 --intermediate 192 --vocab 1024"
  BENCH="--device cpu --roofline on --repeats 1 --new-tokens 8 --prompt-len 8 --official-vllm off --official-tokens 4"
  B_SMALL=4; B_LARGE=8
  SPEC_TOKENS=""
  PROFILE="--device cpu --new-tokens 8 --steps 3 --prompt-len 8"
  CHECK="--device cpu --requests 6 --new-tokens 6 --vocab 256"
  METRICS="--device cpu --seq-len 256 --vocab 8192 --reps 1"
  METRICS_15="--device cpu --seq-len 128 --vocab 8192 --hidden 128 --layers 2 --reps 1"
else
  DEV=cuda
  SHAPE_15="--preset 1.5b"
  SHAPE_7="--preset 7b"
  BENCH="--device cuda --repeats 2 --new-tokens 64 --prompt-len 32 --official-vllm off"
  B_SMALL=32; B_LARGE=128
  SPEC_TOKENS="--new-tokens 48"  # the experimental speculative rows are slow on a GPU: fewer tokens (DESIGN §6)
  PROFILE="--device cuda"
  CHECK="--device cuda"
  METRICS="--device cuda --seq-len 4096"
  METRICS_15="--device cuda --seq-len 4096 --hidden 1536 --layers 28 --dtype bfloat16"
fi

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    printf '%s\tskipped\t0\t(budget: %ss left)\n' "$name" "$left" >>"$RAW/steps.tsv"
    echo "== $name: skipped, ${left}s of the budget left"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$RAW/$name.txt" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$*" >>"$RAW/steps.tsv"
  echo "   rc=$rc in $(($(date +%s) - t0))s"
  tail -n 4 "$RAW/$name.txt"
}

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) smoke=$SMOKE budget_s=$BUDGET_S"
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
} >"$RAW/env.txt" 2>&1
cat "$RAW/env.txt"

step check_static 90 "$PY" benchmarks/check_static_gpu.py $CHECK
if [ "$(awk -F'\t' '$1 == "check_static" {print $2}' "$RAW/steps.tsv")" != 0 ]; then
  # captured graphs failed or gave other tokens: measure the static rows eagerly, so the rest still runs
  BENCH="$BENCH --cuda-graph off"
  echo "check_static failed: static rows run without CUDA graphs (--cuda-graph off)" | tee -a "$RAW/env.txt"
fi
cd benchmarks
step bench_1.5b_b32 150 "$PY" bench_decoding.py $SHAPE_15 --batch $B_SMALL $BENCH --draft-lens 4 --no-auto $SPEC_TOKENS
step profile_1.5b_b32 60 "$PY" profile_static_step.py $SHAPE_15 --batch $B_SMALL $PROFILE
step bench_7b_b32 80 "$PY" bench_decoding.py $SHAPE_7 --batch $B_SMALL $BENCH --no-spec --no-official
step bench_1.5b_b128 70 "$PY" bench_decoding.py $SHAPE_15 --batch $B_LARGE $BENCH --no-spec --no-official
step bench_7b_b128 80 "$PY" bench_decoding.py $SHAPE_7 --batch $B_LARGE $BENCH --no-spec --no-official
step metrics_L4096 45 "$PY" bench_token_metrics.py $METRICS
step metrics_1.5b_L4096 60 "$PY" bench_token_metrics.py $METRICS_15
step bench_1.5b_b32_compiled 100 "$PY" bench_decoding.py $SHAPE_15 --batch $B_SMALL $BENCH --no-spec --no-official --compile-layers
cd "$ROOT"

"$PY" benchmarks/gpu_summary.py "$RAW" >"$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
cp "$OUT/summary.md" "$RAW/"
RESULT_LINE=$("$PY" benchmarks/gpu_summary.py "$RAW" --result 2>&1)
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" raw && rm -rf "$RAW"
echo "total $(($(date +%s) - START))s; results in $OUT/gpu_check.tar.gz"
echo "$RESULT_LINE"  # last: benchmarks/record.py reads it
