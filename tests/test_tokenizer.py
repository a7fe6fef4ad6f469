"""Tokenizer, chat templates rendered as transformers renders them, stop tokens."""
import json

import pytest

from tokenizer import Tokenizer
from infra.errors import ModelLoadError

MESSAGES = [{"role": "system",
             "content": "Please reason step by step, and put your final answer within \\boxed{}."},
            {"role": "user", "content": "What is 12 * 7?"}]
# a Llama-3-style template (bos_token, raise_exception, loop controls) and a Qwen3-style one
# (enable_thinking)
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', "
          "'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + "
          "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ "
          "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN3 = ("{%- for m in messages %}\n    {{- '<|im_start|>' + m.role + '\\n' + m.content + "
         "'<|im_end|>\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- "
         "'<|im_start|>assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking "
         "is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n"
         "{%- endif %}")


def test_default_model_template_matches_transformers(default_model_dir):
    from transformers import AutoTokenizer
    ours, ref = Tokenizer(default_model_dir), AutoTokenizer.from_pretrained(default_model_dir)
    for msgs in (MESSAGES, MESSAGES[1:]):
        # with and without a system message (the template adds one)
        text = ours.apply_chat_template(msgs)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")


def test_default_model_tokens(default_model_dir):
    tok = Tokenizer(default_model_dir)
    assert tok.stop_ids >= {tok.tok.token_to_id("<|im_end|>")} and tok.eos_id == 2
    assert tok.vocab_size == 49152
    ids = tok.encode("In 2024, 1234 apples cost $5.")
    assert ([tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
            == list("2024") + list("1234") + ["5"])
    text = "Unicode: café, 東京, emoji 🙂, tabs\tand\nnewlines."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [2]  # a control token is one token ...
    assert tok.decode([2, 28]) == tok.decode([28])  # ... and skipped when decoding


@pytest.mark.parametrize("template", [LLAMA3, QWEN3])
def test_templates_render_like_transformers(default_model_dir, tmp_path, template):
    from transformers import AutoTokenizer
    for f in ("tokenizer.json", "config.json"):
        (tmp_path / f).write_bytes((default_model_dir / f).read_bytes())
    cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for kw in ({}, {"enable_thinking": False}):
        assert ours.apply_chat_template(MESSAGES, **kw) == ref.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, **kw)
    if template is LLAMA3:
        with pytest.raises(Exception, match="bad role"):
            ours.apply_chat_template([{"role": "robot", "content": "x"}])


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json: missing"):
        Tokenizer(tmp_path)
