#!/usr/bin/env bash
# The main job on the default model, on a CPU in minutes: set up, analyse the entropy flow of the model's
# internal policies, then a short BuPO training at the layer that analysis picks. Each run writes into a folder
# of its own, runs/quickstart/<date-time>/, so running it again never touches an earlier run.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=runs/quickstart/$(date +%Y%m%d-%H%M%S)
"$PY" analyze.py --out "$OUT/analysis" --task add --shots 1 -n 8 --max-new-tokens 48
"$PY" train.py --algo bupo --analysis "$OUT/analysis/entropy.json" --out "$OUT/bupo" --task add --shots 1 \
  --steps 6 --internal-steps 2 --prompts-per-step 4 --group-size 8 --max-new-tokens 40 --lr 2e-5 \
  --eval-every 3 --eval-problems 16 --eval-samples 4 --save-every 6 "$@"
echo "analysis: $OUT/analysis/entropy.json flow.png dH.png heatmap.png"
echo "training: $OUT/bupo/metrics.jsonl curves.png checkpoints/"
