"""
Reading records from a data file: JSONL (one JSON object per line), or .parquet when pyarrow is
installed (an optional dependency, imported only for such a file); and analyze.py's two inputs, a
JSONL of responses (read_responses) and an entropy.json (read_result). Every problem is one line:
`file:line: what is wrong; what to do`, raised as InputError before any model is loaded.
"""
import hashlib
import io
import json
from pathlib import Path

from infra.errors import InputError, first_line


def fingerprint(blob: bytes) -> dict:
    """A data file's identity in args.json: its size and sha256."""
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def records(path, seen: dict | None = None) -> list[tuple[str, dict]]:
    """[(where, record)] of a data file, `where` being "file:line" (or "file:row N" for parquet).
    The file is read once: `seen`, when given, gets {path: fingerprint} of the very bytes parsed,
    so that a run records (and a resume checks) what it trains on, even if the file is edited
    while the model loads."""
    key, path = str(path), Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a data file; pass a .jsonl (or .parquet) file")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: not a regular file (a pipe or a device); save the records to a "
                         f".jsonl file and pass that")
    if not path.is_file():
        raise InputError(f"{path}: no such data file; pass a .jsonl (or .parquet) file")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    if seen is not None:
        seen[key] = fingerprint(blob)
    if path.suffix == ".parquet":
        return _parquet(path, blob)
    try:
        # a byte-order mark (as some editors save UTF-8) is not part of the first record
        text = blob.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = blob[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: byte 0x{e.object[e.start]:02x} is not UTF-8; save the "
                         f"file as UTF-8") from None
    if path.suffix.lower() in (".csv", ".tsv"):
        raise InputError(f"{path}: a {path.suffix[1:].upper()} file; the records must be JSON "
                         f"Lines (one JSON object per line, .jsonl) or .parquet: convert it")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            raise InputError(f"{path}: one JSON array of {len(items)} items, not JSON Lines; write "
                             f"one JSON object per line (.jsonl)")
    out = []
    # JSON Lines ends a record at "\n" only: U+2028, U+0085 and the like are text inside one
    for n, line in enumerate(text.split("\n"), start=1):
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


def _parquet(path: Path, blob: bytes) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), or "
                         f"convert the file to .jsonl") from None
    try:
        rows = pq.read_table(io.BytesIO(blob)).to_pylist()
    except Exception as e:   # pyarrow's own error types: not a parquet file, truncated, ...
        raise InputError(f"{path}: not a readable parquet file ({first_line(e, None)})") \
            from None
    if not rows:
        raise InputError(f"{path}: no rows")
    return [(f"{path}:row {i}", r) for i, r in enumerate(rows, start=1)]


# -----------------------------------------------------------------------------
# analyze.py's inputs

def read_responses(path, tokenizer=None, vocab_size: int | None = None,
                   max_tokens: int | None = None):
    """(prompt_ids, response_ids) pairs from a JSONL file. Every record is checked (ids are
    non-negative integers below vocab_size, prompt + response at most max_tokens); a bad one raises
    InputError naming file:line."""
    pairs = []
    try:
        lines = Path(path).read_bytes().decode("utf-8").removeprefix("\ufeff").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not UTF-8 text"
        raise InputError(f"--responses {path}: cannot read ({why})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}); fix or remove the line") from None
        if isinstance(rec, dict) and "prompt_ids" in rec and "response_ids" in rec:
            p, r = rec["prompt_ids"], rec["response_ids"]
            if not all(isinstance(x, list) and x
                       and all(type(t) is int and t >= 0 for t in x) for x in (p, r)):
                raise InputError(f"{where}: prompt_ids and response_ids must be non-empty lists of "
                                 f"integer token ids")
        elif (isinstance(rec, dict) and isinstance(rec.get("prompt"), str)
              and isinstance(rec.get("response"), str)):
            p = tokenizer.encode_chat([{"role": "user", "content": rec["prompt"]}])
            r = tokenizer.encode(rec["response"])
            if not r:
                raise InputError(f"{where}: the response is empty")
        else:
            raise InputError(f"{where}: expected {{\"prompt_ids\": [...], \"response_ids\": "
                             '[...]} or {"prompt": "...", "response": "..."}')
        if vocab_size is not None and max(p + r) >= vocab_size:
            raise InputError(f"{where}: token id {max(p + r)} is out of range for this model "
                             f"(vocab {vocab_size})")
        if max_tokens is not None and len(p) + len(r) > max_tokens:
            raise InputError(f"{where}: prompt + response is {len(p) + len(r)} tokens, more than "
                             f"{max_tokens} (--max-tokens, at most the model's context); shorten "
                             f"it or raise --max-tokens")
        pairs.append((p, r))
    if not pairs:
        raise InputError(f"--responses {path}: no records")
    return pairs


def read_result(path, flag: str) -> dict:
    """An entropy.json written by this tool, checked for the fields other tools read."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{flag} {path}: not a readable entropy.json ({e}); pass the file "
                         f"analyze.py wrote") from None
    ok = (isinstance(r, dict) and isinstance(r.get("layers"), list)
          and type(r.get("num_layers")) is int)
    ok = ok and len(r["layers"]) == r["num_layers"] >= 1 and all(
        isinstance(x, dict) and type(x.get("dH_mlp")) in (int, float) for x in r["layers"])
    if (not ok or type(r.get("internal_layer")) is not int
        or not 1 <= r["internal_layer"] <= r["num_layers"]):
        raise InputError(f"{flag} {path}: not an entropy.json of analyze.py (num_layers, a dH_mlp "
                         f"for each of its layers, internal_layer)")
    return r
