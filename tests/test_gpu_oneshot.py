"""bench/gpu_oneshot.py rehearsed on the CPU with tiny shapes, end to end, so that its first run
on a borrowed GPU (15 minutes of machine time in all) is not spent on a typo."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_one_shot_gpu_check_runs_on_the_cpu(default_model_dir, tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_oneshot.py", "--device", "cpu", "--small",
                           "--out", str(tmp_path), "--tokenizer", str(default_model_dir),
                           "--scale", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert done.returncode == 0 and summary["ok"], json.dumps(summary)[-3000:]
    assert list(summary["checks"]) == ["env", "stale", "bf16_vs_fp32", "learns", "memory",
                                       "decode", "train", "parity"]
    assert (tmp_path / "log.txt").stat().st_size > 0
    stale = summary["checks"]["stale"]
    assert all(stale[k]["stale"] == 0 and stale[k]["checked"] > 0
               for k in ("grpo", "bupo phase 1", "grad checkpoint"))
