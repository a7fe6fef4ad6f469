"""
HF-layout checkpoint folders on disk: config.json + model.safetensors (or a sharded
model.safetensors.index.json), read and written safely. model.py's from_pretrained / save_pretrained
call these.

Reading checks everything before a weight is used, and says what is wrong in one line naming the
file: a folder that is missing, a file, a symbolic-link loop or unreadable; a device that is not
there; a config.json or index that is not a JSON object; a shard that is missing; a truncated or
corrupt safetensors file; an unexpected, misshapen, non-float (integer, bool) or non-finite tensor.
Pickle checkpoints (.bin/.pt) are refused: loading a pickle can run code. Writing goes to a
temporary folder that is renamed into place, and is removed on failure.
"""
import json
import math
import shutil
from pathlib import Path

import torch

from infra.errors import ModelLoadError, UserError, first_line
from infra.files import replace_dir

FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}  # safetensors dtype codes a weight may have
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja",
                   "special_tokens_map.json")




def model_folder(path, device="cpu") -> Path:
    """The folder `path` resolved, after checking it and the device; else a ModelLoadError saying
    what is wrong."""
    path = Path(path)
    try:
        path = path.resolve(strict=True)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no such model folder; pass a folder with config.json and "
                             f"*.safetensors") from None
    except (RuntimeError, OSError) as e:
        # a symlink loop (RuntimeError before Python 3.13), permissions
        why = "a symbolic link loop" if isinstance(e, RuntimeError) or e.errno == 40 else e.strerror
        raise ModelLoadError(f"{path}: cannot open the model folder ({why})") from None
    if not path.is_dir():
        raise ModelLoadError(f"{path}: is a file, not a model folder; pass the folder that holds "
                             f"config.json")
    try:
        next(path.iterdir(), None)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot list the model folder ({e.strerror}); check its "
                             f"permissions") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ModelLoadError(f"device {str(device)!r} is not usable here "
                             f"({first_line(e, None)}); use --device cpu") from None
    return path


def read_json(file: Path) -> dict:
    if not file.exists():
        ckpts = sorted(file.parent.glob("checkpoints/step_*"))
        if ckpts:           # a train.py run folder: its weights are in its checkpoints
            raise ModelLoadError(f"{file.parent}: a run folder, not a model folder; pass one of "
                                 f"its checkpoints, e.g. the newest, {ckpts[-1]}")
        raise ModelLoadError(f"{file}: missing; a model folder needs config.json next to its "
                             f"*.safetensors")
    try:
        d = json.loads(file.read_text())
    except OSError as e:
        raise ModelLoadError(f"{file}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{file}: must hold a JSON object, not a {type(d).__name__}")
    return d


# -----------------------------------------------------------------------------
# config.json: every field the loader reads, with its type and range. A value of another type is
# refused, never coerced: bool("false") is True, so a quoted "false" would silently load another
# model than the one on disk.

def _int(lo):
    return lambda v: type(v) is int and v >= lo


def _number(v):
    return type(v) in (int, float) and 0 < v < math.inf


def _bool(v):
    return type(v) is bool


def _ids(v):   # a token id, or (eos) a list of them
    return _int(0)(v) or (isinstance(v, list) and len(v) > 0 and all(_int(0)(x) for x in v))


# field: (required, check of a non-null value, what it must be); model_type is checked on its own
CONFIG_FIELDS = {
    "vocab_size": (True, _int(1), "a positive integer"),
    "hidden_size": (True, _int(1), "a positive integer"),
    "intermediate_size": (True, _int(1), "a positive integer"),
    "num_hidden_layers": (True, _int(1), "a positive integer"),
    "num_attention_heads": (True, _int(1), "a positive integer"),
    "num_key_value_heads": (False, _int(1), "a positive integer"),
    "head_dim": (False, _int(1), "a positive integer"),
    "max_position_embeddings": (False, _int(1), "a positive integer"),
    "rope_theta": (False, _number, "a positive number"),
    "rms_norm_eps": (False, _number, "a positive number"),
    "rope_scaling": (False, lambda v: isinstance(v, dict), "an object"),
    "rope_parameters": (False, lambda v: isinstance(v, dict), "an object"),
    "tie_word_embeddings": (False, _bool, "true or false"),
    "attention_bias": (False, _bool, "true or false"),
    "mlp_bias": (False, _bool, "true or false"),
    "use_sliding_window": (False, _bool, "true or false"),
    "hidden_act": (False, lambda v: isinstance(v, str), "a string"),
    "bos_token_id": (False, _int(0), "a token id (an integer >= 0)"),
    "eos_token_id": (False, _ids, "a token id or a list of token ids"),
}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope_type(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))


