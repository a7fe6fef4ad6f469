#!/usr/bin/env bash
# The main job on the default model: set up, then a greedy chat answer (arguments go to chat.py).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=${PYTHON:-$(command -v python || command -v python3)}
"$PY" chat.py "$@"
