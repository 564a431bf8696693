#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: create .venv if needed, install, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k metrics`). The tests run in TEST_WORKERS pytest-xdist
# processes (default 2; TEST_WORKERS=0 runs them in this process, e.g. to use a debugger).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
export TF_CPP_MIN_LOG_LEVEL=2
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 -n "${TEST_WORKERS:-2}" "$@"
