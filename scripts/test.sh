#!/usr/bin/env bash
# The whole test suite, on a fresh machine: sets up .venv with the test extras, then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -m slow, scripts/test.sh tests/test_config.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
export OMP_WAIT_POLICY=passive OPENBLAS_NUM_THREADS=1
exec .venv/bin/python -m pytest "$@"
