"""
A training run's folder, and the rules that keep it safe:

    OUT/args.json                    the run's arguments (written once, when the run starts)
    OUT/metrics.jsonl                one JSON line per step (step 0: the evaluation before training)
    OUT/curves.png                   the curves of metrics.jsonl
    OUT/checkpoints/step_N/          an HF-layout folder (transformers loads it) + trainer_state.pt

- A fresh run never reuses a folder that holds a run: it is refused (use --resume), or with
  --overwrite the old run is moved aside to OUT.old-<time>/, never deleted.
- Every file is written atomically, every checkpoint in a temporary folder renamed into place; a
  failed write (disk full, Ctrl-C) removes its temporary folder and leaves the earlier checkpoints
  as they were.
- Resuming takes the newest complete checkpoint; an incomplete or damaged newer one is skipped with
  a warning. metrics.jsonl is cut back to the steps that checkpoint covers, which also repairs a
  line cut mid-write; the lines cut are appended to OUT/metrics.dropped.jsonl, not deleted.
"""
import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from infra import distributed as dp
from infra import plots
from infra.checkpoint import TOKENIZER_FILES, copy_files
from infra.cli import explicit_flags, file_list
from infra.errors import UserError, first_line
from infra.files import (check_movable, check_writable_dir, claim_dir, describe_os_error,
                         free_space, holds, make_dir, remove_partial, replace_dir, size_text,
                         write_atomic, write_failure, write_text)

MARKERS = ("args.json", "metrics.jsonl", "checkpoints")  # what makes a folder hold a run
ANALYSIS = ("entropy.json", "changes.json")                # ... and an analysis of analyze.py


def add_run_args(p, may_change: tuple):
    """train.py's flags of the run folder: where, what to resume, how long, how often to save."""
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train",
                   help="output folder: args.json, metrics.jsonl, curves.png, checkpoints/")
    g.add_argument("--resume", default=None,
                   help="a run folder: continue from its newest complete checkpoint, with the "
                   "saved arguments (only " + ", ".join("--" + k.replace("_", "-")
                                                       for k in may_change) + " may differ)")
    g.add_argument("--overwrite", action="store_true", help="if --out holds a run, move it "
                   "aside to OUT.old-<time>/ (never deleted) and start a new one")
    g.add_argument("--steps", type=int, default=20,
                   help="RL steps in total (with --resume: the saved run's, unless given)")
    g.add_argument("--save-every", type=int, default=10,
                   help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="how many recent checkpoints to keep")
    g.add_argument("--save-phase1-end", action="store_true", help="BuPO: also save a checkpoint "
                   "at the last step of phase 1 (step --internal-steps), never pruned")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts, the sampler and the held-out draws")
    g.add_argument("--accept-data-change", action="store_true",
                   help="resume although a --data / --eval-data file differs from the one the "
                   "run started with (recorded in resumes.jsonl)")
    return g


def data_inputs(args) -> list:
    """[(flag, path)] of the run's data and benchmark files."""
    inputs = [(flag, getattr(args, flag[2:], None)) for flag in ("--data", "--example")]
    inputs += [("--eval-data", f) for f in file_list(getattr(args, "eval_data", None))]
    return [(flag, path) for flag, path in inputs if path]


def check_data_present(args):
    """A resume's data files (args.json) are all still there: one line naming one that is gone."""
    for path in data_fingerprints(args.out):
        if not Path(path).is_file():
            raise UserError(f"--resume {args.out}: its data file {path} is gone; a resume needs "
                            f"the run's data files: put it back")


def data_fingerprints(out) -> dict:
    """{path: {"bytes", "sha256"}} of the data files of the run in OUT: args.json's, updated by
    the changes accepted since (resumes.jsonl)."""
    saved = saved_args(out).get("data_files")
    saved = dict(saved if isinstance(saved, dict) else {})
    for note in read_notes(Path(out) / "resumes.jsonl"):
        saved.update(note.get("accepted_data_change") or {})
    return saved


