"""Bad input never costs a traceback or data: every row of the table ends as one line `error: ...`
and a non-zero exit, and a refused run leaves the earlier run byte for byte as it was."""
import errno
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infra import cli
import tasks
from infra.errors import ModelLoadError
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]


def fails(tool: str, argv: list, *fragments):
    """Run `tool`.main through cli.run, as `python tool.py ARGV` does, and check the one-line
    error."""
    main = main_of(tool)
    with pytest.raises(SystemExit) as e:
        cli.run(main, [str(a) for a in argv])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def main_of(tool: str):
    """The main() of a tool at the root ("train") or of a script in a folder
    ("experiments/report")."""
    if "/" not in tool:
        return importlib.import_module(tool).main
    path = Path(__file__).resolve().parents[1] / f"{tool}.py"
    if str(path.parent) not in sys.path:
        # bench_train imports bench_rollout by name
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# -----------------------------------------------------------------------------
# the table: (tool, arguments, what the line must say); {tmp} is a scratch folder, {model} the tiny
# chat model

ROWS = [
    # train.py: counts, ranges, choices, paths, devices
    ("train", ["--steps", "0"], "--steps 0: must be at least 1"),
    ("train", ["--steps", "x"], "argument --steps: invalid int value"),
    ("train", ["--group-size", "0"], "--group-size 0"),
    ("train", ["--mini-batches", "0"], "--mini-batches 0"),
    ("train", ["--eval-batch", "-1"], "--eval-batch -1: must be 0 or more"),
    ("train", ["--micro-batch-size", "0"], "--micro-batch-size 0"),
    ("train", ["--prompts-per-step", "-1"], "--prompts-per-step -1"),
    ("train", ["--save-every", "0"], "--save-every 0"),
    ("train", ["--keep-checkpoints", "0"], "--keep-checkpoints 0"),
    ("train", ["--max-new-tokens", "0"], "--max-new-tokens 0"),
    ("train", ["--eval-problems", "0"], "--eval-problems 0"),
    ("train", ["--eval-samples", "0"], "--eval-samples 0"),
    ("train", ["--eval-every", "-1"], "--eval-every -1: must be 0 or more"),
    ("train", ["--internal-steps", "-2"], "--internal-steps -2"),
    ("train", ["--seed", "-1"], "--seed -1"),
    ("train", ["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    ("train", ["--lr", "nan"], "--lr nan"),
    # a typo for 1e-9: AdamW's decay would scale every weight by 1 - 1e7 per update
    ("train", ["--lr", "1e9"], "--lr 1e+09: a learning rate of 1 or more", "below 1"),
    ("train", ["--lr", "1"], "--lr 1: a learning rate of 1 or more"),
    # a run never writes into, over or around its inputs
    ("train", ["--model", "{model}", "--out", "{model}"], "is the run's input --model"),
    ("train", ["--model", "{model}", "--out", "{model}/run"], "is inside the run's input --model"),
    ("train", ["--model", "{model}", "--out", "{tmp}", "--data", "{tmp}/long.jsonl"],
     "holds the run's input --data"),
    ("train", ["--lr=-1e-5"], "--lr -1e-05"),
    # a comma list that names no file would silently evaluate on no benchmark
    ("train", ["--eval-data", ","], "--eval-data ',': names no file"),
    ("train", ["--eval-data", " , "], "--eval-data ' , ': names no file"),
    ("train", ["--temperature", "0"], "--temperature 0.0", "NaN"),
    ("train", ["--temperature", "inf"], "--temperature inf"),
    ("train", ["--clip-low", "1.5"], "--clip-low 1.5"),
    ("train", ["--clip-high", "-0.1"], "--clip-high -0.1"),
    ("train", ["--dual-clip", "0.5"], "--dual-clip 0.5: must be 0 (off) or a finite number > 1"),
    ("train", ["--grad-clip", "0"], "--grad-clip 0.0"),
    ("train", ["--weight-decay", "nan"], "--weight-decay nan"),
    ("train", ["--kl-coef", "-0.1"], "--kl-coef -0.1"),
    ("train", ["--prompts-per-step", "6", "--mini-batches", "4"], "multiple of --mini-batches 4"),
    ("train", ["--internal-layer", "top"],
     "--internal-layer 'top': must be auto or a layer number"),
    ("train", ["--group-size", "1", "--advantage", "rloo"], "--group-size 1 with --advantage rloo"),
    ("train", ["--algo", "ppo"], "argument --algo: invalid choice"),
    ("train", ["--task", "calculus"], "argument --task: invalid choice"),
    ("train", ["--device", "banana"], "--device 'banana': not a device name"),
    ("train", ["--device", "cuda:7"], "--device cuda:7"),
    ("train", ["--analysis", "{tmp}/none.json"], "--analysis", "no such file"),
    ("train", ["--model", "{tmp}/no-model", "--out", "{tmp}/o1"], "no-model: no such model folder"),
    ("train", ["--model", "{model}", "--out", "{tmp}/file.txt"],
     "file.txt: exists and is not a folder"),
    ("train", ["--model", "{model}", "--out", "{tmp}/file.txt/run"], "cannot write there",
     "file.txt is a file"),
    ("train", ["--model", "{model}", "--out", "{tmp}/o2", "--internal-layer", "9"],
     "--internal-layer 9: this model "
     "has layers 1..3"),
    ("train", ["--model", "{model}", "--out", "{tmp}/o3", "--analysis", "{tmp}/file.txt"],
     "not a readable entropy.json"),
    ("train", ["--model", "{model}", "--out", "{tmp}/o6", "--analysis", "{tmp}/no-dh.json"],
     "--analysis",
     "not an entropy.json of analyze.py", "dH_mlp"),
    ("train", ["--model", "{model}", "--out", "{tmp}/o4", "--analysis", "{tmp}/normed.json"],
     "--norm final",
     "analyse again without --norm"),
    ("train", ["--model", "{model}", "--out", "{tmp}/o5", "--max-new-tokens", "300"],
     "the longest add prompt (",
     "exceed the model's context of 256 tokens; lower --max-new-tokens to at most"),
    ("train", ["--resume", "{tmp}/no-run"], "--resume", "no such run folder"),
    ("train", ["--resume", "{tmp}"], "no complete checkpoint"),
    # analyze.py
    ("analyze", ["-n", "0"], "--num-responses 0"),
    ("analyze", ["--max-new-tokens", "0"], "--max-new-tokens 0"),
    ("analyze", ["--max-tokens", "0"], "--max-tokens 0"),
    ("analyze", ["--responses", "{tmp}/none.jsonl"], "--responses", "no such file"),
    ("analyze", ["--compare", "{tmp}/file.txt"], "--compare", "not a readable entropy.json"),
    ("analyze", ["--device", "cuda:9"], "--device cuda:9"),
    ("analyze", ["--out", "{tmp}/file.txt"], "file.txt: exists and is not a folder"),
    ("analyze", ["--norm", "layer"], "argument --norm: invalid choice"),
    # a run folder or an analysis folder where a file of them is meant: named
    ("analyze", ["--out", "{tmp}/a7", "--against", "{tmp}/run"],
     "/run: a run folder, not a model folder; pass one of its checkpoints, e.g. the newest, ",
     "/run/checkpoints/step_000004"),
    ("chat", ["--model", "{tmp}/run"], "/run: a run folder, not a model folder"),
    # a run and an analysis each in a folder of their own (report.py reads a folder as one of them)
    ("analyze", ["--out", "{tmp}/run"], "/run: holds a training run (checkpoints); an analysis "
     "goes into a folder of its own"),
    ("analyze", ["--out", "{tmp}/run", "--overwrite"], "/run: holds a training run"),
    ("train", ["--out", "{tmp}/analysis"], "/analysis: holds an analysis of analyze.py "
     "(entropy.json); a run goes into a folder of its own"),
    ("train", ["--out", "{tmp}/analysis", "--overwrite"], "/analysis: holds an analysis"),
    ("train", ["--model", "{tmp}/run", "--out", "{tmp}/t9"], "/run: a run folder"),
    ("analyze", ["--out", "{tmp}/a7", "--compare", "{tmp}/analysis"],
     "/analysis: an analysis folder; pass its file, --compare ", "/analysis/entropy.json"),
    ("analyze", ["--model", "{model}", "--out", "{tmp}/a6", "--max-new-tokens", "100",
                 "--max-tokens", "20"], "exceed --max-tokens", "shorten the prompt, or raise "
     "--max-tokens"),
    ("analyze", ["--model", "{model}", "--out", "{tmp}/a6", "--max-new-tokens", "300"],
     "the longest word prompt (",
     "exceed --max-tokens (at most the model's context) of 256 tokens"),
    ("analyze", ["--model", "{model}", "--out", "{tmp}/a1", "--responses", "{tmp}/bool.jsonl"],
     "bool.jsonl:2:",
     "integer token ids"),
    ("analyze", ["--model", "{model}", "--out", "{tmp}/a2", "--responses", "{tmp}/float.jsonl"],
     "float.jsonl:1:"),
    ("analyze", ["--model", "{model}", "--out", "{tmp}/a3", "--responses", "{tmp}/vocab.jsonl"],
     "vocab.jsonl:1:",
     "out of range"),
    ("analyze",
     ["--model", "{model}", "--out", "{tmp}/a4", "--responses", "{tmp}/long.jsonl", "--max-tokens",
      "64"],
     "long.jsonl:1:", "more than 64"),
    ("analyze", ["--model", "{model}", "--out", "{tmp}/a5", "--responses", "{tmp}/file.txt"],
     "file.txt:1: not valid JSON"),
    # chat.py: the sampler flags
    ("chat", ["-G", "0"], "--group-size 0"),
    ("chat", ["--model", "{model}", "--max-new-tokens", "300"],
     "exceed the model's context of 256 tokens"),
    ("chat", ["--max-new-tokens", "0"], "--max-new-tokens 0"),
    ("chat", ["--temperature", "-1"], "--temperature -1.0"),
    ("chat", ["--top-k", "-1"], "--top-k -1"),
    ("chat", ["--top-p", "0"], "--top-p 0.0: must be a finite number > 0 and <= 1"),
    ("chat", ["--top-p", "1.5"], "--top-p 1.5"),
    ("chat", ["--min-p", "-0.1"], "--min-p -0.1"),
    ("chat", ["--min-p", "2"], "--min-p 2.0"),
    ("chat", ["--dtype", "int8"], "argument --dtype: invalid choice"),
    ("chat", ["--model", "{tmp}/file.txt"], "file.txt: is a file, not a model folder"),
    ("chat", ["--temperature", "nan"], "--temperature nan"),
    ("chat", ["--prompt", ""], "--prompt is empty"),
    ("chat", ["--model", "{tmp}/no-model"], "no-model: no such model folder"),
    ("chat", ["--model", "{model}", "--max-new-tokens", "100000"], "exceed the model's context"),
    # the experiment and benchmark scripts
    ("experiments/report", ["--runs", "{tmp}/none"], "--runs", "no such folder",
     "experiments/run.sh"),
    ("experiments/report", ["--runs", "{tmp}", "--out", "{tmp}/file.txt"], "--out",
     "file.txt: exists and is not a folder"),
    ("experiments/report", ["--runs", "{tmp}/analysis/..", "--out", "{tmp}/rep"],
     "/entropy.json: lacks num_tokens, H_policy, boundary_layer, layers[0].H_resid"),
    ("experiments/report", ["--runs", "{tmp}/run", "--out", "{tmp}/rep"], "/run: holds no run or "
     "analysis of experiments/run.sh"),
    ("experiments/report", ["--cost", "{tmp}/none"], "--cost", "no such folder",
     "experiments/cost.sh"),
    ("experiments/layer_rule", ["--seeds", "-1"], "--seeds -1: seeds must be 0 or more"),
    ("experiments/layer_rule", ["--seeds", "x"], "argument --seeds: invalid int value"),
    ("experiments/layer_rule", ["--model", "{model}", "--out", "{tmp}"], "--out",
     "is a folder; pass a file path"),
    ("experiments/calibrate", ["--problems", "0"], "--problems 0: must be at least 1"),
    ("experiments/calibrate",
     ["--model", "{model}", "--out", "{tmp}/c.md", "--max-new-tokens", "300"],
     "the longest add prompt (", "exceed the model's context of 256 tokens"),
    ("experiments/calibrate", ["--model", "{model}", "--out", "{tmp}/file.txt/c.md"], "its folder",
     "not a folder"),
    ("bench/bench_rollout", ["--prompts", "9"], "--prompts 9", "at most 8"),
    ("bench/bench_rollout", ["--dtype", "float32,fp8"], "--dtype 'fp8': not a dtype"),
    ("bench/bench_train", ["--rows", "0"], "--rows 0: must be at least 1"),
    ("bench/bench_train", ["--peak-tflops", "-1"], "--peak-tflops -1.0"),
    ("bench/gpu_check", ["--device", "tpu9"], "--device 'tpu9'"),
    ("bench/bench_trl", ["--trl", "on,on"], "--trl on,on: name on, off or on,off"),
    ("bench/bench_trl", ["--steps", "0"], "--steps 0: must be at least 1"),
    ("bench/memory_check", [], "--report FILE is missing"),
    ("bench/memory_check", ["--report", "--steps", "1"], "--report FILE is missing"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, tiny_chat_model):
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "file.txt").write_text("not json\n")
    (d / "bool.jsonl").write_text('{"prompt_ids": [1, 2], "response_ids": [3]}\n'
                                  '{"prompt_ids": [1, true], "response_ids": [3]}\n')
    (d / "float.jsonl").write_text('{"prompt_ids": [1, 2.5], "response_ids": [3]}\n')
    (d / "vocab.jsonl").write_text('{"prompt_ids": [1, 2], "response_ids": [49152]}\n')
    three = [{"layer": l, "dH_mlp": -0.1} for l in (1, 2, 3)]
    (d / "normed.json").write_text(json.dumps({"num_layers": 3, "layers": three,
                                               "internal_layer": 2, "norm": "final"}))
    (d / "no-dh.json").write_text(json.dumps({"num_layers": 3, "layers": [{"layer": 1}] * 3,
                                              "internal_layer": 2}))
    for step in (2, 4):
        (d / "run" / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    (d / "analysis").mkdir()
    (d / "analysis" / "entropy.json").write_text(json.dumps({"num_layers": 3, "layers": three}))
    long = {"prompt_ids": [1] * 40, "response_ids": [2] * 40}
    (d / "long.jsonl").write_text(json.dumps(long) + "\n")
    return d


@pytest.mark.parametrize("tool,argv,fragments", [(r[0], r[1], r[2:]) for r in ROWS],
                         ids=[f"{r[0]} {' '.join(r[1])}"[:60] for r in ROWS])
def test_bad_input_is_one_line(scratch, tiny_chat_model, tool, argv, fragments):
    if "cuda" in " ".join(argv) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    argv = [a.replace("{tmp}", str(scratch)).replace("{model}", str(tiny_chat_model)) for a in argv]
    before = sorted(scratch.rglob("*"))
    fails(tool, argv, *fragments)
    # refused before anything was written: not even an empty folder
    assert sorted(scratch.rglob("*")) == before


def test_analyze_overwrite_never_moves_the_working_folder(scratch, monkeypatch):
    monkeypatch.chdir(scratch / "analysis")
    before = sorted(scratch.rglob("*"))
    fails("analyze", ["--out", ".", "--overwrite"], "--out .: --overwrite would move the folder "
          "you are working in")
    assert sorted(scratch.rglob("*")) == before


def test_enough_rows():
    tools = {"train", "analyze", "chat", "experiments/report", "bench/bench_train"}
    assert len(ROWS) >= 40 and {r[0] for r in ROWS} >= tools


def test_missing_gpu_is_not_called_a_corrupt_file(tiny_chat_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails("chat", ["--model", tiny_chat_model, "--device", "cuda"], "sees no CUDA GPU",
          "--device cpu")
    with pytest.raises(ModelLoadError, match="not usable here"):   # the loader alone says the same
        Transformer.from_pretrained(tiny_chat_model, device="cuda")


@pytest.mark.parametrize("tool,arg",
                         [("train.py", "--steps=0"), ("analyze.py", "-n=0"),
                          ("chat.py", "--top-p=2"),
                                      ("chat.py", "--max-new-tokens=-3")])
def test_real_command_lines(tool, arg):
    """The scripts themselves, in a process of their own: exit code 1 or 2, one line on stderr, no
    traceback."""
    r = subprocess.run([sys.executable, str(ROOT / tool), arg], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode in (1, 2) and r.stdout == ""
    one_line = r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert one_line and "Traceback" not in r.stderr, r.stderr


def test_ctrl_c_is_one_line(capsys):
    def main(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run(main, [])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "interrupted" in err


@pytest.mark.parametrize("error",
                         [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. "
                                                "DefaultCPUAllocator: can't allocate memory: you "
                                                "tried to allocate 31457280000 bytes.")])
def test_out_of_memory_is_one_line(capsys, error):
    def main(argv):
        raise error
    with pytest.raises(SystemExit) as e:
        cli.run(main, [])
    assert str(e.value.code).startswith("error: out of memory (") and "\n" not in str(e.value.code)
    assert "--resume" in str(e.value.code)


def test_other_runtime_errors_are_not_hidden():
    def main(argv):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(main, [])


# -----------------------------------------------------------------------------
# model folders: what is wrong is said, in one line naming the file

@pytest.fixture
def folder(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama", False], d)
    return d


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def expect(folder, *fragments):
    with pytest.raises(ModelLoadError) as e:
        Transformer.from_pretrained(folder)
    assert "\n" not in str(e.value)
    for f in fragments:
        assert f in str(e.value), str(e.value)


@pytest.mark.parametrize("changes,fragment", [
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"vocab_size": "big"}, "vocab_size must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"hidden_size": True}, "hidden_size must be a positive integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"head_dim": 15}, "head_dim 15 even"),
    ({"model_type": ["llama"]}, "is not supported"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "llama3 rope scaling needs")])
def test_bad_config_values(folder, changes, fragment):
    edit_config(folder, **changes)
    expect(folder, "config.json", fragment)


def test_config_not_an_object(folder):
    (folder / "config.json").write_text("[1, 2]")
    expect(folder, "config.json", "must hold a JSON object")


def test_index_weight_map_shape(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"weight_map": ["model-00001-of-00001.safetensors"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expect(folder, "model.safetensors.index.json", "weight_map must be an object")


def test_integer_and_bool_tensors_are_refused(folder):
    for dtype in (torch.int32, torch.bool):
        sd = load_file(folder / "model.safetensors")
        sd["model.norm.weight"] = sd["model.norm.weight"].to(dtype)
        save_file(sd, folder / "model.safetensors")
        expect(folder, "'model.norm.weight'", "must be floating point")


def test_non_finite_weights_are_refused(folder):
    sd = load_file(folder / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(sd, folder / "model.safetensors")
    expect(folder, "'model.layers.1.mlp.up_proj.weight'", "NaN or inf")


def test_path_problems_have_their_own_messages(folder, tmp_path):
    expect(folder / "config.json", "is a file, not a model folder")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    expect(loop, "symbolic link loop")
    if os.geteuid() != 0:   # root reads everything, so permissions cannot be tested as root
        (folder / "model.safetensors").chmod(0)
        expect(folder, "model.safetensors", "cannot be read")


def test_chat_template_errors_name_the_folder(tiny_chat_model, tmp_path):
    from tokenizer import Tokenizer
    d = tmp_path / "t"
    shutil.copytree(tiny_chat_model, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    broken = {**cfg, "chat_template": "{% for m in messages %}{{ m"}
    (d / "tokenizer_config.json").write_text(json.dumps(broken))
    with pytest.raises(ModelLoadError, match=f"{d}: the chat template is not valid Jinja"):
        Tokenizer(d)
    for template, fragment in (("{{ raise_exception('roles must alternate') }}",
                                "roles must alternate"),
                               ("{{ messages.__class__.__mro__ }}", "chat template failed"),
                               ("{{ messages[0].content.upper(1, 2, 3) }}",
                                "chat template failed")):
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
        with pytest.raises(ModelLoadError) as e:
            Tokenizer(d).encode_chat([{"role": "user", "content": "hi"}])
        msg = str(e.value)
        assert str(d) in msg and fragment in msg and "\n" not in msg, msg


# -----------------------------------------------------------------------------
# the run folder: nothing of an earlier run is ever lost

@pytest.fixture
def length_reward(monkeypatch):
    monkeypatch.setattr(tasks, "reward", lambda text, answer: float(len(text) % 2))


TINY_RUN = ["--prompts-per-step", "2", "--group-size", "4", "--mini-batches", "2",
            "--micro-batch-size", "2",
            "--max-new-tokens", "6", "--eval-problems", "2", "--eval-samples", "2", "--lr", "1e-3",
            "--internal-layer", "2", "--internal-steps", "1", "--eval-every", "0"]


def train_run(model, out, *extra):
    import train
    train.main(["--model", str(model), "--out", str(out), *TINY_RUN, *extra])
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def earlier_run(tiny_chat_model, tmp_path, length_reward):
    out = tmp_path / "run"
    train_run(tiny_chat_model, out, "--steps", "2", "--save-every", "1")
    return out


def test_fresh_run_into_a_run_folder_is_refused(tiny_chat_model, earlier_run):
    before = snapshot(earlier_run)
    fails("train", ["--model", tiny_chat_model, "--out", earlier_run, *TINY_RUN, "--steps", "3"],
          "already holds a run", f"--resume {earlier_run}", "--overwrite")
    assert snapshot(earlier_run) == before


def test_overwrite_moves_the_earlier_run_aside(tiny_chat_model, earlier_run):
    before = snapshot(earlier_run)
    rows = train_run(tiny_chat_model, earlier_run, "--steps", "1", "--overwrite")
    assert [r["step"] for r in rows] == [1]
    aside = [p for p in earlier_run.parent.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before


@pytest.mark.parametrize("where", ["the run", "inside it", "home"])
def test_overwrite_never_moves_the_working_or_home_folder(tiny_chat_model, earlier_run,
                                                          monkeypatch, where):
    """--out . --overwrite, run from inside the run folder (or with the run folder as $HOME):
    moving it aside would move the user's shell (or home) with it; refused, nothing moved."""
    before = snapshot(earlier_run)
    if where == "home":
        monkeypatch.setenv("HOME", str(earlier_run))
    else:
        monkeypatch.chdir(earlier_run / "checkpoints" if where == "inside it" else earlier_run)
    fails("train", ["--model", tiny_chat_model, "--out", earlier_run, *TINY_RUN, "--steps", "1",
                    "--overwrite"], "--overwrite would move",
          "your home folder" if where == "home" else "the folder you are working in",
          "a folder of its own")
    assert snapshot(earlier_run) == before
    assert not list(earlier_run.parent.glob("run.old-*"))


@pytest.mark.parametrize("flags,fragment",
                         [(["--lr", "0.5"], "--lr 0.5 differs from the resumed run's 0.001"),
                                            (["--algo", "grpo"], "--algo grpo differs"),
                                            (["--out", "elsewhere"],
                                             "a resumed run writes into its own folder"),
                                            (["--overwrite"], "--overwrite with --resume"),
                                            (["--steps", "2"], "already at step 2 of 2")])
def test_resume_refuses_flags_it_would_ignore(earlier_run, flags, fragment):
    before = snapshot(earlier_run)
    fails("train", ["--resume", earlier_run, *flags], fragment)
    assert snapshot(earlier_run) == before


def test_resume_skips_a_damaged_newest_checkpoint_and_repairs_metrics(earlier_run, capsys):
    ckpt = earlier_run / "checkpoints"
    data = (ckpt / "step_000002" / "model.safetensors").read_bytes()
    (ckpt / "step_000002" / "model.safetensors").write_bytes(data[: len(data) // 2])   # damaged
    # a write cut by a crash
    (ckpt / ".step_000003.tmp").mkdir()
    with open(earlier_run / "metrics.jsonl", "a") as f:
        # a line cut mid-write
        f.write('{"step": 3, "rew')
    import train
    train.main(["--resume", str(earlier_run), "--steps", "3"])
    err = capsys.readouterr().err
    assert "skipping" in err and "step_000002" in err and "resuming" in err and "step_000001" in err
    rows = [json.loads(x) for x in (earlier_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not (ckpt / ".step_000003.tmp").exists() and (ckpt / "step_000003").is_dir()
    # cut from metrics.jsonl, not lost
    dropped = (earlier_run / "metrics.dropped.jsonl").read_text().splitlines()
    assert json.loads(dropped[0])["step"] == 2 and dropped[1] == '{"step": 3, "rew'


def test_disk_full_during_a_checkpoint(tiny_chat_model, tmp_path, length_reward, monkeypatch):
    import safetensors.torch
    out = tmp_path / "full"
    real = safetensors.torch.save_file
    calls = []

    def full_on_second(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", full_on_second)
    msg = fails("train",
                ["--model", tiny_chat_model, "--out", out, *TINY_RUN, "--steps", "2",
                 "--save-every", "1"],
                "step_000002 failed", "no space left", "step_000001", "--resume")
    assert "free some disk space" in msg
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    # no temporary folder left behind
    assert names == ["step_000001"]


def test_non_finite_update_is_skipped_and_never_saved(tiny_chat_model, tmp_path, length_reward,
                                                      monkeypatch):
    import bupo
    real = bupo.aggregate
    n = []

    def poisoned(*a, **k):   # the first mini-batch of every step has a NaN loss
        n.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(n) % 2 == 1 else loss
    monkeypatch.setattr(bupo, "aggregate", poisoned)
    rows = train_run(tiny_chat_model, tmp_path / "nan", "--steps", "2", "--micro-batch-size", "4")
    assert [r["skipped_steps"] for r in rows] == [1, 1]
    w = load_file(tmp_path / "nan" / "checkpoints" / "step_000002" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in w.values())
    w0 = load_file(Path(tiny_chat_model) / "model.safetensors")
    # the finite updates were applied
    assert any(not torch.equal(w[k], w0[k]) for k in w0)


def test_non_finite_weights_are_never_written(tiny_dirs, tmp_path):
    from infra.errors import UserError
    model = Transformer.from_pretrained(tiny_dirs["qwen3", True])
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="holds NaN or inf"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.tmp").exists()


def test_an_exploding_model_stops_the_run_and_keeps_the_last_healthy_checkpoint(
        tiny_chat_model, tmp_path, length_reward, monkeypatch):
    """From step 2 on, each update scales every weight by 1e7 (AdamW's decay at --lr 1e9 does):
    the weights stay finite, the logits do not. The run stops at step 2 in one line, saves nothing
    of it, and step 1's checkpoint, the last healthy one, stays (--keep-checkpoints 1)."""
    from infra import runs
    real, calls = torch.optim.AdamW.step, []

    def exploding(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) > 2:       # step 1's two updates are plain
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.mul_(-1e7)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", exploding)
    out = tmp_path / "run"
    msg = fails("train", ["--model", tiny_chat_model, "--out", out, *TINY_RUN, "--steps", "3",
                          "--save-every", "1", "--keep-checkpoints", "1"],
                "step 2: the weights or logits are no longer finite", "--lr 0.001",
                "step_000001")
    assert len(msg) <= 300 + len(str(out)), msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]
    w = load_file(out / "checkpoints" / "step_000001" / "model.safetensors")
    assert all(torch.isfinite(t).all() and t.abs().max() < 100 for t in w.values())
    assert runs.newest(out / "checkpoints").name == "step_000001"
