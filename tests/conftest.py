"""Shared fixtures: tiny random HF checkpoints written by transformers, and the real default
model."""
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
ARCHS = ["llama", "qwen2", "qwen3"]


def make_hf_model(arch: str, tied: bool, seed: int = 0):
    """A tiny random transformers model of `arch` with non-trivial norm gains and biases."""
    import transformers as tf
    torch.manual_seed(seed)
    if arch == "llama":
        # llama3 rope scaling, with positions past original_max_position_embeddings in the tests
        cfg = tf.LlamaConfig(**TINY, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0,
                             tie_word_embeddings=tied)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY, tie_word_embeddings=tied))
    else:  # head_dim 32 != hidden / heads = 16, as in Qwen3-4B
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{(arch, tied): folder} saved by transformers' save_pretrained."""
    dirs = {}
    for arch in ARCHS:
        for tied in (True, False):
            d = tmp_path_factory.mktemp(f"{arch}-{'tied' if tied else 'untied'}")
            make_hf_model(arch, tied).save_pretrained(d)
            dirs[arch, tied] = d
    return dirs


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, default_model_dir):
    """A tiny random llama that speaks the default model's tokenizer, for train.py end to end."""
    import transformers as tf
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-chat")
    cfg = tf.LlamaConfig(**{**TINY, "vocab_size": 49152}, tie_word_embeddings=True, eos_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, d / name)
    return d


@pytest.fixture(scope="session")
def default_model_dir():
    from infra import weights
    return weights.ensure()
