"""
Reading records from a data file: JSONL (one JSON object per line), or .parquet when pyarrow is
installed (an optional dependency, imported only for such a file). Every problem is one line:
`file:line: what is wrong; what to do`, raised as InputError before any model is loaded.
"""
import json
from pathlib import Path

from infra.errors import InputError


def records(path) -> list[tuple[str, dict]]:
    """[(where, record)] of a data file, `where` being "file:line" (or "file:row N" for parquet)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such data file; pass a .jsonl (or .parquet) file")
    if path.suffix == ".parquet":
        return _parquet(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: byte 0x{e.object[e.start]:02x} is not UTF-8; save the "
                         f"file as UTF-8") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per "
                             f"line") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{n}: a JSON {type(rec).__name__}, not an object with a "
                             f"question and an answer")
        out.append((f"{path}:{n}", rec))
    if not out:
        raise InputError(f"{path}: empty; it needs one JSON record per line")
    return out


def _parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), or "
                         f"convert the file to .jsonl") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:   # pyarrow's own error types: not a parquet file, truncated, ...
        raise InputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") \
            from None
    if not rows:
        raise InputError(f"{path}: no rows")
    return [(f"{path}:row {i}", r) for i, r in enumerate(rows, start=1)]
