"""
Does a quick-start run reproduce the numbers README quotes?

    bash run.sh && python experiments/check_quickstart.py runs/quickstart/<date-time>

The run is deterministic on a given machine (same seeds, same thread count): every metric except the
timings (step_time, tokens_per_s, peak_memory_mb, eval_time) must equal the reference
experiments/results/quickstart/metrics.jsonl, from which README's quick-start figures are copied.
Records are matched by step. It prints the first difference (with its relative size: about 1e-8 at
step 1 is another CPU's float rounding, more is a change of the code) and exits 1 when they drift
apart, 0 when every step agrees. A run made with other arguments (`bash run.sh --steps 3`) is
compared on the steps and metrics both have, after a note naming the arguments that differ, and
exits 1 if it does not cover the reference. A full run takes minutes, so this is a script to run by
hand before a release, not a test.
"""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "experiments" / "results" / "quickstart" / "metrics.jsonl"
TIMINGS = {"step_time", "tokens_per_s", "peak_memory_mb", "eval_time"}


# where things are, not what the run does
PATHS = {"model", "out", "analysis", "resume", "overwrite"}


def read(file: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, AttributeError):
        sys.exit(f"error: {file}: a line is not a JSON record (a run cut mid-write?); resume or "
                 f"re-run it first")


def by_step(records: list[dict]) -> dict[int, dict]:
    """One record per step, timings dropped (an evaluation and a training step may log the same
    step)."""
    steps: dict[int, dict] = {}
    for r in records:
        steps.setdefault(r.get("step"), {}).update({k: v for k, v in r.items() if k not in TIMINGS})
    return steps


def same(x, y) -> bool:
    return (x == y
            or (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y, rel_tol=1e-9)))


def main(argv):
    if len(argv) != 1:
        sys.exit("error: give the run folder of run.sh (runs/quickstart/<date-time>); see the "
                 "module docstring")
    run = Path(argv[0])
    folder = run / "bupo" if (run / "bupo").is_dir() else run
    file = folder / "metrics.jsonl"
    if not file.is_file():
        sys.exit(f"error: {file}: no metrics.jsonl; pass the folder that run.sh printed")
    args_file = folder / "args.json"
    if args_file.is_file():
        # arguments added since the reference was made are left out (they did not exist)
        mine = json.loads(args_file.read_text())
        ref = json.loads((REFERENCE.parent / "args.json").read_text())
        changed = [f"--{k.replace('_', '-')} {mine[k]} (reference {ref[k]})"
                   for k in sorted(set(mine) & set(ref) - PATHS) if mine[k] != ref[k]]
        if changed:
            print("note: this run's arguments differ from the reference's: " + ", ".join(changed)
                  + "; only the steps and metrics both have are compared")
    got, want = by_step(read(file)), by_step(read(REFERENCE))
    common = sorted(set(got) & set(want), key=lambda s: (s is None, s))
    for step in common:
        a, b = got[step], want[step]
        for k in sorted(set(a) & set(b)):
            if not same(a[k], b[k]):
                rel = (f" (relative difference {abs(a[k] - b[k]) / max(abs(b[k]), 1e-30):.1e})"
                       if isinstance(a[k], float) and isinstance(b[k], float) else "")
                print(f"step {step}: {k} = {a[k]}, the reference has {b[k]}{rel}")
                return 1
    if not common:
        print(f"{file}: no step in common with the reference")
        return 1
    if set(got) != set(want) or any(set(got[s]) != set(want[s]) for s in common):
        print(f"{file}: the {len(common)} steps both have agree with the reference (timings "
              f"aside), but the run logged steps {sorted(got)} and the reference {sorted(want)}, "
              f"or other metrics")
        return 1
    print(f"{file}: all {len(want)} steps equal the reference (timings aside)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
