"""
Tokenizer, chat template and stop tokens of a model folder, and a greedy chat demo.

    python chat.py --prompt "What is the capital of France?"
    python chat.py --model path/to/hf-folder --prompt "..." --system "..."

The chat template is the model's own Jinja template (tokenizer_config.json or chat_template.jinja), rendered
the way transformers renders it (sandboxed Jinja2, trim_blocks, lstrip_blocks, `raise_exception`, `tojson`),
so that a prompt here is token for token the prompt the model was trained with.
"""
import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from model import ModelLoadError

# end-of-turn / end-of-text tokens of the supported families; each one present in the vocabulary stops sampling
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>")


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise ModelLoadError(f"{file}: missing; the model folder needs its tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(f"{file}: not a readable tokenizer ({str(e).splitlines()[0]})") from None
        self.config = _read_optional_json(path / "tokenizer_config.json")
        self.special = {k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = self.config.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.chat_template = template

        # stop ids: eos of config.json / generation_config.json / tokenizer_config.json, and every end-of-turn token
        ids = set()
        for cfg_file in ("config.json", "generation_config.json"):
            eos = _read_optional_json(path / cfg_file).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for t in (self.special["eos_token"], *END_OF_TURN):
            if t is not None and self.tok.token_to_id(t) is not None:
                ids.add(self.tok.token_to_id(t))
        self.stop_ids = frozenset(ids)
        self.eos_id = self.tok.token_to_id(self.special["eos_token"]) if self.special["eos_token"] else min(ids, default=None)
        pad = self.special["pad_token"]
        self.pad_id = self.tok.token_to_id(pad) if pad and self.tok.token_to_id(pad) is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, with no BOS or other post-processing (chat templates write their own BOS)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the model's template: messages = [{"role": "system"|"user"|"assistant", "content": str}]."""
        if not self.chat_template:
            raise ModelLoadError("this tokenizer has no chat_template; use a chat/instruct model or plain prompts")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special, **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


def _compile(template: str):
    """Compile a chat template with the same Jinja environment that transformers uses."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def _token_text(t):
    return t.get("content") if isinstance(t, dict) else t  # AddedToken dicts or plain strings


def _read_optional_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from None


def load(model_dir, dtype=None, device="cpu"):
    """(model, tokenizer) of an HF-layout folder; the default offline model is built on first use."""
    import torch

    import weights
    from model import Transformer
    model_dir = Path(model_dir)
    if model_dir.resolve() == weights.DEFAULT_MODEL_DIR.resolve():
        weights.ensure()
    return Transformer.from_pretrained(model_dir, dtype=dtype or torch.float32, device=device), Tokenizer(model_dir)


def add_model_args(p):
    """The --model, --dtype and --device flags that every script shares."""
    import torch

    import weights
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR), help="HF-layout model folder (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")


# -----------------------------------------------------------------------------
# the demo

def main():
    import torch

    from model import generate_greedy
    p = argparse.ArgumentParser(description="Greedy chat answer from a model folder.")
    add_model_args(p)
    p.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    p.add_argument("--system", default=None, help="optional system message (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens")
    args = p.parse_args()
    try:
        model, tok = load(args.model, getattr(torch, args.dtype), args.device)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        ids = tok.encode_chat(messages)
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    out = generate_greedy(model, ids, args.max_new_tokens, tok.stop_ids)
    print(tok.decode(out))


if __name__ == "__main__":
    main()
