# Shared helpers for the scripts (sourced, not run). Expects $REPO.

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# The Python that has this project: $PYTHON, the repo's .venv, or the one on PATH. On a fresh
# machine with none of them, install into .venv first (scripts/install.sh).
project_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local probe="import verl_ext, importlib.util as u; assert u.find_spec('verl')"
  if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "$probe" 2>/dev/null; then
    echo "$REPO/.venv/bin/python"; return
  fi
  if command -v python >/dev/null 2>&1 && python -c "$probe" 2>/dev/null; then
    command -v python; return
  fi
  echo "[setup] verl_ext is not installed: running scripts/install.sh (one time, a few minutes)" >&2
  bash "$REPO/scripts/install.sh" >&2
  echo "$REPO/.venv/bin/python"
}

# The folder of every command's configs, by the commands' own rule (verl_ext.core.paths.config_dir: the
# checkout's configs/, or the installed copy's). Needs $PY.
config_dir() { "${PY:?}" -m verl_ext.core.paths; }

require_preset() {
  local presets
  presets="$(config_dir)/preset"
  if [ ! -f "$presets/$1.yaml" ]; then
    echo "[$(basename "$0" .sh)] error: PRESET=$1 does not exist; valid presets: $(cd "$presets" && ls *.yaml | sed 's/\.yaml$//' | paste -sd, - | sed 's/,/, /g')" >&2
    exit 2
  fi
}

# require_choice NAME VALUE CHOICE...
require_choice() {
  local name="$1" value="$2"; shift 2
  for c in "$@"; do [ "$value" = "$c" ] && return 0; done
  local IFS=,
  echo "[$(basename "$0" .sh)] error: $name='$value' is invalid; valid: $(echo "$*" | sed 's/,/, /g')" >&2
  exit 2
}

# Environment for verl on a machine without a GPU (verl_ext.cpu registers the platform and rollout).
use_cpu_backend() {
  export VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda
  export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
}

# One Ray token-authentication setting for every node and job (scripts/ray_cluster.sh): RAY_AUTH_MODE
# if set, else token when a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token),
# else disabled; exported, so Ray reads it. $1 names the caller in the message.
export_ray_auth_mode() {
  if [ -z "${RAY_AUTH_MODE:-}" ]; then
    if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
      export RAY_AUTH_MODE=token
    else
      export RAY_AUTH_MODE=disabled
    fi
  fi
  echo "[$1] RAY_AUTH_MODE=$RAY_AUTH_MODE${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}" >&2
}

# RUN_ARGS=(the arguments, with a user's trainer.default_local_dir=DIR turned into DIR/<run name>):
# a comparison script's runs each get their own folder (and so never resume one another) even when
# the user points them all at one place. The run name is trainer.experiment_name (hydra interpolation).
per_run_dir_args() {
  RUN_ARGS=()
  local arg
  for arg in "$@"; do
    case "$arg" in
      trainer.default_local_dir=*|++trainer.default_local_dir=*|+trainer.default_local_dir=*)
        RUN_ARGS+=("${arg%/}/\${trainer.experiment_name}") ;;
      *) RUN_ARGS+=("$arg") ;;
    esac
  done
}
