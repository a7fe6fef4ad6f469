#!/usr/bin/env bash
# The experiments of README's "Experiments" section, on the default model (SmolLM2-135M-Instruct) and the
# Qwen2-architecture one, sized for a 2-core CPU. Each line of RUNS is one run; they go JOBS at a time, one thread
# each, into runs/exp/NAME. Then `python experiments/report.py` writes the tables and plots of experiments/results/.
#   bash experiments/run.sh                 # everything (about 1.5 h on 2 cores)
#   SEEDS="3 4" bash experiments/run.sh grpo-s3 bupo-s3 grpo-s4 bupo-s4   # more seeds
#   bash experiments/run.sh grpo-s1 bupo-s1 # only the named runs
#   JOBS=1 DEVICE=cuda bash experiments/run.sh   # one at a time, on a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh > /dev/null
PY=${PYTHON:-$(command -v python || command -v python3)}
JOBS=${JOBS:-2}
DEVICE=${DEVICE:-cpu}
QWEN=models/qwen2.5-coder-0.5b-instruct
# the shared budget of every training run: task add with one worked example (--shots 1), 10 steps x 8 prompts x
# 8 responses of at most 32 tokens, 4 updates per step, lr 2e-5; held-out evaluation before and after
TRAIN="train.py --task add --shots 1 --steps 10 --prompts-per-step 8 --group-size 8 --max-new-tokens 32 --lr 2e-5"
TRAIN="$TRAIN --eval-every 10 --eval-problems 32 --eval-samples 4 --save-every 10 --keep-checkpoints 1 --device $DEVICE"
AUTO="--internal-layer auto --analysis runs/exp/flow-smollm2/entropy.json"
RUNS=(
  "flow-smollm2 analyze.py --out runs/exp/flow-smollm2 --task add --shots 1 -n 32 --max-new-tokens 32 --device $DEVICE"
  "flow-qwen2.5 analyze.py --model $QWEN --out runs/exp/flow-qwen2.5 --task add --shots 1 -n 16 --max-new-tokens 32 --device $DEVICE"
)
for seed in ${SEEDS:-0 1 2}; do   # GRPO against BuPO at the auto layer, s_inter = 1 (the authors' 10% of the steps)
  RUNS+=("grpo-s$seed $TRAIN --algo grpo --seed $seed --out runs/exp/grpo-s$seed"
         "bupo-s$seed $TRAIN --algo bupo $AUTO --internal-steps 1 --seed $seed --out runs/exp/bupo-s$seed")
done
RUNS+=("bupo-l15-s0 $TRAIN --algo bupo --internal-layer 15 --internal-steps 1 --seed 0 --out runs/exp/bupo-l15-s0"
       "bupo-inter3-s0 $TRAIN --algo bupo $AUTO --internal-steps 3 --seed 0 --out runs/exp/bupo-inter3-s0"
       "bupo-inter10-s0 $TRAIN --algo bupo $AUTO --internal-steps 10 --seed 0 --out runs/exp/bupo-inter10-s0")

selected=("$@")
run_one() {  # NAME ARGS...: one run, its log in runs/exp/NAME.log; an existing finished run is kept
  local name=$1; shift
  mkdir -p runs/exp
  if [ -f "runs/exp/$name/.done" ]; then echo "$name: done already"; return; fi
  local again=()
  if [ -d "runs/exp/$name" ]; then again=(--overwrite); fi   # an unfinished earlier attempt is moved aside, not lost
  echo "$name: started $(date +%T)"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" "$@" "${again[@]}" > "runs/exp/$name.log" 2>&1 || { echo "$name: FAILED, see runs/exp/$name.log"; return 1; }
  touch "runs/exp/$name/.done"; echo "$name: finished $(date +%T)"
}
export -f run_one; export PY
"$PY" weights.py --model qwen2.5-coder-0.5b-instruct > /dev/null
pick() {  # the lines of RUNS that were asked for (all by default) and match grep's arguments
  for r in "${RUNS[@]}"; do
    name=${r%% *}
    if [ ${#selected[@]} -eq 0 ] || [[ " ${selected[*]} " == *" $name "* ]]; then printf '%s\n' "$r"; fi
  done | { grep "$@" || true; }
}
# JOBS at a time: first the runs that need nothing, then those that read flow-smollm2's entropy.json
NEEDS=runs/exp/flow-smollm2/entropy.json
pick -v "$NEEDS" | xargs -r -P "$JOBS" -L 1 bash -c 'run_one "$0" "$@"'
pick "$NEEDS" | xargs -r -P "$JOBS" -L 1 bash -c 'run_one "$0" "$@"'
"$PY" experiments/report.py