def check_data(args, state: dict, files: dict):
    """A resume's data files, as read now (files: tasks.Source.files, the fingerprints of the
    bytes parsed), against the run's: a changed one is refused unless --accept-data-change of this
    command, and is then noted in resumes.jsonl."""
    changed = {p: files.get(p) for p, then in data_fingerprints(args.out).items()
               if files.get(p) != then}
    if changed and not args.accept_data_change:
        raise UserError(f"--resume {args.out}: {next(iter(changed))} differs from the file the run "
                        f"started with (sha256 and size in args.json); its steps would draw other "
                        f"problems: restore it, or pass --accept-data-change")
    state["data_changed"] = changed


def check_new(out, overwrite: bool):
    """Refuse (one line) a --out that already holds a run, unless overwrite; check that it can be
    written."""
    found, analysis = holds(out, MARKERS), holds(out, ANALYSIS)
    if analysis and not found:
        raise UserError(f"--out {out}: holds an analysis of analyze.py ({', '.join(analysis)}); a "
                        f"run goes into a folder of its own: choose another --out")
    if found and not overwrite:
        raise UserError(f"--out {out}: already holds a run ({', '.join(found)}); to continue it "
                        f"use --resume {out}, to start over pass --overwrite (the old run is moved "
                        f"to {Path(out).name}.old-<time>/, not deleted), or choose another --out")
    if found:
        check_movable(out)
    else:
        check_writable_dir(out)


def check_apart(args):
    """Refuse (one line) an --out that is, is inside, or holds one of the run's inputs (the model
    folder, a data file, an analysis): the run and --overwrite's move aside would write into,
    over or around it."""
    out = Path(os.path.realpath(args.out))
    inputs = [("--model", args.model), ("--analysis", getattr(args, "analysis", None)),
              *data_inputs(args)]
    for flag, path in inputs:
        if not path:
            continue
        p = Path(os.path.realpath(path))
        how = ("is" if out == p else "is inside" if p in out.parents
               else "holds" if out in p.parents else None)
        if how:
            raise UserError(f"--out {args.out}: {how} the run's input {flag} {path}; a run never "
                            f"writes into, over or around its inputs: choose another --out")


def start(out, args, overwrite: bool, files: dict):
    """Claim OUT for a new run, under its lock, and write args.json (with `files`, the size and
    sha256 of each data file as read: tasks.Source.files) and an empty metrics.jsonl."""
    make_dir(out)
    # a resume or another new run writing into OUT is refused here, before anything moves
    lock(out)
    moved = claim_dir(out, MARKERS, overwrite, hint=f"to continue that run use --resume {out}; ")
    if moved:
        # the new folder; the old one, moved aside, stays locked until this process ends
        lock(out)
        print(f"--overwrite: the earlier run in {out} was moved to {moved}", file=sys.stderr)
    # which code ran: the commit, and whether it was clean
    record = {**vars(args), "code": code_version(), "data_files": files}
    write_text(Path(out) / "args.json", json.dumps(record, indent=1) + "\n")
    keep_model_files(out, args.model)
    write_text(Path(out) / "metrics.jsonl", "")


def note_resume(out, start_step: int, data_changed: dict | None = None):
    """Append to OUT/resumes.jsonl the step a resume starts at, the code it runs (args.json keeps
    the code the run started with) and the data files accepted as changed (--accept-data-change);
    say so in one line when the code differs."""
    file, code = Path(out) / "resumes.jsonl", code_version()
    record = saved_args(out)
    started = record.get("code")
    if (Path(out) / "args.json").exists() and not record:
        print(f"warning: {out}/args.json is not the JSON record of the run's arguments; it is left "
              f"as it is (the resume takes its arguments from the checkpoint)", file=sys.stderr)
    if isinstance(started, dict) and started.get("commit") != code["commit"]:
        print(f"resume: the code is at commit {code['commit']}, the run started at "
              f"{started.get('commit')} (recorded in {file})", file=sys.stderr)
    note = {"step": start_step, "code": code}
    if data_changed:
        note["accepted_data_change"] = data_changed
        print(f"resume: accepted changed data files: {', '.join(data_changed)}", file=sys.stderr)
    append_lines(file, [json.dumps(note).encode()])


