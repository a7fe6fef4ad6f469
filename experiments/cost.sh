#!/usr/bin/env bash
# The cost of one RL step, measured alone on this machine (nothing else running): GRPO, BuPO's phase 1 (pi^l,
# the forward stopped after block l) and BuPO's phase 2, in one process, then the same work with torchrun on
# 2 ranks. The same budget as experiments/run.sh's training runs; 3 steps each, the first step of a phase is
# reported with the others (no warm-up to hide). Writes runs/cost/<date-time>/*/metrics.jsonl (an earlier
# measurement is kept); report.py --cost reads them.
#   bash experiments/cost.sh              # CPU, all the threads torch takes by default
#   DEVICE=cuda bash experiments/cost.sh  # one GPU (bf16 autocast); the torchrun part needs 2 GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh > /dev/null
PY=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${DEVICE:-cpu}
NPROC=${NPROC:-2}
TRAIN="--task add --shots 1 --steps 3 --prompts-per-step 8 --group-size 8 --max-new-tokens 32 --lr 2e-5"
TRAIN="$TRAIN --eval-every 0 --save-every 1000 --keep-checkpoints 1 --device $DEVICE"
OUT=runs/cost/$(date +%Y%m%d-%H%M%S)
"$PY" train.py $TRAIN --algo grpo --out $OUT/grpo
"$PY" train.py $TRAIN --algo bupo --internal-layer 29 --internal-steps 2 --out $OUT/bupo
# data parallel: the same 8 prompts per step over NPROC ranks (torchrun gives each rank one thread on a CPU)
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" train.py $TRAIN --algo grpo --out $OUT/grpo-torchrun$NPROC
"$PY" experiments/report.py --cost $OUT
