"""One place owns a run folder (runs.py): a lock for every writer, deletion of its own names only,
absolute paths stored at the start. Each class of case here lost or corrupted a run before."""
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tasks
import train
from infra import cli, runs
from infra.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--prompts-per-step", "2", "--group-size", "4", "--mini-batches", "2",
            "--micro-batch-size", "2",
            "--max-new-tokens", "6", "--eval-problems", "2", "--eval-samples", "2", "--lr", "1e-3",
            "--internal-layer", "2", "--internal-steps", "1", "--eval-every", "0", "--save-every",
            "1"]

# a writer that stops before its second step until the file GO exists, so that another can try
# meanwhile
PAUSED = """
import sys, time, pathlib
sys.path.insert(0, {root!r})
import tasks, train
tasks.reward = lambda text, answer: float(len(text) % 2)
real = train.rl_step
def rl_step(model, tok, src, opt, args, step, *a, **k):
    if step == 2:
        pathlib.Path({ready!r}).touch()
        while not pathlib.Path({go!r}).exists():
            time.sleep(0.05)
    return real(model, tok, src, opt, args, step, *a, **k)
train.rl_step = rl_step
train.main({argv!r})
"""


@pytest.fixture
def length_reward(monkeypatch):
    monkeypatch.setattr(tasks, "reward", lambda text, answer: float(len(text) % 2))


def steps_of(out):
    return [json.loads(x)["step"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def writer_argv(kind, model, out, steps):
    if kind == "resume":
        return ["--resume", str(out), "--steps", str(steps)]
    return ["--model", str(model), "--out", str(out), *TINY_RUN, "--steps", str(steps)] + (
        ["--overwrite"] if kind == "overwrite" else [])


@pytest.mark.parametrize("first", ["new", "resume", "overwrite"])
def test_every_writer_started_twice_at_once(tiny_chat_model, tmp_path, length_reward, first,
                                            capsys):
    """While one writer (a new run, a resume, an overwrite) is inside its run, each other writer of
    the same folder is refused in one line, and the first one's metrics end as one line per step, in
    order."""
    out = tmp_path / "run"
    if first != "new":
        train.main(writer_argv("new", tiny_chat_model, out, 1))
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = PAUSED.format(root=str(ROOT), ready=str(ready), go=str(go),
                           argv=writer_argv(first, tiny_chat_model, out, 3))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stderr=subprocess.PIPE,
                            text=True)
    try:
        t0 = time.time()
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() - t0 < 120, "the first writer never reached its second step"
            time.sleep(0.05)
        # the first writer's own
        aside = sorted(p.name for p in tmp_path.iterdir() if ".old-" in p.name)
        for second in ("resume", "overwrite", "new"):
            with pytest.raises(UserError) as e:
                train.main(writer_argv(second, tiny_chat_model, out, 4))
            msg = str(e.value)
            assert "\n" not in msg
            want = f"pid {proc.pid}" if second != "new" else "already holds a run"
            assert want in msg, (second, msg)
        # nothing moved aside
        assert sorted(p.name for p in tmp_path.iterdir() if ".old-" in p.name) == aside
    finally:
        go.touch()
        err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err
    assert steps_of(out) == [1, 2, 3] and (out / "checkpoints" / "step_000003").is_dir()


def test_a_dead_writers_lock_is_taken_over(tiny_chat_model, tmp_path, length_reward, capsys):
    out = tmp_path / "run"
    train.main(writer_argv("new", tiny_chat_model, out, 1))
    (out / ".lock").write_text("999999999\n")          # a process killed while it held the lock
    train.main(writer_argv("resume", tiny_chat_model, out, 2))
    assert ("took over the lock of process 999999999" in capsys.readouterr().err
            and steps_of(out) == [1, 2])


def test_pruning_deletes_only_checkpoints_it_wrote(tiny_chat_model, tmp_path, length_reward):
    out = tmp_path / "run"
    train.main(writer_argv("new", tiny_chat_model, out, 2))
    ckpt = out / "checkpoints"
    shutil.copytree(ckpt / "step_000002", ckpt / "step_000002.bak")      # the user's own copies
    (ckpt / "step_1").mkdir(), (ckpt / "notes").mkdir()
    (ckpt / "step_000001.txt").write_text("mine")
    # an interrupted write's
    (ckpt / ".step_000003.old").mkdir(), (ckpt / "..step_000003.tmp.tmp").mkdir()
    train.main(["--resume", str(out), "--steps", "4", "--keep-checkpoints", "1"])
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["notes", "step_000001.txt", "step_000002.bak", "step_000004", "step_1"]


def test_a_run_resumed_from_another_folder_keeps_its_tokenizer(tiny_chat_model, tmp_path,
                                                               length_reward, monkeypatch):
    """--model and --out given relative to the folder the run started in: stored absolute, so a
    resume from anywhere else writes complete checkpoints (tokenizer files included) and can be
    resumed again."""
    start, elsewhere = tmp_path / "a", tmp_path / "b"
    start.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_chat_model, start / "model")
    monkeypatch.chdir(start)
    train.main(["--model", "model", "--out", "run", *TINY_RUN, "--steps", "1"])
    saved = json.loads((start / "run" / "args.json").read_text())
    assert saved["model"] == str(start / "model") and saved["out"] == str(start / "run")
    monkeypatch.chdir(elsewhere)
    train.main(["--resume", str(start / "run"), "--steps", "2"])
    assert (start / "run" / "checkpoints" / "step_000002" / "tokenizer.json").is_file()
    train.main(["--resume", str(start / "run"), "--steps", "3"])
    assert steps_of(start / "run") == [1, 2, 3]


