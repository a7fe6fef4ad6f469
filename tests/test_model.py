"""model.py against transformers: logits, hidden states, greedy tokens; cache, padding,
save/load."""
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, make_hf_model
from model import Config, Transformer, rope_inv_freq
from rollout import generate

CASES = [(a, t) for a in ARCHS for t in (True, False)]


def greedy(model, ids, n):
    """n greedy tokens of our sampler (temperature 0), with no stop token."""
    return generate(model, [ids], 1, n, temperature=0.0).response_ids[0].tolist()


def hf_greedy(hf, ids, n):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch,tied", CASES)
def test_parity_tiny(tiny_dirs, arch, tied):
    hf = make_hf_model(arch, tied)
    ours = Transformer.from_pretrained(tiny_dirs[arch, tied])
    assert ours.config.tie_word_embeddings == tied
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    # 40 > 16: llama3 scaling matters
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        logits, rec = ours(x, return_residuals=True)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    L = ours.config.num_layers
    assert (len(rec.resid) == L + 1
            and all(len(t) == L for t in (rec.attn_in, rec.attn_out, rec.mlp_in, rec.mlp_out)))
    for l in range(L):  # transformers' hidden_states[l] is h_l for l < L ...
        torch.testing.assert_close(rec.resid[l], ref.hidden_states[l], atol=1e-5, rtol=0)
    # ... but its last entry is already through the final norm; ours is not
    torch.testing.assert_close(ours.norm(rec.resid[L]), ref.hidden_states[L], atol=1e-5, rtol=0)
    assert not torch.allclose(rec.resid[L], ref.hidden_states[L])
    prompt = x[0, :6].tolist()
    assert greedy(ours, prompt, 20) == hf_greedy(hf, prompt, 20)


def test_llama3_rope_scaling_is_applied():
    cfg = Config(head_dim=64, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    plain = rope_inv_freq(Config(head_dim=64, rope_theta=500000.0))
    scaled = rope_inv_freq(cfg)
    assert scaled[0] == plain[0]                        # high frequencies untouched
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # low frequencies divided by the factor


def test_parity_default_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    from tokenizer import Tokenizer
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(default_model_dir)
    tok = Tokenizer(default_model_dir)
    ids = tok.encode_chat([{"role": "user", "content": "Name three primary colors."}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_hidden_states=True)
        logits, rec = ours(torch.tensor([ids]), return_residuals=True)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)
    for l in range(ours.config.num_layers):
        torch.testing.assert_close(rec.resid[l], ref.hidden_states[l], atol=1e-4, rtol=1e-5)
    assert greedy(ours, ids, 20) == hf_greedy(hf, ids, 20)


@pytest.mark.parametrize("arch", ARCHS)
def test_residual_identity(tiny_dirs, arch):
    model = Transformer.from_pretrained(tiny_dirs[arch, False])
    with torch.no_grad():
        _, rec = model(torch.randint(0, 128, (2, 12)), return_residuals=True)
    L = model.config.num_layers
    for l in range(1, L + 1):  # h_l = h_{l-1} + a_l + f_l, literally: bit-exact
        assert torch.equal(rec.resid[l],
                           rec.resid[l - 1] + rec.attn_out[l - 1] + rec.mlp_out[l - 1])
    # paper eq. 4 (other summation order)
    total = rec.resid[0] + sum(rec.attn_out) + sum(rec.mlp_out)
    torch.testing.assert_close(rec.resid[L], total, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rec.attn_in[0], model.layers[0].input_layernorm(rec.resid[0]))
    m_1 = rec.resid[0] + rec.attn_out[0]
    torch.testing.assert_close(rec.mlp_in[0], model.layers[0].post_attention_layernorm(m_1))


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_equals_recompute(tiny_dirs, arch):
    model = Transformer.from_pretrained(tiny_dirs[arch, True])
    x = torch.randint(0, 128, (3, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 30)
        # prefill 17, then a chunk of 3, then one token at a time
        parts = [model(x[:, :17], cache=cache)]
        parts.append(model(x[:, 17:20], cache=cache))
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.len == 30 and cache.pos.tolist() == [30, 30, 30]
    # a truncated forward (upto_layer) keeps the cache consistent too
    with torch.no_grad():
        short = model.new_cache(3, 30)
        model(x[:, :10], cache=short, upto_layer=1)
        assert short.len == 10 and short.pos.tolist() == [10, 10, 10]


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_rows_alone(tiny_dirs, arch):
    model = Transformer.from_pretrained(tiny_dirs[arch, False])
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 128, (n,), generator=g) for n in (9, 4, 13)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    new = torch.randint(3, 128, (len(rows), 5), generator=g)  # then 5 decode steps with the cache
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask)
        cache = model.new_cache(len(rows), T + 5)
        model(ids, attention_mask=mask, cache=cache)
        batch_steps = torch.cat([model(new[:, t:t + 1], cache=cache) for t in range(5)], dim=1)
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, new[i]])[None])
            torch.testing.assert_close(batch_logits[i, T - len(r):], alone[0, :len(r)], atol=1e-5,
                                       rtol=0)
            torch.testing.assert_close(batch_steps[i], alone[0, len(r):], atol=1e-5, rtol=0)
        assert torch.isfinite(batch_logits).all()  # padding rows attend to themselves, no NaN


