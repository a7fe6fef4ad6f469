"""
The tokenizer of a model folder: tokenizer.json, the model's own chat template, and its
stop tokens.

The chat template is the model's own Jinja template (tokenizer_config.json or
chat_template.jinja), rendered the way transformers renders it (sandboxed Jinja2,
trim_blocks, lstrip_blocks, `raise_exception`, `tojson`), so that a prompt here is token
for token the prompt the model was trained with.
"""
import functools
import json
from datetime import datetime
from pathlib import Path

from infra.checkpoint import check_tokenizer
from infra.errors import ModelLoadError, first_line

# end-of-turn / end-of-text tokens of the supported families; each one present in the
# vocabulary stops sampling
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>")


class Tokenizer:
    def __init__(self, path, config=None):
        """The tokenizer of the model folder `path`. config: the weights' model.Config,
        when the caller has read it: its eos_token_id is used (config.json is not read
        again), and the tokenizer is checked against its vocabulary
        (infra/checkpoint.py)."""
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise ModelLoadError(f"{file}: missing; the model folder needs its tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ModelLoadError(f"{file}: not a readable tokenizer ({first_line(e, None)})") \
                from None
        self.config = _read_optional_json(path / "tokenizer_config.json")
        self.special = {k: _token_text(self.config.get(k))
                        for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        template = self.config.get("chat_template")
        if (path / "chat_template.jinja").exists():
            template = _read_text(path / "chat_template.jinja")
        if isinstance(template, list) and template:
            # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        if template is not None and not isinstance(template, str):
            raise ModelLoadError(f"{path}: chat_template must be a string (or a list of named "
                                 f"templates); fix tokenizer_config.json")
        self.folder = path
        self.chat_template = template
        self._template = _compile(template, path) if template else None

        # stop ids: eos of config.json / generation_config.json / tokenizer_config.json,
        # and every end-of-turn token
        ids = set()
        for cfg_file in ("config.json", "generation_config.json"):
            if cfg_file == "config.json" and config is not None:
                eos = config.eos_token_id       # checked when the config was read
            else:
                eos = _read_optional_json(path / cfg_file).get("eos_token_id")
            eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i for i in eos):
                raise ModelLoadError(f"{path / cfg_file}: eos_token_id must be a token id or a "
                                     f"list of them")
            ids.update(eos)
        for t in (self.special["eos_token"], *END_OF_TURN):
            if t is not None and self.tok.token_to_id(t) is not None:
                ids.add(self.tok.token_to_id(t))
        self.stop_ids = frozenset(ids)
        eos = self.special["eos_token"]
        self.eos_id = self.tok.token_to_id(eos) if eos else min(ids, default=None)
        pad = self.special["pad_token"]
        self.pad_id = (self.tok.token_to_id(pad) if pad
                       and self.tok.token_to_id(pad) is not None else self.eos_id)
        if config is not None:
            check_tokenizer(path, config.vocab_size, self)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def widest(self) -> int:
        """The UTF-8 bytes of the longest token of the vocabulary: no token stands for more
        text (byte-level and metaspace tokens stand for fewer bytes than their own)."""
        return max(len(t.encode()) for t in self.tok.get_vocab(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no BOS or post-processing (chat templates write their own)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """The model's template rendered: messages = [{"role": ..., "content": str}]."""
        import jinja2
        if self._template is None:
            raise ModelLoadError(f"{self.folder}: this tokenizer has no chat_template; use a "
                                 f"chat/instruct model")
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special, **kwargs)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError,
                IndexError) as e:
            # the sandbox refusing an operation, raise_exception() in the template, ...
            raise ModelLoadError(f"{self.folder}: the chat template failed ({type(e).__name__}: "
                                 f"{_one_line(e)}); fix the template in "
                                 "tokenizer_config.json") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


def _one_line(e) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _compile(template: str, folder: Path):
    """Compile a chat template with the same Jinja environment that transformers uses."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ModelLoadError(f"{folder}: the chat template is not valid Jinja (line {e.lineno}: "
                             f"{_one_line(e)}); fix it in tokenizer_config.json or "
                             f"chat_template.jinja") from None


def _token_text(t):
    return t.get("content") if isinstance(t, dict) else t  # AddedToken dicts or plain strings


def _read_text(file: Path) -> str:
    try:
        return file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ModelLoadError(f"{file}: cannot be read ({why})") from None


def _read_optional_json(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        d = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{file}: must hold a JSON object, not a {type(d).__name__}")
    return d
