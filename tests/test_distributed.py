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


PEER_DIES = """
import os, sys
sys.path.insert(0, {root!r})
import tasks, train
from infra import cli
tasks.reward = lambda text, answer: float(len(text) % 2)
real = train.rl_step
def rl_step(model, tok, src, opt, args, step, *a, **k):
    if step == 2 and os.environ["RANK"] == "1":
        os._exit(9)            # killed mid-run (the OOM killer, a node failure)
    return real(model, tok, src, opt, args, step, *a, **k)
train.rl_step = rl_step
cli.run(train.main, sys.argv[1:])
"""


def test_a_rank_that_loses_its_peer_says_so_in_one_line(tiny_chat_model, tmp_path):
    """Rank 1 dies at step 2: rank 0's collective fails, and it ends with one error line (which
    rank, that a peer stopped, how to go on), a non-zero status and no traceback, within
    seconds; step 1's checkpoint stays whole."""
    import socket
    import time
    script = tmp_path / "peer.py"
    script.write_text(PEER_DIES.format(root=str(ROOT)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = ["--model", str(tiny_chat_model), "--out", str(out), "--algo", "grpo", "--steps", "3",
            "--prompts-per-step", "4", "--group-size", "4", "--mini-batches", "2",
            "--max-new-tokens", "6", "--eval-every", "0", "--save-every", "1"]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    procs[1].wait(timeout=600)
    died = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    assert procs[1].returncode == 9 and procs[0].returncode not in (0, None)
    assert time.monotonic() - died < 30
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and "rank 0: another rank of this torchrun job stopped" in lines[0] \
        and "--resume" in lines[0], err[-2000:]
    assert (out / "checkpoints" / "step_000001" / "model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".*tmp"))
