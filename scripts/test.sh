#!/usr/bin/env bash
# The test command: installs everything into .venv (if needed) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k weighting`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/install.sh"
cd "$REPO"
set +e
"${VENV:-$REPO/.venv}/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing (exit 5 is not a pass)" >&2
  exit 1
fi
exit "$rc"
