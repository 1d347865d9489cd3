#!/usr/bin/env bash
# The paper's comparison: DAPO (none) vs lowprob vs ppl vs dominate, everything else equal,
# one run after another with the same preset and seed, one wandb group.
#
#   bash scripts/run_baselines.sh                          # all four on the default preset
#   SCHEMES="none lowprob" PRESET=qwen3-8b-base bash scripts/run_baselines.sh trainer.nnodes=4
#   DRY_RUN=1 bash scripts/run_baselines.sh                # compose and validate the four configs
#
# Paper settings per scheme: lowprob alpha from the preset (0.2 / 0.1), ppl alpha 0.01,
# dominate alpha 0.1 with clip_ratio_high 0.24 (lower than DAPO's 0.28, as the paper ran it).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/_common.sh"
SCHEMES="${SCHEMES:-none lowprob ppl dominate}"
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-baselines-${PRESET:-default}-$(date +%Y%m%d-%H%M%S)}"

for scheme in $SCHEMES; do
  require_choice SCHEMES "$scheme" none lowprob ppl dominate
done
per_run_dir_args "$@"  # each scheme its own folder, also under a trainer.default_local_dir you pass
for scheme in $SCHEMES; do
  extra=()
  case "$scheme" in
    ppl) extra+=(actor_rollout_ref.actor.policy_loss.alpha=0.01) ;;
    dominate) extra+=(actor_rollout_ref.actor.policy_loss.alpha=0.1 actor_rollout_ref.actor.clip_ratio_high=0.24) ;;
  esac
  echo "=== baseline: $scheme ${extra[*]:-} ==="
  WEIGHTING="$scheme" ALPHA="" bash "$REPO/scripts/run_dapo_reweight.sh" "${extra[@]}" "${RUN_ARGS[@]}"
done
