"""The memory plan is an upper bound: over a grid of small runs (long prompts, long answers, BuPO's
phase 1 and 2, data parallelism and FSDP2 on 2 gloo ranks, bf16 and fp32, with and without
--grad-checkpoint), the plan of infra/memory.py is at least the peak of live tensor bytes that
bench/memory_check.py counts in every phase, and at most 1.5x of it."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from test_distributed import ROOT

BENCH = ROOT / "bench" / "memory_check.py"
GRID = {
    # name: (model, world, flags)
    "long-prompt-ckpt": ("wide", 1, ["--data", "{data}", "--max-new-tokens", "24",
                                     "--grad-checkpoint"]),
    "long-answer": ("narrow", 1, ["--task", "add", "--max-new-tokens", "96"]),
    "long-answer-fp32": ("narrow", 1, ["--task", "add", "--max-new-tokens", "96", "--dtype",
                                       "float32"]),
    "fsdp-long-prompt-ckpt": ("wide", 2, ["--data", "{data}", "--max-new-tokens", "24",
                                          "--grad-checkpoint", "--parallel", "fsdp"]),
    "fsdp-long-answer": ("narrow", 2, ["--task", "add", "--max-new-tokens", "96",
                                       "--parallel", "fsdp"]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_chat_model):
    """Two random llamas with the default tokenizer: a wider one (the activations count) and
    the narrow tiny one (the logits count), with room for 1k-token prompts."""
    import transformers as tf
    root = tmp_path_factory.mktemp("plan")
    dirs = {}
    shapes = {"wide": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=2),
              "narrow": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2)}
    for name, shape in shapes.items():
        torch.manual_seed(0)
        cfg = tf.LlamaConfig(**shape, vocab_size=49152, max_position_embeddings=2048,
                             tie_word_embeddings=True, eos_token_id=2)
        dirs[name] = root / name
        tf.LlamaForCausalLM(cfg).save_pretrained(dirs[name])
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_chat_model / f, dirs[name] / f)
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    with open(root / "long.jsonl", "w") as f:
        for i in range(8):
            question = " ".join(rng.choice(words) for _ in range(700)) + f" What is {i} + 1?"
            f.write(json.dumps({"question": question, "answer": str(i + 1)}) + "\n")
    return dirs, root / "long.jsonl"


def measure(model_dir, world, flags, out):
    """bench/memory_check.py's reports, one per rank: 2 steps, the first on BuPO's pi^l."""
    args = ["--model", str(model_dir), "--out", str(out / "run"), "--report", str(out / "r.json"),
            "--algo", "bupo", "--internal-layer", "2", "--internal-steps", "1", "--steps", "2",
            "--prompts-per-step", "2", "--group-size", "4", "--mini-batches", "1",
            "--micro-batch-size", "2", "--eval-every", "2", "--eval-problems", "2",
            "--eval-samples", "2", "--dtype", "bfloat16", "--max-prompt-tokens", "2000",
            "--save-every", "100", *flags]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1" if world > 1 else "2"}
    done = subprocess.run([*launch, str(BENCH), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    names = ["r.json"] + [f"r.rank{r}.json" for r in range(1, world)]
    return [json.loads((out / name).read_text()) for name in names]


@pytest.mark.parametrize("name", GRID)
def test_the_plan_bounds_what_a_run_holds(name, models, tmp_path):
    dirs, data = models
    model, world, flags = GRID[name]
    flags = [f.format(data=data) for f in flags]
    for report in measure(dirs[model], world, flags, tmp_path):
        measured, plan = report["measured"], report["plan"]
        # every phase ran, BuPO's phase 1 and 2 both
        assert {"rollout", "old pass, phase 1", "update, phase 1", "update", "evaluation"} \
            <= measured.keys(), measured
        for phase, peak in measured.items():
            assert peak <= plan[phase.split(",")[0]], (name, report["rank"], phase, peak, plan)
        # the plan is one figure per phase, whichever policy BuPO optimises: within 1.5x of the
        # larger of the two
        for phase, planned in plan.items():
            peak = max(v for k, v in measured.items() if k.split(",")[0] == phase)
            assert planned <= 1.5 * peak, (name, report["rank"], phase, peak, planned)
