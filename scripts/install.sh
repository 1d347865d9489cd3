#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything into it.
#   VENV=.venv (default)   where the environment lives
#   EXTRAS=dev             pip extras of this project (dev, gpu)
# On a machine without a GPU, CPU torch==2.13.0 is installed first: an unpinned torch
# would pull several GB of CUDA wheels.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
EXTRAS="${EXTRAS:-dev}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU found: installing torch as verl's gpu extra pins it"
  else
    echo "[install] no GPU: installing CPU torch==2.13.0"
    "${PIP[@]}" install -q torch==2.13.0
  fi
fi
echo "[install] installing this project with extras [$EXTRAS] (verl==0.9.1 and its needs)"
"${PIP[@]}" install -q -e "$REPO[$EXTRAS]"
"$VENV/bin/python" - <<'PY'
import verl  # loads our verl.plugins entry point, silently on failure...
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
if "dapo_reweight" not in POLICY_LOSS_REGISTRY:
    import verl_ext.verl_plugin  # ...so import it here to show why it failed
    raise SystemExit("verl did not load the verl_ext plugin (entry point group verl.plugins)")
print("[install] ok: verl", verl.__version__, "with the dapo_reweight plugin")
PY
