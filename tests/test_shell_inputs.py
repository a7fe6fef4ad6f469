"""What shells and launchers hand a tool: bytes that are not UTF-8, and the variables of a launcher
(torchrun) that is not there. One line and a non-zero exit, before anything is written."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import analyze
import chat
import train
from infra import cli

ROOT = Path(__file__).resolve().parents[1]


def parser_of(parse, monkeypatch) -> argparse.ArgumentParser:
    """The parser a tool's parse_args builds (captured as it parses an empty command line)."""
    seen = {}
    real = cli.Parser.parse_args

    def grab(self, args=None, namespace=None):
        seen["p"] = self
        return real(self, [], namespace)
    monkeypatch.setattr(cli.Parser, "parse_args", grab)
    parse([])
    monkeypatch.undo()
    return seen["p"]


def text_flags(p: argparse.ArgumentParser) -> list[str]:
    """Every flag that takes free text (a path, a prompt, a layer), not a number or a choice."""
    return [a.option_strings[-1] for a in p._actions
            if a.option_strings and a.nargs != 0 and a.type in (None, str) and not a.choices
            and not isinstance(a, argparse._HelpAction)]


def tool_parsers(monkeypatch):
    return {"train": train.build_parser(),
            "analyze": parser_of(analyze.parse_args, monkeypatch),
            "chat": parser_of(chat.parse_args, monkeypatch)}


def test_every_text_flag_refuses_bytes_that_are_not_utf8(monkeypatch):
    """A byte like 0xff reaches Python as a lone surrogate (\\udcff); every text flag of every tool
    refuses it in one line naming the flag (it used to reach the tokenizer: a TypeError)."""
    cases = 0
    for tool, p in tool_parsers(monkeypatch).items():
        for flag in text_flags(p):
            with pytest.raises(SystemExit) as e:
                p.parse_args([flag, "x\udcff"])
            msg = str(e.value.code)
            assert msg.startswith(f"error: {flag}: the value is not UTF-8") and "0xff" in msg, msg
            cases += 1
    assert cases >= 12, cases


def test_a_prompt_that_is_not_utf8_is_one_line_in_a_real_shell():
    r = subprocess.run([sys.executable, "chat.py", b"--prompt", b"hi \xff there"], cwd=ROOT,
                       capture_output=True)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "--prompt: the value is not UTF-8 text (byte 0xff at character 4)" in err, err


@pytest.mark.parametrize("env,fragment", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_PORT is not set"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE is 'two', not a number"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "RANK 2 is not a rank of WORLD_SIZE 2"),
    # everything a torchrun rank has, but no other rank: rank 0 waits, then says so
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
      "MASTER_PORT": "0", "BUPO_INIT_TIMEOUT_S": "2"}, "could not join the group"),
])
def test_a_launchers_variables_without_the_launcher(tiny_chat_model, tmp_path, env, fragment):
    """A plain `python train.py` in a shell that kept torchrun's (or a cluster script's) variables
    used to hang in the rendezvous or end in a traceback; nothing is written either way."""
    out = tmp_path / "run"
    clean = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "train.py", "--model", str(tiny_chat_model), "--out",
                        str(out), "--steps", "2", "--internal-steps", "1"], cwd=ROOT,
                       capture_output=True, text=True, env={**clean, **env}, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and fragment in r.stderr, r.stderr
    assert not out.exists()
