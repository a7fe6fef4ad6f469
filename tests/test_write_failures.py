"""Writes that fail for real (a file-size limit, so the serializers raise their own error types, not
an OSError), and a reader of stdout that has quit: one line, or a quiet exit, never a traceback."""
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--prompts-per-step", "2", "--group-size", "4", "--mini-batches", "2",
            "--micro-batch-size", "2", "--max-new-tokens", "6", "--eval-every", "0", "--lr", "1e-3",
            "--internal-layer", "2", "--internal-steps", "1", "--steps", "1", "--save-every", "1"]


def run_limited(argv, limit_bytes):
    """A tool in its own process whose files may not grow past limit_bytes (RLIMIT_FSIZE: the
    write fails with EFBIG, as on a full disk; Python ignores SIGXFSZ, so the error surfaces)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("case", ["model.safetensors", "trainer_state.pt", "args.json"])
def test_a_write_that_hits_a_limit_is_one_line(tiny_chat_model, tmp_path, case):
    """safetensors raises SafetensorError and torch.save a RuntimeError when the disk (here a size
    limit) refuses the write; both, and a plain OSError, end as one line naming what was being
    written, with no temporary folder left behind."""
    weights = (Path(tiny_chat_model) / "model.safetensors").stat().st_size
    limit = {"model.safetensors": weights // 2,          # the weights do not fit
             "trainer_state.pt": weights * 3 // 2,       # they do, the two AdamW moments do not
             "args.json": 100}[case]                    # the run's first file does not
    out = tmp_path / "run"
    r = run_limited(["train.py", "--model", str(tiny_chat_model), "--out", str(out), *TINY_RUN],
                    limit)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    why = "file-size limit" in err[-1] or "stopped short" in err[-1]
    assert err[-1].startswith("error: ") and why, err[-1]
    if case == "args.json":
        assert f"writing {out / 'args.json'} failed" in err[-1], err[-1]
        return
    assert f"writing checkpoint {out / 'checkpoints' / 'step_000001'} failed" in err[-1], err[-1]
    assert "GiB free" in err[-1] and "no checkpoint was written yet" in err[-1], err[-1]
    # nothing half-written: no temporary folder, and the step logged before the save is whole
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []
    assert (out / "metrics.jsonl").read_text().count("\n") == 1


def test_a_reader_that_quits_ends_the_tool_quietly(tiny_chat_model):
    """`python chat.py ... | head -0`: the reader is gone before the answer is printed; no message,
    and the status a Unix tool ended by SIGPIPE has (141), not success."""
    p = subprocess.Popen([sys.executable, "chat.py", "--model", str(tiny_chat_model),
                          "--max-new-tokens", "4"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait() == 141 and err == "", err
