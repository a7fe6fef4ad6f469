"""
Does a quick-start run reproduce the numbers README quotes?

    bash run.sh && python experiments/check_quickstart.py runs/quickstart/<date-time>

The run is deterministic on a given machine (same seeds, same thread count): every metric except the timings
(step_time, tokens_per_s, peak_memory_mb, eval_time) must equal the reference experiments/results/quickstart/metrics.jsonl,
from which README's quick-start figures are copied. It prints the first difference and exits 1 when they drift
apart (a change of the code, or another CPU's float rounding), 0 when they agree. A full run takes minutes, so
this is a script to run by hand before a release, not a test.
"""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "experiments" / "results" / "quickstart" / "metrics.jsonl"
TIMINGS = {"step_time", "tokens_per_s", "peak_memory_mb", "eval_time"}


def rows(file: Path) -> list[dict]:
    try:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                for line in file.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, AttributeError):
        sys.exit(f"error: {file}: a line is not a JSON record (a run cut mid-write?); resume or re-run it first")


def main(argv):
    if len(argv) != 1:
        sys.exit("error: give the run folder of run.sh (runs/quickstart/<date-time>); see the module docstring")
    run = Path(argv[0])
    file = run / "bupo" / "metrics.jsonl" if (run / "bupo").is_dir() else run / "metrics.jsonl"
    if not file.is_file():
        sys.exit(f"error: {file}: no metrics.jsonl; pass the folder that run.sh printed")
    got, want = rows(file), rows(REFERENCE)
    for a, b in zip(got, want):
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            same = x == y or (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y, rel_tol=1e-9))
            if not same:
                print(f"step {b.get('step')}: {k} = {x}, the reference has {y}")
                return 1
    if len(got) != len(want):
        print(f"{len(got)} metric lines, the reference has {len(want)}")
        return 1
    print(f"{file}: all {len(want)} lines equal the reference (timings aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
