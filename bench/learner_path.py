"""
What a learner reads to follow one RL step: the files and the lines of the functions that run.

    python bench/learner_path.py [--functions]     # --functions: the span of each function too

It runs train.py for two steps of the default model, a BuPO phase-1 step and a full step of 2 x 4
short answers with the worked example (so that some answers are boxed and the whole reward runs),
under sys.settrace (calls only). Every function of the repository that executes inside rl_step is
counted with its whole span of lines (first to last line, docstring and comments included); nested
functions and comprehensions count once, inside their parent. The figures go in
docs/performance.md; tests/test_layout.py holds them to at most 8 files and 900 lines.
"""
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARGS = ["--steps", "2", "--internal-steps", "1", "--internal-layer", "15", "--task", "add",
        "--prompts-per-step", "2", "--group-size", "4", "--mini-batches", "2",
        "--micro-batch-size", "2", "--max-new-tokens", "24", "--eval-every", "0", "--lr", "1e-3"]


def spans(model_dir: Path, out: Path, functions: dict | None = None) -> dict:
    """{file: set of line numbers} of the repository functions that ran inside rl_step (and into
    `functions`, {file:name: lines} of each)."""
    import train
    seen, depth = set(), [0]

    def trace(frame, event, _arg):
        # called on every Python call only: C calls and lines are not traced (fast)
        code = frame.f_code
        if code is train.rl_step.__code__:
            depth[0] += 1
            seen.add(code)
            return leave
        if depth[0]:
            seen.add(code)
        return None

    def leave(frame, event, _arg):
        # the local tracer of rl_step's frame, to see it return
        if event == "return":
            depth[0] -= 1
        return leave

    sys.settrace(trace)
    try:
        train.main(["--model", str(model_dir), "--out", str(out), *ARGS])
    finally:
        sys.settrace(None)
    lines = {}
    for code in seen:
        file = Path(code.co_filename).resolve()
        if file.suffix != ".py" or ROOT not in file.parents:
            continue
        last = max((line for _, _, line in code.co_lines() if line), default=code.co_firstlineno)
        name = str(file.relative_to(ROOT))
        lines.setdefault(name, set()).update(range(code.co_firstlineno, last + 1))
        if functions is not None:
            functions[f"{name}:{code.co_qualname}"] = last + 1 - code.co_firstlineno
    return lines


def measure(model_dir: Path, out: Path) -> dict:
    """{file: lines} of one BuPO phase-1 step and one full step, largest first."""
    counts = {f: len(s) for f, s in spans(model_dir, out).items()}
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def main():
    from infra import weights
    functions = {} if "--functions" in sys.argv else None
    with tempfile.TemporaryDirectory() as tmp:
        counts = {f: len(s) for f, s in spans(weights.ensure(), Path(tmp) / "run",
                                               functions).items()}
    for name, n in sorted((functions or {}).items()):
        print(f"{n:5d}  {name}")
    for f, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{n:5d}  {f}")
    print(f"{sum(counts.values()):5d}  lines in {len(counts)} files")


if __name__ == "__main__":
    main()