@pytest.mark.parametrize("arch,tied", CASES)
def test_save_load_round_trip(tiny_dirs, tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM
    model = Transformer.from_pretrained(tiny_dirs[arch, tied])
    model.save_pretrained(tmp_path / "ckpt")
    again = Transformer.from_pretrained(tmp_path / "ckpt")
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary folder left behind
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path / "ckpt")  # overwriting an existing checkpoint works too
    assert Transformer.from_pretrained(tmp_path / "ckpt").config == model.config


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("qwen3", tied=False)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Transformer.from_pretrained(tmp_path)
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


def test_bf16_load_and_forward(tiny_dirs):
    model = Transformer.from_pretrained(tiny_dirs["qwen3", True], dtype=torch.bfloat16)
    ref = Transformer.from_pretrained(tiny_dirs["qwen3", True])
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        out = model(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_autocast_forward_keeps_the_fp32_islands(tiny_dirs, arch):
    """Mixed precision (infra/precision.py) over fp32 weights: the KV cache and the attention inputs
    take the compute dtype, the residual stream and the un-normed internal-policy logits stay fp32,
    and a cached decode equals the recompute in bf16 as it does in fp32."""
    import bupo
    model = Transformer.from_pretrained(tiny_dirs[arch, False])
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(2, 16)
        full, rec = model(x, return_residuals=True)
        step = torch.cat([model(x[:, :11], cache=cache), model(x[:, 11:], cache=cache)], 1)
        internal = bupo.layer_logits(model, rec.resid[1], 1)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16 and full.dtype == torch.bfloat16
    assert all(h.dtype == torch.float32 for h in rec.resid) and internal.dtype == torch.float32
    # fp32 internal logits, not bf16 ones
    exact = rec.resid[1].double() @ model.W_U.double().T
    assert (internal.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    torch.testing.assert_close(step.float(), full.float(), atol=0.05 * full.float().std().item(),
                               rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(full.float(), model(x), atol=0.1 * full.float().std().item(),
                                   rtol=0)


def test_the_readme_residual_record_snippet_runs(default_model_dir, monkeypatch):
    """README's first code block is run as written (from the repository root), so that it cannot
    break again."""
    import re
    root = Path(__file__).resolve().parents[1]
    code = re.search(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(root)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    rec, model = scope["rec"], scope["model"]
    L = model.config.num_layers
    assert len(rec.resid) == L + 1 and len(rec.attn_out) == len(rec.mlp_out) == L
    assert all(torch.equal(rec.resid[l],
                           rec.resid[l - 1] + rec.attn_out[l - 1] + rec.mlp_out[l - 1])
               for l in range(1, L + 1))