def read_notes(file: Path) -> list:
    """The JSON objects of resumes.jsonl (a damaged line is skipped)."""
    try:
        lines = file.read_bytes().split(b"\n")
    except OSError:
        return []
    notes = []
    for line in lines:
        try:
            note = json.loads(line)
        except ValueError:
            continue
        if isinstance(note, dict):
            notes.append(note)
    return notes


def saved_args(out) -> dict:
    """OUT/args.json, the arguments and code the run started with; {} where it is missing or not a
    JSON object (it is a record: a resume takes its arguments from the checkpoint)."""
    try:
        record = json.loads((Path(out) / "args.json").read_bytes())
    except (OSError, ValueError):       # a decoding error is a ValueError too
        return {}
    return record if isinstance(record, dict) else {}


def append_lines(file: Path, lines: list[bytes]):
    """Rewrite `file` atomically with `lines` after its old bytes, which are kept as they are."""
    old = file.read_bytes() if file.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_atomic(file, lambda tmp: Path(tmp).write_bytes(old + b"".join(x + b"\n" for x in lines)))


def code_version(here=None) -> dict:
    """The git commit of the code that runs (the checkout HERE, by default this file's), whether
    its tree was clean (no changes to tracked or untracked, not ignored files), and where it was
    not, the paths that differed (the first 20, then a count); None for each where the code is not
    a git checkout or git is missing."""
    import subprocess
    here = Path(here or Path(__file__).resolve().parent)

    def git(*a):
        try:
            r = subprocess.run(["git", "-C", str(here), *a], capture_output=True, text=True,
                               timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    record = {"commit": commit.strip() if commit else None,
              "clean": None if status is None else status == ""}
    if status:    # porcelain lines are "XY path": two status letters, a space, the path
        changed = [line[3:] for line in status.splitlines() if line.strip()]
        more = [f"... {len(changed) - 20} more"] if len(changed) > 20 else []
        record["changed"] = changed[:20] + more
    return record


# the open lock files of this process: a lock lasts as long as the process that holds it
_locks = []


def lock(out):
    """Hold OUT/.lock for the rest of this process, so that one process at a time writes a run
    folder (a new run, a resume, an overwrite). A lock held by a running process is refused in one
    line naming it; the lock of a process that died is released by the system with it, and taken
    over with a note. (flock: a local file system; on a network file system the lock may not hold
    across machines.)"""
    import fcntl
    f = open(Path(out) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{out}: another process (pid {holder}) is writing this run; wait for it "
                        f"to end or stop it, or choose another --out") from None
    f.seek(0)
    before = f.read().strip()
    if before and before != str(os.getpid()):
        print(f"{out}: took over the lock of process {before}, which is no longer running",
              file=sys.stderr)
    f.seek(0), f.truncate(), f.write(f"{os.getpid()}\n"), f.flush()
    _locks.append(f)


def unlock_all():
    """At a clean end: clear and release this process's locks (a crash leaves the pid, which the
    next writer reports as taken over)."""
    while _locks:
        f = _locks.pop()
        f.seek(0), f.truncate(), f.close()


def log(out, row: dict):
    """Append one line to metrics.jsonl and make it durable before the next step starts. A failed
    append is one line; a line it cut short is repaired by the next resume (repair_metrics)."""
    file = Path(out) / "metrics.jsonl"
    try:
        with open(file, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"appending step {row.get('step')} to {file} failed "
                        f"({describe_os_error(e)}; {free_space(file)}); the steps before it are "
                        f"kept, and --resume {out} continues from the newest checkpoint") from None


def read_metrics(out) -> list[dict]:
    """The well-formed lines of metrics.jsonl (a line cut mid-write by a crash, or one that is not
    UTF-8 JSON, is skipped)."""
    lines = (Path(out) / "metrics.jsonl").read_bytes().splitlines()
    return [json.loads(line) for line in lines if _step_of(line) is not None]


def _step_of(line: bytes):
    """The step of one metrics line, or None for a line that is not a whole metrics record."""
    try:
        row = json.loads(line.decode())
    except ValueError:                  # not UTF-8, or not JSON
        return None
    return row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def repair_metrics(out, start_step: int):
    """Keep exactly the metrics of steps before `start_step` (those the resumed checkpoint covers);
    the other lines (later steps, a line cut mid-write) are appended to metrics.dropped.jsonl."""
    file, aside = Path(out) / "metrics.jsonl", Path(out) / "metrics.dropped.jsonl"
    kept, dropped, steps = [], [], set()
    for line in (file.read_bytes().splitlines() if file.exists() else []):
        step = _step_of(line)
        if not line.strip():
            continue
        if step is not None and step < start_step:
            kept.append(line), steps.add(step)
        else:
            dropped.append(line)
    if dropped:     # byte for byte, whatever they hold
        append_lines(aside, dropped)
        print(f"resume: metrics.jsonl cut back to the {len(kept)} lines before step {start_step}; "
              f"{len(dropped)} later or broken lines moved to {aside}", file=sys.stderr)
    missing = sorted(set(range(1, start_step)) - steps)
    if missing:     # the file was removed or cut by hand: said, since the curves will lack them
        print(f"warning: {file} has no record of step{'s' * (len(missing) > 1)} "
              f"{spans(missing)} (removed or cut since they were written); the run goes on from "
              f"step {start_step}, and its curves lack them", file=sys.stderr)
    write_atomic(file, lambda tmp: Path(tmp).write_bytes(b"".join(x + b"\n" for x in kept)))


def spans(steps: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    out, first = [], None
    for i, s in enumerate(steps):
        first = s if first is None else first
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(f"{first}-{s}" if s > first else str(s))
            first = None
    return ", ".join(out)


def open_run(args, argv, build_parser, may_change: tuple, before: dict, load_meta):
    """(args, trainer state or None, model folder): a new run's folder checked (a folder that holds
    a run is refused before any work), or a resumed run's newest complete checkpoint and saved
    arguments (`may_change`: the flags a resume may change; `before`: the value of a flag added
    since, for a run saved without it; load_meta(folder) checks a checkpoint's weights without
    placing them on a device). Paths are made absolute once, so that a resume from
    another working folder finds them."""
    for k in ("model", "out", "analysis", "resume", "data", "example"):
        if getattr(args, k, None):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    if getattr(args, "eval_data", None):
        args.eval_data = ",".join(os.path.abspath(f) for f in file_list(args.eval_data))
    if not args.resume:
        check_apart(args)
        check_new(args.out, args.overwrite)
        return args, None, args.model
    # the checkpoint's weights are checked on the meta device: the rank's device is not chosen yet,
    # and under torchrun every rank would load onto the default GPU
    ckpt, state, _ = resumable(args.resume, load_meta, writer=dp.launched_rank() == 0,
                               may_change=may_change)
    accept = getattr(args, "accept_data_change", False)      # this command's, not the saved
    args = resume_args(args, explicit_flags(build_parser(), argv), state, build_parser(),
                       may_change, before)
    args.accept_data_change = accept
    check_data_present(args)      # what they hold is checked once read (check_data)
    if args.steps <= state["step"]:
        raise UserError(f"--resume {args.resume}: the run is already at step {state['step']} of "
                        f"{args.steps}; pass --steps N with N > {state['step']} to continue it")
    print(f"resuming {args.out} from {ckpt.name}", file=sys.stderr)
    return args, state, ckpt


def restore(load_optimizer, state: dict | None, out, writer: bool, world: int = 1) -> int:
    """The first step to run: 1 for a new run; for a resumed one, the step after its checkpoint,
    with the optimizer state loaded (load_optimizer(saved state)) and (by the writer)
    metrics.jsonl cut back to that checkpoint and the resume noted in resumes.jsonl. world: the
    number of ranks now; another number than the checkpoint's is said in one line."""
    if not state:
        return 1
    load_optimizer(state["optimizer"])
    start = state["step"] + 1
    if writer:
        if state.get("world_size", world) != world:
            print(f"resume: {world} rank(s) now, {state['world_size']} wrote the checkpoint: the "
                  f"same run up to the order of float sums, not bit for bit", file=sys.stderr)
        repair_metrics(out, start)
        note_resume(out, start, state.get("data_changed"))
    return start


def finish(out, title: str, step: int, stopped: bool):
    """The end of a run (finished or stopped by Ctrl-C): its curves, and one line saying where."""
    plots.curves(read_metrics(out), Path(out) / "curves.png", title)
    print(f"{'stopped' if stopped else 'done'} at step {step}: {out}/metrics.jsonl, curves.png, "
          f"checkpoints/", file=sys.stderr)


def resume_args(args, given: set, state: dict, parser, may_change: tuple,
                before: dict | None = None) -> argparse.Namespace:
    """The saved run's arguments, with the flags that may change taken from the command line; any
    other flag given with a different value is refused (it would silently not apply). A flag added
    since the run started takes its value in `before` (what such a run did), else its default."""
    saved = {**vars(parser.parse_args([])), **(before or {}), **state["args"]}
    for k in sorted(given - {"resume", "out", "overwrite"} - set(may_change)):
        if getattr(args, k) != saved.get(k):
            raise UserError(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the resumed "
                            f"run's {saved.get(k)} ({args.resume}/args.json); --resume continues a "
                            f"run with its own arguments: drop the flag, or start a new run with "
                            f"--out")
    if "overwrite" in given and args.overwrite:
        raise UserError(f"--overwrite with --resume {args.resume}: --resume continues that run, "
                        f"--overwrite would move it aside and start a new one; drop one of them")
    if "out" in given and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UserError(f"--out {args.out} with --resume {args.resume}: a resumed run writes into "
                        f"its own folder; drop --out")
    changed = {k: getattr(args, k) for k in may_change if k in given
               and getattr(args, k) != saved.get(k)}
    for k, v in changed.items():
        print(f"resume: --{k.replace('_', '-')} {v} (the saved run had {saved.get(k)})",
              file=sys.stderr)
    out = argparse.Namespace(**{**saved, **changed, "out": args.resume, "resume": args.resume})
    if not os.path.isabs(out.model):
        # a run saved before paths were stored absolute: relative to here, if there
        if not Path(out.model).is_dir():
            raise UserError(f"--resume {args.resume}: the run's --model {out.model} is a relative "
                            f"path that is not there from this folder; resume from the folder the "
                            f"run was started in")
        out.model = os.path.abspath(out.model)
    return out


# -----------------------------------------------------------------------------
# checkpoints

def keep_model_files(out, model):
    """OUT/base/: the base model's config and tokenizer files, copied at the start (complete, or
    not at all). Every checkpoint takes its tokenizer files from there, so a resume needs nothing
    outside the run folder but its data files, even once the model folder is gone."""
    tmp = Path(out) / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_dir(tmp)
    copy_files(model, tmp, ("config.json", *TOKENIZER_FILES))
    replace_dir(tmp, Path(out) / "base")


def model_files(args) -> str:
    """Where a checkpoint copies its tokenizer files from: the run's own copy (a run started
    before it was kept: the model folder)."""
    own = Path(args.out) / "base"
    return str(own) if (own / "tokenizer.json").is_file() else args.model


def check_health(model, probe: torch.Tensor, step: int, args, amp):
    """Stop the run in one line, before its checkpoint, when training has made the model
    unusable: a weight, or a logit of the probe prompt [1, T], that is not finite. Weights can
    stay finite while every logit is NaN (--lr 1e9: AdamW's decay scales them by 1 - 1e7 per
    update). Nothing unhealthy is saved, so the newest checkpoint is the last healthy one.
    Every rank calls it (a sharded model's forward takes them all)."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
              for p in model.parameters())
    with torch.no_grad(), amp():
        bad += int(not torch.isfinite(model(probe)).all())
    if hasattr(model, "reshard"):   # FSDP2 keeps a root gathered after a forward: free it
        model.reshard()
    if not dp.all_sum({"bad": bad}, probe.device)["bad"]:
        return
    last = newest(Path(args.out) / "checkpoints")
    raise UserError(f"step {step}: the weights or logits are no longer finite (--lr {args.lr:g} "
                    f"or --weight-decay {args.weight_decay:g} too large?); nothing of this step "
                    f"was saved; " + (f"the last healthy checkpoint is {last}: start a new run "
                                      f"from it (--model) with a lower --lr" if last
                                      else "no checkpoint was written yet"))


def checkpoint(model, opt, args, step: int, layer: int, writer: bool):
    """A checkpoint of step `step`, from every rank: the full weights and optimizer state are
    gathered (dp.full_state; a plain model's own), the writer saves them (save_checkpoint), and
    every rank waits until it has."""
    weights, optimizer = dp.full_state(model, opt)   # every rank takes part
    if writer:
        save_checkpoint(model, weights, optimizer, args, step, layer, dp.world())
    del weights, optimizer
    dp.barrier()


def save_checkpoint(model, weights: dict, optimizer: dict, args, step: int, layer: int,
                    world: int = 1) -> Path:
    """OUT/checkpoints/step_N: the weights (HF layout, loadable by transformers) and
    trainer_state.pt (optimizer state, step, arguments, internal layer, the number of ranks that
    wrote it), written into a temporary folder and renamed into place; then all but the newest
    --keep-checkpoints of this run are removed. weights, optimizer: model.state_dict() and
    opt.state_dict(), or a sharded run's gathered to one process (dp.full_state)."""
    root = Path(args.out) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    try:
        model.save_pretrained(tmp, copy_from=model_files(args), state=weights)
        torch.save({"step": step, "optimizer": optimizer, "args": vars(args),
                    "internal_layer": layer, "world_size": world},
                   tmp / "trainer_state.pt")
        replace_dir(tmp, final)
    except BaseException as e:
        remove_partial(tmp)
        # a full disk, a quota or a size limit: OSError, or the serializers' own error types
        why = write_failure(e)
        if why is None:
            raise
        last = newest(root)
        need = sum(w.numel() * w.element_size() for w in model.hf_state_dict(weights).values()) * 3
        raise UserError(f"writing checkpoint {final} failed ({why}; {free_space(root)}, a "
                        f"checkpoint takes about {size_text(need)}); "
                        + (f"the last complete one is {last.name}: --resume {args.out} continues "
                           f"from it" if last else "no checkpoint was written yet")) from None
    # the newest --keep-checkpoints (phase 1's end counts among them when it is one), and phase
    # 1's end besides
    kept = phase1_end(args)
    for old in sorted((p for p in root.glob("step_*") if 0 <= _step(p) <= step),
                      key=_step)[:-args.keep_checkpoints]:
        if _step(old) != kept:
            # only names this code writes: a user's step_000002.bak copy stays
            remove_partial(old)
    return final


def phase1_end(args) -> int | None:
    """The step of --save-phase1-end's checkpoint (the last step of BuPO's phase 1), or None."""
    if getattr(args, "save_phase1_end", False) and args.algo == "bupo" and args.internal_steps:
        return args.internal_steps
    return None


# the only names under OUT/checkpoints/ that this code writes, and so the only ones it may ever
# delete
CHECKPOINT_NAME = re.compile(r"step_(\d{6,})")
# the temporary names of an unfinished write: .step_N.tmp (save_checkpoint), ..step_N.tmp.tmp (its
# write_folder), .step_N.old (replace_dir's moved-aside copy)
TEMP_NAME = re.compile(r"\.step_\d{6,}\.(tmp|old)|\.\.step_\d{6,}\.tmp\.tmp")


def _step(p: Path) -> int:
    """The step of a checkpoint folder this code wrote, else -1 (never touched)."""
    m = CHECKPOINT_NAME.fullmatch(p.name)
    return int(m.group(1)) if m and p.is_dir() else -1


def newest(root: Path) -> Path | None:
    found = sorted((p for p in Path(root).glob("step_*") if _step(p) >= 0), key=_step)
    return found[-1] if found else None


def load_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt of a checkpoint (weights_only: no pickle code runs), checked for what resume
    needs. Memory-mapped, copy-on-write: the ranks of one node that resume together share one copy
    of the optimizer state in the page cache instead of each reading its own (the file is never
    written; pages an update changes become the rank's own, as a read copy would be)."""
    file = ckpt / "trainer_state.pt"
    if not file.exists():
        raise ValueError("no trainer_state.pt (the write did not finish)")
    try:
        try:
            state = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
        except (RuntimeError, OSError):     # a file system that cannot map it: read it instead
            state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"trainer_state.pt is unreadable ({first_line(e)})") from None
    if (not isinstance(state, dict)
        or not {"step", "optimizer", "args", "internal_layer"} <= set(state)):
        raise ValueError("trainer_state.pt lacks step / optimizer / args / internal_layer")
    return state


def check_consistent(ckpt: Path, state: dict, model, out=None, may_change: tuple = ()):
    """The checkpoint's weights, its optimizer state, its saved step and layer and the run's
    args.json belong together: else (a trainer_state.pt of another run or model copied in) the first
    update would fail mid-step, train the wrong layer or continue another run's schedule. ValueError
    names the first mismatch."""
    started = Path(out) / "args.json" if out else None
    if started:
        first = saved_args(out)
        skip = set(may_change) | {"out", "resume", "overwrite", "code", "model"}
        for k in sorted(set(first) & set(state["args"]) - skip):
            if first[k] != state["args"][k]:
                raise ValueError(f"trainer_state.pt was saved with --{k.replace('_', '-')} "
                                 f"{state['args'][k]}, but {started} says {first[k]}: another "
                                 f"run's checkpoint")
    if _step(ckpt) != state["step"]:
        raise ValueError(f"trainer_state.pt is of step {state['step']}, the folder of step "
                         f"{_step(ckpt)}")
    L = model.config.num_layers
    if type(state["internal_layer"]) is not int or not 1 <= state["internal_layer"] <= L:
        raise ValueError(f"trainer_state.pt's internal layer {state['internal_layer']!r} is not a "
                         f"layer of this {L}-layer model")
    params = list(model.parameters())
    opt = state["optimizer"]
    ids = [i for g in opt.get("param_groups", []) for i in g.get("params", [])]
    if len(ids) != len(params):
        raise ValueError(f"the optimizer state holds {len(ids)} parameters, the weights "
                         f"{len(params)}: it is another model's")
    for i, p in zip(ids, params):
        for name, t in opt.get("state", {}).get(i, {}).items():
            if isinstance(t, torch.Tensor) and t.dim() and tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"the optimizer's {name} of parameter {i} has shape "
                                 f"{list(t.shape)}, the weight {list(p.shape)}: another model's "
                                 f"optimizer state")


def resumable(out, load_model, writer: bool = True, may_change: tuple = ()) -> tuple:
    """(checkpoint folder, trainer state, model) of the newest checkpoint of OUT that loads
    completely. Newer ones that are incomplete or damaged are skipped with a warning, never deleted.
    The writer (rank 0) takes the run's lock first and removes what an interrupted write left."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"--resume {out}: no such run folder")
    if out.parent.name == "checkpoints" and (out.parent.parent / "args.json").is_file():
        raise UserError(f"--resume {out}: a checkpoint, not a run folder; pass its run, --resume "
                        f"{out.parent.parent} (a run goes on from its newest complete checkpoint)")
    if not (out / "checkpoints").is_dir():
        raise UserError(f"--resume {out}: no complete checkpoint in {out / 'checkpoints'}; start a "
                        f"new run with --out")
    if writer:
        lock(out)
        for leftover in (p for p in (out / "checkpoints").glob(".*")
                         if TEMP_NAME.fullmatch(p.name)):   # a crash
            print(f"resume: removing the unfinished checkpoint write {leftover}", file=sys.stderr)
            remove_partial(leftover)
    found = sorted((p for p in (out / "checkpoints").glob("step_*") if _step(p) >= 0), key=_step,
                   reverse=True)
    for ckpt in found:
        try:
            state = load_trainer_state(ckpt)
            model = load_model(ckpt)
            check_consistent(ckpt, state, model, out, may_change)
            return ckpt, state, model
        except (ValueError, UserError) as e:   # ModelLoadError is a UserError
            print(f"warning: skipping {ckpt}: {first_line(e, None)}; trying an earlier "
                  f"checkpoint",
                  file=sys.stderr)
    raise UserError(f"--resume {out}: no complete checkpoint in {out / 'checkpoints'}; start a new "
                    f"run with --out")
