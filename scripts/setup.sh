#!/usr/bin/env bash
# Create/update the project's virtual environment (.venv) and install ernie-edge into it.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   + everything the test suite needs (torch CPU, transformers, pytest, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.ernie-edge-installed${1:-}"
# Reinstall only when pyproject.toml changed since the last successful install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    if [ "${1:-}" = "--test" ]; then
        # torch is pinned exactly: an unpinned torch can pull a multi-GB CUDA build.
        .venv/bin/python -m pip install --quiet -e ".[test]"
    else
        .venv/bin/python -m pip install --quiet -e .
    fi
    touch "$stamp"
fi