def test_a_run_goes_on_after_its_model_folder_is_purged(tiny_chat_model, tmp_path,
                                                        length_reward):
    """The run keeps the model's config and tokenizer files (OUT/base/): with the model folder
    deleted (scratch space purged), resumes still write complete checkpoints and go on."""
    model, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(tiny_chat_model, model)
    train.main(["--model", str(model), "--out", str(out), *TINY_RUN, "--steps", "1",
                "--keep-checkpoints", "1"])
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (out / "base").iterdir()}
    shutil.rmtree(model)
    train.main(["--resume", str(out), "--steps", "2", "--keep-checkpoints", "1"])
    # step 1's checkpoint is pruned: step 2's alone must be complete for the next resume
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    assert (out / "checkpoints" / "step_000002" / "tokenizer.json").is_file()
    train.main(["--resume", str(out), "--steps", "3", "--keep-checkpoints", "1"])
    assert steps_of(out) == [1, 2, 3]


def test_a_resume_whose_data_file_changed_is_refused(tiny_chat_model, tmp_path, length_reward):
    """args.json keeps each data file's size and sha256. A resume on an edited file (same path,
    other problems) is refused naming it, unless --accept-data-change, which resumes.jsonl
    records; a file that is gone is named as gone."""
    data, out = tmp_path / "d.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)})
                            + "\n" for i in range(8)))
    train.main(["--model", str(tiny_chat_model), "--out", str(out), "--data", str(data),
                *TINY_RUN, "--steps", "1"])
    assert json.loads((out / "args.json").read_text())["data_files"][str(data)]["bytes"] == \
        data.stat().st_size
    data.write_text(data.read_text().replace("What is 3 + 1?", "What is 30 + 1?"))
    with pytest.raises(UserError, match=f"{data} differs from the file the run started with"):
        train.main(["--resume", str(out), "--steps", "2"])
    train.main(["--resume", str(out), "--steps", "2", "--accept-data-change"])
    note = json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])
    assert list(note["accepted_data_change"]) == [str(data)] and steps_of(out) == [1, 2]
    train.main(["--resume", str(out), "--steps", "3"])     # the accepted file is the run's now
    data.unlink()
    with pytest.raises(UserError, match=f"its data file {data} is gone"):
        train.main(["--resume", str(out), "--steps", "4"])


