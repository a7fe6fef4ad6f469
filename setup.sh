#!/usr/bin/env bash
# Install the dependencies into the current Python environment and build the default model (idempotent).
#   bash setup.sh          # run-time dependencies + models/smollm2-135m-instruct
#   bash setup.sh --test   # also the test-only dependencies
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python || command -v python3)}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # No torch yet: install the pinned build (CPU here). A CUDA build of torch installed beforehand is kept.
  "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  "$PY" -m pip install --quiet -r requirements-test.txt
fi
"$PY" -m infra.weights > /dev/null
