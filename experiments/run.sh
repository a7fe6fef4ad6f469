#!/usr/bin/env bash
# The experiments of README's "Experiments" section, on the default model (SmolLM2-135M-Instruct), sized for a
# 2-core CPU. Each line of RUNS is one run; they go JOBS at a time, one thread each, into runs/exp/NAME, and
# `python experiments/report.py` then writes the tables and plots of experiments/results/.
#
# The task is sum2 (sums of two 2-digit numbers, one worked example): the default model starts at 35% held-out
# greedy accuracy (experiments/results/calibration.md), so there is room to learn. Every training run has the same
# budget: 40 RL steps of 8 prompts x 8 responses (at most 48 tokens), 4 updates per step, lr 2e-5, held-out
# evaluation (256 test problems, greedy and 2 samples each) at steps 0, 20 and 40. Seed K fixes the training
# prompts, the sampler and the held-out draw, so the runs of one seed are paired across configurations.
#
#   bash experiments/run.sh                       # everything but inter and qwen, in the order below (many hours)
#   bash experiments/run.sh main                  # one group: flow, main, layers, rule, inter, dose, dose20, dose-changes or qwen
#   bash experiments/run.sh grpo-s0 bupo-s0       # only the named runs
#   BEST_LAYER=15 bash experiments/run.sh inter   # the s_inter sweep at the layer the layer sweep found best
#   JOBS=1 DEVICE=cuda bash experiments/run.sh    # one at a time, on a GPU
#
# It can be stopped at any time (Ctrl-C, a closed session) and started again with the same command: a finished run
# is kept, an unfinished one resumes from its newest checkpoint (saved every 5 steps; runs resume exactly), and one
# that never saved is moved aside (never deleted) and started over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh > /dev/null
PY=${PYTHON:-$(command -v python || command -v python3)}
JOBS=${JOBS:-2}
DEVICE=${DEVICE:-cpu}
BEST_LAYER=${BEST_LAYER:-}
TRAIN="train.py --task sum2 --shots 1 --steps 40 --prompts-per-step 8 --group-size 8 --max-new-tokens 48 --lr 2e-5"
TRAIN="$TRAIN --eval-every 20 --eval-problems 256 --eval-samples 2 --save-every 5 --keep-checkpoints 1 --device $DEVICE"
RUNS=("flow flow analyze.py --out runs/exp/flow --task sum2 --shots 1 -n 64 --max-new-tokens 48 --device $DEVICE")
# main: GRPO against BuPO at the penultimate layer (the authors' OctoThinker layer; where no layer has dH_FFN > 0,
# the project's fallback, docs/method.md 5) with
# s_inter = 4, the authors' 10% of the steps (30 of 300). Seeds 0-4 first; 5-19 for experiments/PLAN.md:
#   MAIN_SEEDS="$(seq -s ' ' 5 19)" bash experiments/run.sh main
for seed in ${MAIN_SEEDS:-0 1 2 3 4}; do
  RUNS+=("main grpo-s$seed $TRAIN --algo grpo --seed $seed --out runs/exp/grpo-s$seed"
         "main bupo-s$seed $TRAIN --algo bupo --internal-layer 29 --internal-steps 4 --seed $seed --out runs/exp/bupo-s$seed")
done
# layers: l = L/4, L/2, 3L/4, and 24, the layer the project's closest-layer rule picks on this model (the layer
# policy closest to the model's; tested here, not used by auto: docs/method.md 5); l = L-1 = 29 is the main BuPO arm.
# s_inter = 4
for seed in ${LAYER_SEEDS:-0 1 2}; do for l in 8 15 23 24; do
  RUNS+=("layers bupo-l$l-s$seed $TRAIN --algo bupo --internal-layer $l --internal-steps 4 --seed $seed --out runs/exp/bupo-l$l-s$seed")
done; done
# rule: seeds 3 and 4 of l = 24, so that the closest-layer rule and the penultimate layer are paired on all five seeds
for seed in 3 4; do
  RUNS+=("rule bupo-l24-s$seed $TRAIN --algo bupo --internal-layer 24 --internal-steps 4 --seed $seed --out runs/exp/bupo-l24-s$seed")
done
# inter: s_inter = 8 and 16 (20% and 40% of the steps) at BEST_LAYER, the layer the sweep above found best (set it
# after reading the layer table of report.py); 0 is GRPO and 4 the layer sweep. Without BEST_LAYER they are left out.
# Seeds 3-5 of s_inter = 16 against 4 at l = 8, the follow-up of experiments/PLAN.md (its last section), in one
# call (the report at the end writes into experiments/results/; a run started after it records `clean: false`):
#   LAYER_SEEDS="3 4 5" INTER_SEEDS="3 4 5" BEST_LAYER=8 bash experiments/run.sh \
#     bupo-l8-s3 bupo-l8-s4 bupo-l8-s5 bupo-l8-inter16-s3 bupo-l8-inter16-s4 bupo-l8-inter16-s5
if [ -n "$BEST_LAYER" ]; then for seed in ${INTER_SEEDS:-0 1 2}; do for s in 8 16; do
  RUNS+=("inter bupo-l$BEST_LAYER-inter$s-s$seed $TRAIN --algo bupo --internal-layer $BEST_LAYER --internal-steps $s --seed $seed --out runs/exp/bupo-l$BEST_LAYER-inter$s-s$seed")
done; done; else echo "inter: left out; set BEST_LAYER (the best layer of the sweep) to run the s_inter sweep"; fi