def check_config(d: dict, where: str, architectures) -> None:
    """Refuse, in one line naming the field, a config.json that this loader would misread: a missing
    required field, a value of the wrong type or out of range (CONFIG_FIELDS), or an architecture it
    does not implement."""
    mt = d.get("model_type")                                  # first: it says which fields apply
    if not isinstance(mt, str) or mt not in architectures:
        raise ModelLoadError(f"{where}: model_type {mt!r} is not supported; supported: "
                             f"{', '.join(architectures)}")
    for key, (required, ok, what) in CONFIG_FIELDS.items():
        v = d.get(key)
        if v is None and required:
            raise ModelLoadError(f"{where}: required field {key!r} is missing")
        if v is not None and not ok(v):
            raise ModelLoadError(f"{where}: {key} must be {what}, not {json.dumps(v)}")
    if d.get("use_sliding_window"):
        raise ModelLoadError(f"{where}: sliding-window attention is not supported; set "
                             f"use_sliding_window to false")
    if d.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{where}: hidden_act {d['hidden_act']!r} is not supported; only silu "
                             f"(SwiGLU)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta")
    if theta is not None and not _number(theta):
        raise ModelLoadError(f"{where}: rope_theta must be a positive number, not "
                             f"{json.dumps(theta)}")
    if rope_type(rope) not in ("default", "llama3"):
        raise ModelLoadError(f"{where}: rope_type {rope_type(rope)!r} is not supported; supported: "
                             f"default, llama3")
    if rope_type(rope) == "llama3" and not all(_number(rope.get(k)) for k in LLAMA3_KEYS):
        raise ModelLoadError(f"{where}: llama3 rope scaling needs positive numbers "
                             f"{', '.join(LLAMA3_KEYS)}")
    heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    if heads % kv or head_dim % 2 or (not d.get("head_dim") and d["hidden_size"] % heads):
        raise ModelLoadError(f"{where}: num_attention_heads {heads} must be a multiple of "
                             f"num_key_value_heads {kv}, and head_dim {head_dim} even (hidden_size "
                             f"{d['hidden_size']} / heads when head_dim is not given)")
    ids = [d.get("bos_token_id")] + (d.get("eos_token_id")
                                     if isinstance(d.get("eos_token_id"), list)
                                      else [d.get("eos_token_id")])
    bad = [i for i in ids if i is not None and i >= d["vocab_size"]]
    if bad:
        raise ModelLoadError(f"{where}: token id {bad[0]} (bos/eos_token_id) is outside the "
                             f"vocabulary of vocab_size {d['vocab_size']}; fix the id or the "
                             f"vocab_size")


