#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then chat with the built-in demo model
# (models/demo: a tiny ERNIE trained in this repository, converted on first run; fully offline).
# Extra arguments go to `ernie-edge demo` (e.g. --prompt "hello" for a one-shot answer).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ernie-edge demo "$@"
