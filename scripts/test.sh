#!/usr/bin/env bash
# The test command: installs everything into .venv (if needed) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k weighting` (`-n 0`: one process).
# Test modules run in parallel processes (pytest-xdist, one module per process at a time, so a
# module's fixtures are built once): the real verl trainings wait on process start-up and imports
# much of the time, so two of them share two cores well.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/install.sh"
cd "$REPO"
set +e
"${VENV:-$REPO/.venv}/bin/python" -m pytest -n auto --maxprocesses 4 --dist loadscope "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing (exit 5 is not a pass)" >&2
  exit 1
fi
exit "$rc"
