#!/usr/bin/env bash
# Train with DAPO + an advantage-weighting scheme on verl. Hydra overrides pass through:
#
#   bash scripts/run_dapo_reweight.sh                                  # tiny CPU run (no GPU) / 7B preset (GPU)
#   PRESET=qwen3-8b-base WEIGHTING=lowprob ALPHA=0.1 bash scripts/run_dapo_reweight.sh trainer.nnodes=4
#   WEIGHTING=ppl bash scripts/run_dapo_reweight.sh data.train_batch_size=256
#   DRY_RUN=1 bash scripts/run_dapo_reweight.sh                       # print the composed config, no Ray
#
# Environment knobs:
#   PRESET     a file in configs/preset/ (default: tiny-cpu without a GPU, else qwen2.5-math-7b)
#   WEIGHTING  lowprob | ppl | dominate | none      (default: the config's, lowprob)
#   ALPHA      weighting strength (default: the preset's, else the paper's value for the scheme)
#   DRY_RUN=1  compose + validate + print the config, then exit
#   LOG_DIR    where the launch's log file goes (default: <run dir>/logs; one new train-<time>.log per launch)
#   RUN_LOG_CONSOLE=full  show everything on the console (default: progress bar, one short line per step)
#   WANDB_API_KEY or WANDB_MODE set -> also log to wandb
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"

if has_gpu; then DEFAULT_PRESET=qwen2.5-math-7b; else DEFAULT_PRESET=tiny-cpu; fi
PRESET="${PRESET:-$DEFAULT_PRESET}"
PY="$(project_python)"
require_preset "$PRESET"
[ -n "${WEIGHTING:-}" ] && require_choice WEIGHTING "$WEIGHTING" lowprob ppl dominate none

ARGS=("+preset=$PRESET")
[ -n "${WEIGHTING:-}" ] && ARGS+=("actor_rollout_ref.actor.policy_loss.weighting=$WEIGHTING")
[ -n "${ALPHA:-}" ] && ARGS+=("actor_rollout_ref.actor.policy_loss.alpha=$ALPHA")
[ "${DRY_RUN:-0}" = "1" ] && ARGS+=("dry_run=true")
if [ -n "${WANDB_API_KEY:-}${WANDB_MODE:-}" ]; then ARGS+=("trainer.logger=[console,wandb]"); fi

if [ "$PRESET" = "tiny-cpu" ]; then
  use_cpu_backend
  export TINY_ASSETS_DIR="${TINY_ASSETS_DIR:-$REPO/.assets/tiny}"
  "$PY" -c "from verl_ext.tiny_assets import ensure_tiny_assets; ensure_tiny_assets('$TINY_ASSETS_DIR')"
fi

if [ -n "${RAY_ADDRESS:-}" ]; then
  # Join an existing cluster (scripts/ray_cluster.sh): Ray refuses resource counts when connecting,
  # and the workers get the non-secret environment the job needs. The driver authenticates as the
  # nodes do (Ray itself turns token auth on only for RAY_ADDRESS=auto).
  export_ray_auth_mode run_dapo_reweight
  ARGS+=("++ray_kwargs.ray_init.num_cpus=null" "++ray_kwargs.ray_init.num_gpus=null")
  for name in VERL_PLATFORM VERL_ENGINE_DEVICE TOKENIZERS_PARALLELISM TINY_ASSETS_DIR TINY_RUN_DIR \
              WANDB_MODE WANDB_PROJECT WANDB_ENTITY WANDB_RUN_GROUP WANDB_DIR; do
    # quoted: Ray wants strings, and Hydra would turn false / 1 / null into bool / int / None
    value="${!name:-}"; value="${value//\'/\\\'}"
    [ -n "$value" ] && ARGS+=("++ray_kwargs.ray_init.runtime_env.env_vars.$name='$value'")
  done
fi

# what a Ctrl-C tells the user to run again (the run's folder then decides: resume, or nothing to train)
knobs=""
for name in PRESET WEIGHTING ALPHA; do [ -n "${!name:-}" ] && knobs+="$name=$(printf '%q' "${!name}") "; done
RUN_COMMAND="${knobs}bash scripts/run_dapo_reweight.sh"
[ $# -gt 0 ] && RUN_COMMAND+="$(printf ' %q' "$@")"
export RUN_COMMAND
echo "[run_dapo_reweight] preset=$PRESET weighting=${WEIGHTING:-<config default>} alpha=${ALPHA:-<default>}"
# the log (one file per launch, in the run's folder) is written by the entry point itself: verl_ext/run_log.py
exec "$PY" -m recipe.dapo_reweight.main "${ARGS[@]}" "$@"