def test_a_data_file_edited_while_the_model_loads_is_not_the_one_recorded(
        tiny_chat_model, tmp_path, length_reward, monkeypatch):
    """The run trains on the bytes it parsed before loading the model; args.json records the
    size and sha256 of those same bytes, not of the file as it is when the run folder is made
    (it used to read the file a second time then). So a resume on the edited file is refused:
    its steps would draw other problems than the run's first steps did."""
    data, out = tmp_path / "d.jsonl", tmp_path / "run"
    first = "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                    for i in range(8))
    data.write_text(first)
    load = train.load

    def load_and_edit(*a, **k):      # the user saves an edit while the weights load
        data.write_text(first.replace("What is 3 + 1?", "What is 30 + 1?"))
        return load(*a, **k)
    monkeypatch.setattr(train, "load", load_and_edit)
    train.main(["--model", str(tiny_chat_model), "--out", str(out), "--data", str(data),
                *TINY_RUN, "--steps", "1"])
    monkeypatch.setattr(train, "load", load)
    recorded = json.loads((out / "args.json").read_text())["data_files"][str(data)]
    assert recorded == {"bytes": len(first.encode()),
                        "sha256": hashlib.sha256(first.encode()).hexdigest()}
    with pytest.raises(UserError, match=f"{data} differs from the file the run started with"):
        train.main(["--resume", str(out), "--steps", "2"])
    data.write_text(first)           # the file it trained on: the resume goes on
    train.main(["--resume", str(out), "--steps", "2"])
    assert steps_of(out) == [1, 2]