# dose: phase 1's length at l = 29, s_inter = 4 (the main arm) against 10, seeds 20-25, and 20 on seeds 20-22
# (experiments/PLAN.md, "phase 1's dose"); the checkpoint at the end of phase 1 is kept for the per-layer analysis
for seed in ${DOSE_SEEDS:-20 21 22 23 24 25}; do for s in 4 10; do
  RUNS+=("dose bupo-dose$s-s$seed $TRAIN --algo bupo --internal-layer 29 --internal-steps $s --save-phase1-end --seed $seed --out runs/exp/bupo-dose$s-s$seed")
done; done
for seed in ${DOSE20_SEEDS:-20 21 22}; do
  RUNS+=("dose20 bupo-dose20-s$seed $TRAIN --algo bupo --internal-layer 29 --internal-steps 20 --save-phase1-end --seed $seed --out runs/exp/bupo-dose20-s$seed")
done

# qwen: experiments/PLAN.md (a), phase 1 in the paper's regime, on Qwen2.5-Coder-0.5B-Instruct (built once by
# `python -m infra.weights --model qwen2.5-coder-0.5b-instruct`). One run at a time (JOBS=1; 15 GiB at the update),
# seeds 30 and 31, 8 RL steps of 8 x 8, at most 64 new tokens, lr 1e-6, every BuPO step in phase 1, evaluation at
# steps 0 and 8 on 128 problems. The task: no level calibrate.py measured lies in the plan's 15-40% greedy accuracy
# (experiments/results/calibration-qwen2.5-coder.md: 0.72-0.83), so the plan's fallback, the nearest one: word
# (0.72). After each run, analyze.py --against its last checkpoint, on 16 of the base model's own answers (64 take
# over an hour each on one core, most of it the base model's entropy flow).
QWEN_TASK=${QWEN_TASK:-word}
QWEN_MODEL=models/qwen2.5-coder-0.5b-instruct
QWEN="train.py --model $QWEN_MODEL --task $QWEN_TASK --shots 1 --steps 8 --prompts-per-step 8 --group-size 8"
QWEN="$QWEN --max-new-tokens 64 --lr 1e-6 --eval-every 8 --eval-problems 128 --eval-samples 2 --save-every 2"
QWEN="$QWEN --keep-checkpoints 1 --save-phase1-end --device $DEVICE"
QWEN_AUTO="--internal-layer auto --analysis experiments/results/runs/analysis-qwen2.5-coder/entropy.json"
for seed in ${QWEN_SEEDS:-30 31}; do
  for arm in "grpo --algo grpo" "auto --algo bupo --internal-steps 8 $QWEN_AUTO" \
             "l12 --algo bupo --internal-steps 8 --internal-layer 12"; do
    read -r name flags <<< "$arm"
    RUNS+=("qwen qwen-$name-s$seed $QWEN $flags --seed $seed --out runs/exp/qwen-$name-s$seed"
           "qwen changes-qwen-$name-s$seed-step8 analyze.py --model $QWEN_MODEL --task $QWEN_TASK --shots 1 -n 16 --max-new-tokens 64 --seed $seed --device $DEVICE --against runs/exp/qwen-$name-s$seed/checkpoints/step_000008 --out runs/exp/changes-qwen-$name-s$seed-step8")
  done
done

# dose-changes: what each dose run changed, layer by layer (analyze.py --against, on 16 of the base model's own
# answers to sum2: ~3 min each on one core; 64 take ~15), at the end of its phase 1 (step s_inter) and at step 40;
# for finished dose runs only
for seed in $(printf '%s\n' ${DOSE_SEEDS:-20 21 22 23 24 25} ${DOSE20_SEEDS:-20 21 22} | sort -un); do for s in 4 10 20; do
  for step in $s 40; do
    run=bupo-dose$s-s$seed; ckpt=runs/exp/$run/checkpoints/step_$(printf %06d "$step")
    if [ -f "runs/exp/$run/.done" ] && [ -d "$ckpt" ]; then
      RUNS+=("dose-changes changes-$run-step$step analyze.py --task sum2 --shots 1 -n 16 --max-new-tokens 48 --seed $seed --device $DEVICE --against $ckpt --out runs/exp/changes-$run-step$step")
    fi
  done
done; done

run_one() {  # GROUP NAME TOOL ARGS...: one run, its log appended to runs/exp/NAME.log
  local name=$2 dir=runs/exp/$2; shift 2
  mkdir -p runs/exp
  if [ -f "$dir/.done" ]; then echo "$name: done already"; return; fi
  local cmd=("$@")
  if [ "$1" = train.py ] && compgen -G "$dir/checkpoints/step_*" > /dev/null; then
    cmd=(train.py --resume "$dir")                          # the saved arguments; exact continuation
  elif [ -d "$dir" ]; then
    cmd+=(--overwrite)                                      # nothing to resume: moved aside, not lost
  fi
  echo "$name: started $(date +%T): ${cmd[*]}" | tee -a "runs/exp/$name.log"
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" "${cmd[@]}" >> "runs/exp/$name.log" 2>&1 \
    || { echo "$name: FAILED, see runs/exp/$name.log"; return 1; }
  touch "$dir/.done"; echo "$name: finished $(date +%T)"
}
export -f run_one; export PY
pick() {  # the lines of RUNS asked for on the command line (all but qwen by default), by group or by name
  for r in "${RUNS[@]}"; do
    read -r first second _ <<< "$r"
    if { [ $# -eq 0 ] && [ "$first" != qwen ]; } || [[ " $* " == *" $first "* ]] || [[ " $* " == *" $second "* ]]; then
      printf '%s\n' "$r"
    fi
  done
}
pick "$@" | xargs -r -P "$JOBS" -L 1 bash -c 'run_one "$0" "$@"'
# REPORT=0: leave experiments/results/ alone (a report written into the checkout makes the runs started after it
# record `clean: false`)
if [ "${REPORT:-1}" != 0 ]; then "$PY" experiments/report.py; fi
