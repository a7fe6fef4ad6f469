"""The layout a learner relies on: imports point one way (the infra/ package never imports a
top-level file, nothing imports train.py), and one RL step runs in at most 8 files and 900 lines
of functions (bench/learner_path.py; the figures are in docs/performance.md)."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = {p.stem for p in ROOT.glob("*.py")}


def imported(file: Path) -> set:
    """The top-level module names that a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_one_way():
    package = {str(f.relative_to(ROOT)): imported(f) & TOP for f in ROOT.glob("infra/*.py")}
    assert package and not any(package.values()), package
    users = [f.name for f in ROOT.glob("**/*.py") if "train" in imported(f) & TOP
             and f.parent.name not in ("tests", "bench")]
    assert users == [], users       # the tests and benchmarks drive train.py; nothing else


def test_one_rl_step_is_short_to_follow(default_model_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from learner_path import measure
    counts = measure(default_model_dir, tmp_path / "run")
    assert "train.py" in counts and "bupo.py" in counts and "model.py" in counts
    assert len(counts) <= 8 and sum(counts.values()) <= 900, counts
