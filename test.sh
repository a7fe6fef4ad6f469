#!/usr/bin/env bash
# The test suite: set up (with the test-only dependencies), lint (ruff.toml: lines within 100
# characters, pyflakes), then pytest (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --test
PY=${PYTHON:-$(command -v python || command -v python3)}
"$PY" -m ruff check --quiet .
"$PY" -m pytest -q tests "$@"