def config_fields(d: dict, where: str, architectures) -> dict:
    """model.Config's fields from a transformers config.json (4.x `rope_scaling` or 5.x
    `rope_parameters` style), after check_config has checked every field read here."""
    check_config(d, where, architectures)
    mt, rope = d["model_type"], d.get("rope_parameters") or d.get("rope_scaling") or {}
    heads = d["num_attention_heads"]
    attention_bias = d.get("attention_bias") or False
    return dict(
        model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=float(d.get("rms_norm_eps") or 1e-6),
        rope_theta=float(d.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"}
        if rope_type(rope) == "llama3"
        else None,
        max_position_embeddings=d.get("max_position_embeddings") or 8192,
        tie_word_embeddings=d.get("tie_word_embeddings") or False,
        # transformers' Qwen2 hard-codes q/k/v biases
        qkv_bias=(mt == "qwen2") or attention_bias,
        o_bias=attention_bias and mt != "qwen2", mlp_bias=d.get("mlp_bias") or False,
        qk_norm=(mt == "qwen3"), bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"))


def hf_config(cfg, architectures) -> dict:
    """The config.json of model.Config `cfg` that transformers (4.x and 5.x) reads back into the
    same architecture."""
    d = dict(architectures=[architectures[cfg.model_type]], model_type=cfg.model_type,
             vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
             head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
             rope_scaling=cfg.rope_scaling,
             max_position_embeddings=cfg.max_position_embeddings,
             tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
             bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    if cfg.model_type != "qwen2":
        d.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    return d


def read_tensors(path: Path, expected: dict, skip: tuple, model_type: str, dtype, device) -> dict:
    """{name: tensor} of every weight in `expected` ({name: tensor of the right shape}, e.g. on the
    meta device), read from the folder's safetensors file(s), checked, and cast to dtype on
    device."""
    from safetensors import safe_open
    state = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq") or key in skip:
                        continue  # a derived buffer, or a stored copy of a tied weight
                    state[key] = _checked_tensor(f, key, file, expected,
                                                 model_type).to(device=device, dtype=dtype)
        except (ModelLoadError, OSError):
            raise
        except Exception as e:  # safetensors' own errors: truncated file, bad header, ...
            raise ModelLoadError(f"{file}: not a readable safetensors file "
                                 f"({first_line(e, None)}); the file is corrupt or truncated, "
                                 f"copy or convert it again") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(f"{path}: tensor {missing[0]!r}{more} missing from the checkpoint")
    return state


def _checked_tensor(f, key: str, file: Path, expected: dict, model_type: str) -> torch.Tensor:
    """One tensor of a safetensors file, refused (one line, naming it) when it cannot be that
    weight."""
    if key not in expected:
        raise ModelLoadError(f"{file}: unexpected tensor {key!r} for a {model_type} model; "
                             "is config.json the one of these weights?")
    sl = f.get_slice(key)
    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
    if shape != tuple(expected[key].shape):
        raise ModelLoadError(f"{file}: tensor {key!r} has shape {list(shape)}, config.json implies "
                             f"{list(expected[key].shape)}")
    if dtype not in FLOAT_DTYPES:
        raise ModelLoadError(f"{file}: tensor {key!r} has dtype {dtype}; weights must be floating "
                             f"point (F32, BF16, F16), not integers or booleans (a quantised file "
                             f"needs dequantising)")
    t = f.get_tensor(key)
    if not torch.isfinite(t).all():
        raise ModelLoadError(f"{file}: tensor {key!r} holds NaN or inf values; the checkpoint is "
                             f"damaged, use an earlier one")
    return t


def weight_files(path: Path) -> list[Path]:
    if (path / "model.safetensors").exists():
        return [_readable(path / "model.safetensors")]
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = read_json(index).get("weight_map")
        if (not isinstance(wm, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items())):
            raise ModelLoadError(f"{index}: weight_map must be an object mapping tensor names to "
                                 f"shard files")
        shards = sorted(set(wm.values()))
        if not shards:
            raise ModelLoadError(f"{index}: weight_map is empty")
        for s in shards:
            if Path(s).name != s or not (path / s).is_file():
                raise ModelLoadError(f"{path / s}: shard listed in {index.name} is missing")
        return [_readable(path / s) for s in shards]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise ModelLoadError(f"{path}: only a pickle checkpoint (.bin/.pt) is here; pickles can "
                             f"run code when loaded, so this project reads safetensors only: "
                             f"convert it with transformers' "
                             f"save_pretrained(safe_serialization=True)")
    raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json in this "
                         f"folder")


def _readable(file: Path) -> Path:
    try:
        with open(file, "rb") as f:
            f.read(8)
    except OSError as e:
        raise ModelLoadError(f"{file}: cannot be read ({e.strerror}); check its "
                             "permissions") from None
    return file


def copy_files(src, dst, names):
    """Copy each of `names` that `src` holds into the folder `dst`."""
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def write_folder(path, tensors: dict, config: dict, copy_from=None):
    """config.json + model.safetensors (+ the tokenizer files of `copy_from`) into a temporary
    folder, renamed over `path` once complete; the temporary folder is removed on any failure (disk
    full, Ctrl-C). Tensors that are not all finite are refused: such a checkpoint would poison every
    run that starts from it."""
    from safetensors.torch import save_file
    bad = next((k for k, v in tensors.items() if not torch.isfinite(v).all()), None)
    if bad:
        raise UserError(f"not saving {path}: tensor {bad!r} holds NaN or inf (the weights "
                        f"diverged); resume from the last checkpoint with a lower --lr")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if copy_from:
            copy_files(copy_from, tmp, TOKENIZER_FILES)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_tokenizer(folder, vocab_size: int, tok):
    """The tokenizer against the weights' vocabulary: every id it can produce must index the
    embedding, and the end-of-turn token it names must exist, or responses never stop. One
    ModelLoadError naming the file and the fix; called by every load of a model folder
    (tokenizer.Tokenizer with a config)."""
    n = tok.vocab_size
    if n > vocab_size:
        raise ModelLoadError(f"{folder}: tokenizer.json has {n} tokens but the weights' vocabulary "
                             f"has {vocab_size} (config.json vocab_size): ids {vocab_size} and up "
                             f"would index past the embedding; use the tokenizer of these weights")
    named = tok.special["eos_token"]
    if named is not None and tok.tok.token_to_id(named) is None:
        raise ModelLoadError(f"{folder / 'tokenizer_config.json'}: eos_token {named!r} is not a "
                             f"token of tokenizer.json, so answers would never stop; name a token "
                             f"the tokenizer has")
    ids = {"a stop id (eos_token_id)": max(tok.stop_ids, default=None), "pad": tok.pad_id}
    for what, i in ids.items():
        if i is not None and i >= vocab_size:
            raise ModelLoadError(f"{folder}: {what} {i} is outside the vocabulary of "
                                 f"{vocab_size}; fix eos_token_id / the special tokens")
    if not tok.stop_ids:
        raise ModelLoadError(f"{folder}: no end-of-sequence token (eos_token_id in config.json or "
                             f"generation_config.json, eos_token in tokenizer_config.json), so "
                             f"answers would never stop; name one")

