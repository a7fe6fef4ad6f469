"""Every bad checkpoint folder gives one clear line naming the file and the problem (see also
test_errors.py)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infra.errors import ModelLoadError
import analyze
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tiny_dirs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dirs["qwen2", False], d)
    return d


def rewrite(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors")


def expect(folder, *fragments, load=Transformer.from_pretrained):
    with pytest.raises(ModelLoadError) as e:
        load(folder)
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_missing_folder(tmp_path):
    expect(tmp_path / "nope", "no such model folder")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    expect(folder, "config.json", "missing")


def test_bad_json(folder):
    (folder / "config.json").write_text("{not json")
    expect(folder, "config.json", "not valid JSON")


def test_unsupported_model_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    expect(folder, "'gpt2' is not supported", "llama, qwen2, qwen3")


def test_unsupported_rope(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    yarn = {"rope_type": "yarn", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps({**cfg, "rope_scaling": yarn}))
    expect(folder, "rope_type 'yarn' is not supported")


def test_missing_tensor(folder):
    rewrite(folder, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    expect(folder, "'model.layers.1.mlp.up_proj.weight'", "missing")


def test_unexpected_tensor(folder):
    rewrite(folder, lambda sd: sd.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    expect(folder, "model.safetensors", "unexpected tensor 'model.layers.9.mlp.up_proj.weight'")


def test_wrong_shape(folder):
    rewrite(folder, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    expect(folder, "model.safetensors", "'model.norm.weight' has shape [65]", "[64]")


def test_truncated_file(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect(folder, "model.safetensors", "corrupt or truncated")


def test_garbage_file(folder):
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    expect(folder, "model.safetensors", "corrupt or truncated")


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    expect(folder, "no model.safetensors")


def test_pickle_checkpoint_is_refused(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    expect(folder, "pickle", "safetensors only")


def test_missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    expect(folder, "model-00002-of-00002.safetensors", "missing")


def test_cli_prints_one_line_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert (r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")
            and "Traceback" not in r.stderr)


WRONG_VALUES = ["false", "12", 1.5, True, -3, [], {}]


def _generated_config_cases():
    """Every field the loader reads, replaced by every value of a type it does not have (a case per
    pair)."""
    from infra.checkpoint import CONFIG_FIELDS
    for key, (_, ok, _) in CONFIG_FIELDS.items():
        for v in WRONG_VALUES:
            if not ok(v):
                yield key, v


@pytest.mark.parametrize("key,value", list(_generated_config_cases()))
def test_every_config_field_of_the_wrong_type_is_refused(folder, key, value):
    """A quoted "false" for tie_word_embeddings used to load another model than the one on disk
    (bool("false") is True); no field may be coerced."""
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
    expect(folder, "config.json", key, "must be")


def test_a_token_id_outside_the_vocabulary_is_refused(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [1, cfg["vocab_size"]]}))
    expect(folder, "config.json", f"token id {cfg['vocab_size']}", "outside the vocabulary")


@pytest.fixture
def paired(tiny_chat_model, tmp_path):
    """A copy of the tiny chat model: weights and the default model's tokenizer."""
    d = tmp_path / "pair"
    shutil.copytree(tiny_chat_model, d)
    return d


def load_pair(folder, *fragments):
    """expect(), through the loader of the tools: the weights and the tokenizer together."""
    expect(folder, *fragments, load=analyze.load)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(paired, tiny_dirs):
    """Weights of a 128-token vocabulary with a 49152-token tokenizer: ids past the embedding
    (an IndexError mid-rollout before) are refused when the folder is loaded."""
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dirs["llama", True] / name, paired / name)
    load_pair(paired, "tokenizer.json has 49152 tokens", "vocabulary has 128")


def test_an_eos_token_the_tokenizer_lacks_is_refused(paired):
    cfg = json.loads((paired / "tokenizer_config.json").read_text())
    (paired / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|nope|>"}))
    load_pair(paired, "tokenizer_config.json", "'<|nope|>' is not a token", "never stop")


def test_no_end_of_sequence_token_at_all_is_refused(tiny_dirs, tmp_path):
    """A word-level tokenizer with no end-of-turn token, and no eos_token_id anywhere."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    d = tmp_path / "no-eos"
    shutil.copytree(tiny_dirs["llama", True], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": None, "bos_token_id": None}))
    (d / "generation_config.json").unlink(missing_ok=True)
    HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(
        str(d / "tokenizer.json"))
    load_pair(d, "no end-of-sequence token", "never stop")