@pytest.mark.parametrize("flag", ["--out", "--resume", "--model", "--analysis"])
def test_an_empty_path_is_refused(tmp_path, flag, monkeypatch):
    """--out "$OUT" with OUT unset is --out "": it used to mean the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"{flag} '': an empty path"):
        train.main([flag, ""])
    assert list(tmp_path.iterdir()) == []


def test_a_model_path_that_is_a_link_loop_is_one_line(tmp_path):
    """pathlib raises RuntimeError, not OSError, for a link loop on Python < 3.13."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match="symbolic link loop"):
        train.main(["--model", str(tmp_path / "a"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_optimizer_state_is_another_models_is_skipped(tiny_chat_model, tmp_path,
                                                                         length_reward, capsys):
    """The weights, the optimizer state and the saved step of a checkpoint are checked against each
    other before any step: a trainer_state.pt of another model copied in used to load, and the
    first update failed mid-step with a traceback."""
    import torch
    from infra import cli
    out = tmp_path / "run"
    train.main(writer_argv("new", tiny_chat_model, out, 2))
    newest = out / "checkpoints" / "step_000002" / "trainer_state.pt"
    state = torch.load(newest, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 5)   # another model's shapes
    torch.save(state, newest)
    train.main(["--resume", str(out), "--steps", "3"])
    err = capsys.readouterr().err
    assert "skipping" in err and "step_000002" in err and "another model's" in err, err
    assert steps_of(out) == [1, 2, 3]      # continued from step 1, step 2 redone
    # the only checkpoint damaged the same way: one line, nothing written
    for name in ("step_000001", "step_000003"):
        shutil.rmtree(out / "checkpoints" / name, ignore_errors=True)
    torch.save({**state, "step": 2}, newest)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--resume", str(out), "--steps", "4"])
    assert str(e.value.code).startswith("error: --resume") and "no complete checkpoint" in str(
        e.value.code)
    assert (out / "metrics.jsonl").read_text() == before


def test_a_checkpoint_of_another_run_is_skipped(tiny_chat_model, tmp_path, length_reward, capsys):
    """A trainer_state.pt saved by a run with other arguments (here GRPO into a BuPO run) disagrees
    with the run's args.json: that checkpoint is skipped, the one before it resumed."""
    import torch
    out = tmp_path / "run"
    train.main(writer_argv("new", tiny_chat_model, out, 2))
    newest = out / "checkpoints" / "step_000002" / "trainer_state.pt"
    state = torch.load(newest, weights_only=True)
    torch.save({**state, "args": {**state["args"], "algo": "grpo"}}, newest)
    train.main(["--resume", str(out), "--steps", "3"])
    err = capsys.readouterr().err
    assert "skipping" in err and "saved with --algo grpo" in err and "another run's" in err, err
    assert steps_of(out) == [1, 2, 3]


def test_a_resume_maps_the_optimizer_state_instead_of_reading_it(tmp_path):
    """load_trainer_state memory-maps trainer_state.pt, so that the ranks of one node share one
    copy of the optimizer state (docs/scaling.md): while the state is held the file is among the
    process's mappings, its tensors equal what was saved, and changing them leaves the file as it
    was (copy-on-write)."""
    import torch

    from infra import runs
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    exp_avg = torch.randn(4096)
    torch.save({"step": 1, "args": {}, "internal_layer": 2,
                "optimizer": {"state": {0: {"exp_avg": exp_avg}}, "param_groups": []}},
               ckpt / "trainer_state.pt")
    state = runs.load_trainer_state(ckpt)
    assert str((ckpt / "trainer_state.pt").resolve()) in maps.read_text()
    held = state["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(held, exp_avg)
    held.add_(1.0)                       # as AdamW updates it in place
    again = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert torch.equal(again["optimizer"]["state"][0]["exp_avg"], exp_avg)


def test_a_state_that_cannot_be_mapped_is_read(tmp_path, monkeypatch):
    """Where the file system cannot memory-map trainer_state.pt, load_trainer_state reads it
    instead of calling the checkpoint unreadable."""
    import torch

    from infra import runs
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    torch.save({"step": 1, "args": {}, "internal_layer": 2,
                "optimizer": {"state": {}, "param_groups": []}}, ckpt / "trainer_state.pt")
    load = torch.load

    def no_mmap(*a, mmap=None, **k):
        if mmap:
            raise RuntimeError("mmap: operation not supported")
        return load(*a, **k)
    monkeypatch.setattr(torch, "load", no_mmap)
    assert runs.load_trainer_state(ckpt)["step"] == 1


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_trainer_state_is_unreadable_not_a_crash(tmp_path, damage):
    """A trainer_state.pt that is not a whole file (a copy cut short, another file's bytes) is a
    ValueError naming it unreadable, which resume turns into skipping that checkpoint; never a
    traceback, and never a crash later from a mapping of missing bytes."""
    import torch

    from infra import runs
    ckpt = tmp_path / "step_000001"
    ckpt.mkdir()
    f = ckpt / "trainer_state.pt"
    torch.save({"step": 1, "args": {}, "internal_layer": 2,
                "optimizer": {"state": {0: {"exp_avg": torch.randn(50_000)}},
                              "param_groups": []}}, f)
    whole = f.read_bytes()
    f.write_bytes({"garbage": b"not a checkpoint" * 100, "truncated": whole[:len(whole) // 2],
                   "empty": b""}[damage])
    with pytest.raises(ValueError, match="unreadable"):
        runs.load_trainer_state(ckpt)


@pytest.mark.parametrize("damage", ["args-not-json", "args-a-list", "metrics-not-utf8",
                                    "resumes-not-utf8"])
def test_a_damaged_record_of_the_run_does_not_stop_a_resume(tiny_chat_model, tmp_path,
                                                             length_reward, capsys, damage):
    """args.json, metrics.jsonl and resumes.jsonl are records a user may have edited or a disk may
    have damaged: a resume takes its arguments from the checkpoint, keeps every byte it cannot read
    (a broken metrics line goes to metrics.dropped.jsonl as it was) and goes on, with no
    traceback."""
    out = tmp_path / "run"
    train.main(writer_argv("new", tiny_chat_model, out, 2))
    bad = b"\xff\xfe not UTF-8 {"
    file, content = {"args-not-json": ("args.json", b"garbage\n"),
                     "args-a-list": ("args.json", b"[1, 2]\n"),
                     "metrics-not-utf8": ("metrics.jsonl", None),
                     "resumes-not-utf8": ("resumes.jsonl", bad)}[damage]
    if content is None:
        content = (out / file).read_bytes() + bad + b"\n"
    (out / file).write_bytes(content)
    train.main(["--resume", str(out), "--steps", "3"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [r["step"] for r in runs.read_metrics(out)] == [1, 2, 3]
    if file == "args.json":
        assert (out / file).read_bytes() == content and "args.json is not the JSON record" in err
    if file == "metrics.jsonl":
        assert (out / "metrics.dropped.jsonl").read_bytes() == bad + b"\n"
    if file == "resumes.jsonl":
        assert (out / file).read_bytes().startswith(bad + b"\n{")


@pytest.mark.parametrize("cut", ["removed", "first-line-only"])
def test_a_resume_says_which_steps_metrics_no_longer_holds(tiny_chat_model, tmp_path,
                                                           length_reward, capsys, cut):
    """A metrics.jsonl removed or cut by hand after its steps were written: the resume goes on
    (the checkpoint holds the run) and says which steps the records, hence the curves, lack."""
    out = tmp_path / "run"
    train.main(writer_argv("new", tiny_chat_model, out, 3))
    lines = (out / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    if cut == "removed":
        (out / "metrics.jsonl").unlink()
    else:
        (out / "metrics.jsonl").write_bytes(lines[0])
    capsys.readouterr()
    train.main(["--resume", str(out), "--steps", "4"])
    err = capsys.readouterr().err
    said = {"removed": "no record of steps 1-3", "first-line-only": "no record of steps 2-3"}[cut]
    assert said in err and "goes on from step 4" in err, err
    assert [r["step"] for r in runs.read_metrics(out)] == ([4] if cut == "removed" else [1, 4])


def test_resuming_a_checkpoint_folder_names_its_run(tiny_chat_model, tmp_path, length_reward):
    out = tmp_path / "run"
    train.main(writer_argv("new", tiny_chat_model, out, 2))
    ckpt = next((out / "checkpoints").glob("step_*"))
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--resume", str(ckpt), "--steps", "3"])
    assert e.value.code == (f"error: --resume {ckpt}: a checkpoint, not a run folder; pass its "
                            f"run, --resume {out} (a run goes on from its newest complete "
                            f"checkpoint)")


def test_spans():
    assert runs.spans([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8" and runs.spans([4]) == "4"


def test_the_code_record_names_what_differed_from_the_commit(tmp_path, monkeypatch):
    """args.json's `code`: the commit, and where the checkout was not clean, the paths that were
    not (a report written into a tracked folder makes a tree dirty without touching the code)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True,
                              text=True).stdout.strip()
    # git looks no higher than tmp_path, wherever the temporary folder lies
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert runs.code_version(tmp_path) == {"commit": None, "clean": None}   # not a checkout
    if shutil.which("git") is None:     # no git: the record says so, as just checked
        return
    git("init", "-q")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit",
        "-qm", "c")
    head = git("rev-parse", "HEAD")
    assert runs.code_version(tmp_path) == {"commit": head, "clean": True}
    (tmp_path / "train.py").write_text("print(2)\n")
    (tmp_path / "results.md").write_text("new\n")
    assert runs.code_version(tmp_path) == {"commit": head, "clean": False,
                                           "changed": ["train.py", "results.md"]}
    for i in range(25):
        (tmp_path / f"n{i:02d}.md").write_text("x\n")
    changed = runs.code_version(tmp_path)["changed"]
    assert len(changed) == 21 and changed[-1] == "... 7 more" and changed[0] == "train.py"


def test_the_end_of_phase_1_is_kept(tiny_chat_model, tmp_path):
    """--save-phase1-end: a checkpoint at step s_inter (BuPO's last phase-1 step) besides the
    newest ones, never pruned: what the analysis of what phase 1 changed reads."""
    import train
    out = tmp_path / "run"
    train.main(["--model", str(tiny_chat_model), "--out", str(out), *TINY_RUN, "--steps", "5",
                "--internal-steps", "2", "--save-every", "4", "--keep-checkpoints", "1",
                "--save-phase1-end"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002",
                                                                       "step_000005"]
    # a run that is phase 1 to its end: its last checkpoint is phase 1's end and counts among the
    # newest, so no older one is kept besides it (a 0.5B model's checkpoint is 7 GiB)
    out = tmp_path / "all-phase-1"
    train.main(["--model", str(tiny_chat_model), "--out", str(out), *TINY_RUN, "--steps", "4",
                "--internal-steps", "4", "--save-every", "2", "--keep-checkpoints", "1",
                "--save-phase1-end"])
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000004"]
