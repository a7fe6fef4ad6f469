"""torchrun data parallelism: 2 ranks (gloo, CPU) must do exactly what one process does with the
same arguments."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "length_reward_train.py"


def train(model_dir, out, nproc, *extra):
    args = ["--model", str(model_dir), "--out", str(out), "--algo", "bupo", "--internal-layer", "2",
            "--internal-steps", "1", "--steps", "3", "--prompts-per-step", "4", "--group-size", "4",
            "--mini-batches", "2", "--micro-batch-size", "2", "--max-new-tokens", "6", "--lr",
            "1e-3",
            "--eval-every", "3", "--eval-problems", "3", "--eval-samples", "2", "--save-every",
            "3", *extra]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}"]
              if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([*launch, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], done


def test_two_ranks_equal_one_process(tiny_chat_model, tmp_path):
    one, _ = train(tiny_chat_model, tmp_path / "one", 1)
    two, done = train(tiny_chat_model, tmp_path / "two", 2)
    assert ([r["step"] for r in two] == [0, 1, 2, 3]
            and [r["phase"] for r in two[1:]] == ["internal", "full", "full"])
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for k in a:
            if k in ("step_time", "tokens_per_s", "peak_memory_mb", "eval_time"):
                continue
            if isinstance(a[k], float):
                # the same samples, rewards and counts; sums in another order
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
            else:
                assert a[k] == b[k], k
    assert any(r.get("grad_norm", 0) > 0 for r in one) and 0 < one[1]["reward"] < 1
    w1 = load_file(tmp_path / "one" / "checkpoints" / "step_000003" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "checkpoints" / "step_000003" / "model.safetensors")
    w0 = load_file(Path(tiny_chat_model) / "model.safetensors")
    moved = 0
    for name, w in w1.items():
        torch.testing.assert_close(w2[name], w, atol=2e-5, rtol=1e-4, msg=name)
        moved += not torch.equal(w, w0[name])
    assert moved > 0                                   # the run trained something
    assert not (tmp_path / "two" / "checkpoints" / "step_000003.tmp").exists()


def test_rank_shares_must_be_whole_groups(tiny_chat_model, tmp_path):
    with pytest.raises(AssertionError, match="must be a multiple of --mini-batches x ranks"):
        train(tiny_chat_model, tmp_path / "bad", 2, "--prompts-per-step", "2")
