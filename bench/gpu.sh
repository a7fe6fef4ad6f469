#!/usr/bin/env bash
# Everything that needs a GPU, in one command, each result saved under OUT (default runs/gpu/<date-time>/):
#   1. correctness in bf16 on CUDA: ours vs transformers on the default model and a tiny Qwen3 (bench/gpu_check.py),
#      and a few bf16 training steps that must see every update (bench/bf16_train_check.py)
#   2. speed, bf16: rollout tokens/s (batch 1 and 8 x 8 = 64 rows) and training tokens/s + MFU, ours vs
#      transformers, SmolLM2-135M and Qwen2.5-Coder-0.5B (bench/bench_rollout.py, bench/bench_train.py; PEAK_TFLOPS
#      is the GPU's dense bf16 peak), and one train.py step in bf16 on Qwen2.5-Coder-0.5B
#   3. the quick start on the GPU (timed), and one GRPO vs BuPO pair on Qwen2.5-Coder-0.5B (task sum3)
# Needs the test dependencies (transformers) and PyPI once, to build the two offline models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-runs/gpu/$(date +%Y%m%d-%H%M%S)}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # H100 SXM dense bf16; 312 for an A100
mkdir -p "$OUT"
bash setup.sh --test
"$PY" -m infra.weights --model qwen2.5-coder-0.5b-instruct > /dev/null
QWEN=models/qwen2.5-coder-0.5b-instruct
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PY" bench/gpu_check.py --device cuda --dtype bfloat16 2>&1 | tee "$OUT/1-correctness.txt"
# a bf16 run must train: every autocast matmul uses the current weights, the outputs move after every update
"$PY" bench/bf16_train_check.py --device cuda --steps 3 2>&1 | grep -v "it/s" | tee "$OUT/1-bf16-train.txt"
for M in models/smollm2-135m-instruct "$QWEN"; do
  "$PY" bench/bench_rollout.py --model "$M" --device cuda --dtype bfloat16 --stop --compile --repeat 3 2>&1 | tee -a "$OUT/2-rollout.txt"
  "$PY" bench/bench_train.py --model "$M" --device cuda --dtype bfloat16 --rows 32 --new-tokens 512 \
    --peak-tflops "$PEAK_TFLOPS" 2>&1 | tee -a "$OUT/2-train.txt"
done
# one training step in bf16 on one GPU (no FSDP): its step_time and tokens_per_s are in metrics.jsonl
"$PY" train.py --model "$QWEN" --device cuda --algo grpo --task sum3 --out "$OUT/one-step" --steps 1 \
  --prompts-per-step 32 --group-size 8 --max-new-tokens 256 --eval-every 0 --save-every 1 2>&1 | tail -2
tee "$OUT/2-one-step.txt" < "$OUT/one-step/metrics.jsonl"
{ time bash run.sh --device cuda ; } 2>&1 | tail -5 | tee "$OUT/3-quickstart.txt"
for ALGO in grpo bupo; do
  "$PY" train.py --model "$QWEN" --device cuda --algo "$ALGO" --task sum3 --out "$OUT/qwen-$ALGO" --steps 40 \
    --internal-steps 4 --prompts-per-step 32 --group-size 8 --max-new-tokens 64 --lr 2e-6 --eval-every 10 \
    --eval-problems 256 --eval-samples 4 --save-every 40
done
echo "results in $OUT"
