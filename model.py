"""
A Llama / Qwen2 / Qwen3 decoder written out by hand, with the residual stream in plain
sight.

    h_0 = embed(x)                                        resid[0]
    a_l = Attn_l(RMSNorm_in_l(h_{l-1}))                   attn_out[l-1]  (attn_in[l-1]: normed)
    m_l = h_{l-1} + a_l
    f_l = MLP_l(RMSNorm_post_l(m_l))                      mlp_out[l-1]   (mlp_in[l-1]: normed)
    h_l = m_l + f_l                                       resid[l]
    logits = W_U RMSNorm_final(h_L)

Index convention: layers are numbered 1..L as in the paper; the Python lists of the
residual record are 0-based, so resid[l] = h_l for l = 0..L, while attn_out[l-1] = a_l and
mlp_out[l-1] = f_l.

Every architectural detail follows the Hugging Face `transformers` implementation of the
same models, so that a checkpoint gives the same logits here and there
(tests/test_model.py checks it):
  - RMSNorm: statistics in fp32, cast back to the input dtype, *then* times the weight (no
    +1 offset);
  - RoPE: rotate-half convention, cos/sin computed in fp32, `llama3` frequency scaling
    (Llama-3.1/3.2);
  - GQA through scaled_dot_product_attention(enable_gqa=True); head_dim may differ from
    hidden/heads (Qwen3);
  - Qwen2 has q/k/v biases, Qwen3 has per-head RMSNorm on q and k before RoPE;
  - SwiGLU MLP; tied or untied unembedding.
Checkpoints are HF-layout folders (config.json + model.safetensors or a sharded index),
read lazily.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from infra import checkpoint

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


# -----------------------------------------------------------------------------
# config

@dataclass
class Config:
    model_type: str = "llama"           # llama (also SmolLM2, Llama-3.x), qwen2 (Qwen2/2.5), qwen3
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64                  # Qwen3: 128 even where hidden_size / num_heads is not
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # only {"rope_type": "llama3", ...} is supported
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    qkv_bias: bool = False              # Qwen2: True
    o_bias: bool = False                # Llama `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False               # Qwen3: True
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    @classmethod
    def from_hf(cls, d: dict, where: str = "config.json") -> "Config":
        """Read a transformers config.json (4.x `rope_scaling` or 5.x `rope_parameters`
        style): the fields checked and translated in checkpoint.config_fields."""
        return cls(**checkpoint.config_fields(d, where, ARCHITECTURES))

    @classmethod
    def read(cls, path, device="cpu") -> "Config":
        """The config.json of a model folder, after checking the folder and the device
        (one line naming what is wrong, infra/checkpoint.py)."""
        file = checkpoint.model_folder(path, device) / "config.json"
        return cls.from_hf(checkpoint.read_json(file), where=str(file))

    def to_hf(self) -> dict:
        """The config.json that transformers (4.x and 5.x) reads back into the same
        architecture."""
        return checkpoint.hf_config(self, ARCHITECTURES)


# -----------------------------------------------------------------------------
# rotary position embedding

def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """theta^(-2i/d) per pair of dims; Llama-3.x rescales the low frequencies (`llama3`
    rope scaling)."""
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float()
    inv_freq = 1.0 / cfg.rope_theta ** (dims / cfg.head_dim)
    if cfg.rope_scaling:  # llama3: divide long wavelengths by `factor`, interpolate the middle band
        s = cfg.rope_scaling
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim], in fp32, then cast (as HF)."""
    freqs = positions[..., None].float() * inv_freq.float()        # [B, T, hd/2]
    # [B, 1, T, hd]: both halves share a frequency
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by the position's angle (the rotate-half,
    non-interleaved convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# the blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # statistics in fp32 even under bf16
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)  # cast back first, then the gain (transformers' order)


class KVCache:
    """Pre-allocated keys and values of every layer for a batch, plus which cache slots
    hold real tokens.

    All rows share the slot index (`self.len`); each row keeps its own RoPE position
    (`self.pos`), so a left-padded row starts at position 0 with its first real token,
    whatever else is in the batch.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # real token?
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # each row's next position
        self.len, self.max_len = 0, max_len                               # slots used so far

    def keep(self, rows: torch.Tensor):
        """Keep only `rows`, in that order: they move to the front of the same storage, so
        finished rows stop costing compute without a new allocation (a layer at a time: the
        gather's copy is one layer's keys or values)."""
        n = len(rows)
        for buf in (self.k, self.v):
            for layer in buf:
                layer[:n, :, :self.len] = layer[rows, :, :self.len]
        self.k, self.v = self.k[:, :n], self.v[:, :n]  # views of the first n rows
        self.valid, self.pos = self.valid[rows], self.pos[rows]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Keys/values [B, n_kv, T, hd] into the next slots; returns all slots so far."""
        end = self.len + k.shape[2]
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def extend(self, mask: torch.Tensor):
        """Before a pass of T tokens (mask [B, T]): mark their slots; return the slot of
        each query [T], of each key [S], and which key slots hold real tokens [B, S]."""
        start, T = self.len, mask.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"KV cache is full: {start} + {T} tokens > max_len {self.max_len}")
        self.valid[:, start:start + T] = mask
        slots = torch.arange(start + T, device=mask.device)
        return slots[start:], slots, self.valid[:, :start + T]

    def advance(self, mask: torch.Tensor):
        """After the pass: T slots more are used; each row moves past its real tokens."""
        self.len += mask.shape[1]
        self.pos += mask.sum(-1)


class SharedPromptCache(KVCache):
    """A cache that autograd can go through, for training on G responses that share one
    prompt.

    Each distinct prompt runs once; `keep` hands its keys/values to every row that answers
    it (rows may repeat), and the responses attend to them. Keys/values are concatenated
    per layer, not written into a buffer: an in-place write would change tensors the
    backward has saved. After keep (frozen) the prompts' keys/values are only read, so a
    block that attends to them is a pure function of its inputs (what activation
    checkpointing recomputes); before, Pass.block hands them out as a block's outputs."""

    def __init__(self, batch: int, max_len: int, device="cpu"):
        self.k, self.v = [], []  # per layer [B, nkv, S, hd]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len, self.max_len, self.frozen = 0, max_len, False

    def keep(self, rows: torch.Tensor):
        # index_select, not k[rows]: the backward of indexing with repeated rows sums in an
        # order that depends on the threads (not reproducible bit for bit); index_select's not
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.valid, self.pos = self.valid[rows], self.pos[rows]
        self.frozen = True

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.frozen:   # the responses: the prompt's keys/values, then their own; nothing stored
            return torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k.append(k), self.v.append(v)
        return k, v


class Outputs:
    """A cache that keeps nothing: a block's keys and values, for Pass.block to hand out."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.kv = k, v
        return k, v


def on_tokens(fn, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """fn(x) for x [B, T, d] -> [B, T, d'] on the real tokens only: real = their indices
    in x.flatten(0, 1) (None: every token). Padding gets zeros, which attention masks: the
    linear layers, nearly all the FLOPs, skip the padding of rows of different lengths."""
    if real is None:
        return fn(x)
    y = fn(x.flatten(0, 1).index_select(0, real))                   # [N, d']
    out = y.new_zeros(x.shape[0] * x.shape[1], y.shape[-1])         # [B*T, d']
    return out.index_copy(0, real, y).view(x.shape[0], x.shape[1], -1)


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v; each group of nh/nkv query heads shares a kv head."""
    if mask is not None and q.is_cuda and q.shape[1] != k.shape[1]:
        return masked_gqa_on_cuda(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=True)


def masked_gqa_on_cuda(q, k, v, mask):
    """attend() where CUDA's memory-efficient kernel must take the mask, and it takes no
    enable_gqa: the g query heads of a group are folded into the query length, so that a decode
    step does not copy the cache g times per layer. Where the folded mask would be larger than
    the copied keys and values (long training rows), the kv heads are repeated instead."""
    B, nh, T, hd = q.shape
    g = nh // k.shape[1]
    if g * T < 2 * nh * hd:
        return folded_attention(q, k, v, mask)
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def folded_attention(q, k, v, mask):
    """attend() with the query heads of a group in the query length: query head j*g + i at
    position t is row i*T + t of kv head j, and its mask row is the mask of t."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    mask = mask.expand(B, 1, T, mask.shape[-1]).repeat(1, 1, g, 1)         # [B, 1, g T, S]
    y = F.scaled_dot_product_attention(q.reshape(B, nkv, g * T, hd), k, v, attn_mask=mask)
    return y.reshape(B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            # Qwen3: RMSNorm over head_dim, per head, after the projection and before RoPE
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, real=None):
        B, T, _ = x.shape
        q = on_tokens(self.q_proj, x, real).view(B, T, self.nh, self.hd)    # [B, T, nh, hd]
        k = on_tokens(self.k_proj, x, real).view(B, T, self.nkv, self.hd)   # [B, T, nkv, hd]
        v = on_tokens(self.v_proj, x, real).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)   # in fp32 (cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)       # back to the compute dtype, the KV cache's
        if cache is not None:
            k, v = cache.write(layer, k, v)                # [B, nkv, S, hd], S = slots so far
        y = attend(q, k, v, mask)                          # [B, nh, T, hd]
        return on_tokens(self.o_proj, y.transpose(1, 2).reshape(B, T, self.nh * self.hd), real)


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


@dataclass
class Residuals:
    """Every term of the residual stream. resid has L+1 entries (h_0..h_L, before the
    final norm); the others have L entries, entry l-1 belonging to layer l. All are [B, T,
    hidden]."""
    resid: list = field(default_factory=list)     # h_0 .. h_L
    attn_in: list = field(default_factory=list)   # RMSNorm_in_l(h_{l-1})
    attn_out: list = field(default_factory=list)  # a_l
    mlp_in: list = field(default_factory=list)    # RMSNorm_post_l(m_l)
    mlp_out: list = field(default_factory=list)   # f_l


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer = layer  # 0-based slot in the KV cache
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, mask, cache=None, record: Residuals | None = None, real=None):
        attn_in = self.input_layernorm(h)
        a = self.self_attn(attn_in, cos, sin, mask, cache, self.layer, real)
        m = h + a                                   # m_l = h_{l-1} + a_l
        mlp_in = self.post_attention_layernorm(m)
        f = on_tokens(self.mlp, mlp_in, real)
        h = m + f                                   # h_l = m_l + f_l
        if record is not None:
            record.attn_in.append(attn_in), record.attn_out.append(a)
            record.mlp_in.append(mlp_in), record.mlp_out.append(f), record.resid.append(h)
        return h


@dataclass
class Pass:
    """What every block of one forward pass shares, and the speed paths of the pass:
      1. positions and the attention mask (None: plain causal attention, the fast path);
      2. RoPE's cos and sin;
      3. real: the indices of the real tokens when some are padding (the linear layers
         skip the rest, on_tokens);
      4. recompute: activation checkpointing of each block
         (Transformer.grad_checkpoint)."""
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    attention_mask: torch.Tensor
    cache: KVCache | None
    real: torch.Tensor | None
    recompute: bool

    @classmethod
    def of(cls, model, input_ids, attention_mask, cache, return_residuals) -> "Pass":
        B, T = input_ids.shape
        padded = attention_mask is not None      # else every token is real, and no sync finds out
        if not padded:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        positions = attention_mask.long().cumsum(-1) - 1                 # [B, T]
        if cache is not None:
            positions = positions + cache.pos[:, None]
            q_slot, k_slot, key_valid = cache.extend(attention_mask)     # [T], [S], [B, S]
        else:
            q_slot = k_slot = torch.arange(T, device=input_ids.device)
            key_valid = attention_mask
        mask = None
        if cache is not None or (padded and not attention_mask.all()):
            q_slot, k_slot = q_slot[:, None], k_slot[None, :]            # [T, 1], [1, S]
            # causal, not padding, and a query sees itself (no all -inf row: no NaN)
            mask = ((k_slot <= q_slot) & key_valid[:, None, :]) | (k_slot == q_slot)
            mask = mask[:, None]                                           # [B, 1, T, S]
        cos, sin = rope_cos_sin(model.inv_freq, positions.clamp(min=0),
                                model.embed_tokens.weight.dtype)
        # the real tokens when some are padding (not for a record: it holds all positions)
        real = None
        if padded and not return_residuals and not attention_mask.all():
            real = attention_mask.flatten().nonzero()[:, 0]                # [N]
        # checkpointing: a pure block, so no record, and no cache written in place (a
        # SharedPromptCache's prompt pass hands its keys and values out instead, block())
        recompute = (model.grad_checkpoint and torch.is_grad_enabled() and not return_residuals
                     and (cache is None or isinstance(cache, SharedPromptCache)))
        return cls(cos, sin, mask, attention_mask, cache, real, recompute)

    def block(self, block, h, record):
        """h_l = block_l(h_{l-1}), recomputed in the backward pass when self.recompute."""
        if not self.recompute:
            return block(h, self.cos, self.sin, self.mask, self.cache, record, self.real)
        if self.cache is None or self.cache.frozen:      # a pure function of its inputs
            return torch.utils.checkpoint.checkpoint(block, h, self.cos, self.sin, self.mask,
                                                     self.cache, None, self.real,
                                                     use_reentrant=False)
        return self.prompt_block(block, h)

    def prompt_block(self, block, h):
        """A checkpointed block of a prompt pass: the keys and values leave the recomputed
        function as outputs, so that its recompute in the backward pass appends nothing."""
        def run(h, cos, sin, mask, real):
            out = Outputs()
            return block(h, cos, sin, mask, out, None, real), *out.kv
        h, k, v = torch.utils.checkpoint.checkpoint(run, h, self.cos, self.sin, self.mask,
                                                    self.real, use_reentrant=False)
        self.cache.write(block.layer, k, v)
        return h

    def done(self):
        """The cache's slots are used (after the last block)."""
        if self.cache is not None:
            self.cache.advance(self.attention_mask)

    def unembed(self, model, h):
        """W_U RMSNorm_final(h). A decode step skips its padding rows and, on a CPU, takes W_U
        x^T, transposed back: the same sums, faster there for few rows (docs/performance.md)."""
        decode = self.attention_mask.shape[1] == 1
        if not decode or h.device.type != "cpu":
            real = self.real if decode else None
            return on_tokens(lambda x: model.lm_head(model.norm(x)), h, real)
        W = model.lm_head.weight                                                   # [V, d]
        return on_tokens(lambda x: (W @ model.norm(x).flatten(0, -2).T).T.contiguous().view(
            *x.shape[:-1], -1), h, self.real)


# -----------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # W_U = E
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # recompute each block in the backward pass instead of keeping its activations
        # (train.py --grad-checkpoint): the same gradients for about one more forward
        self.grad_checkpoint = False

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding [V, d]; internal policies are softmax(W_U h)."""
        return self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                return_residuals: bool = False, last_only: bool = False,
                upto_layer: int | None = None, keep_hidden: tuple | None = None):
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only).
        attention_mask [B, T]: 1 for real tokens, 0 for (left) padding. Positions count real
        tokens only; with a cache, the T tokens come after its slots.
          return_residuals: also the Residuals record;
          upto_layer = l: only blocks 1..l run; the result is h_l (no norm, no logits);
          keep_hidden = (l, ...): also {l: h_l} of just those layers (a pass without
            gradients then holds no other layer's activations)."""
        run = Pass.of(self, input_ids, attention_mask, cache, return_residuals)
        record = Residuals() if return_residuals else None
        h = self.embed_tokens(input_ids)                  # h_0 (RoPE acts inside attention)
        kept = {0: h} if keep_hidden and 0 in keep_hidden else {}
        if record is not None:
            record.resid.append(h)
        for l, block in enumerate(self.layers[:upto_layer], start=1):
            h = run.block(block, h, record)               # h_l = h_{l-1} + a_l + f_l
            if keep_hidden and l in keep_hidden:
                kept[l] = h
        run.done()
        if upto_layer is None:
            h = run.unembed(self, h[:, -1:] if last_only else h)   # W_U RMSNorm_final(h_L)
        if keep_hidden:
            return h, kept
        return (h, record) if return_residuals else h

    def new_cache(self, batch: int, max_len: int, kind: type = KVCache) -> KVCache:
        """A KV cache (or rollout.StaticKVCache) in the compute dtype: the weights', or
        under autocast its dtype (bf16 keys and values; infra/precision.py)."""
        p = self.embed_tokens.weight
        amp = torch.is_autocast_enabled(p.device.type)
        dtype = torch.get_autocast_dtype(p.device.type) if amp else p.dtype
        return kind(self.config, batch, max_len, dtype=dtype, device=p.device)

    # -------------------------------------------------------------------------
    # HF-layout checkpoints: our parameter names are transformers' without "model."

    def hf_state_dict(self, state: dict | None = None) -> dict:
        """transformers' names of our state dict (or of `state`, one in our names)."""
        sd = {("" if k.startswith("lm_head.") else "model.") + k: v
              for k, v in (self.state_dict() if state is None else state).items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu",
                        config: Config | None = None) -> "Transformer":
        """Load an HF-layout folder (config.json + model.safetensors or a sharded index).
        Tensors are read and checked one at a time (infra/checkpoint.py), so the model is
        never twice in memory. config: the folder's Config.read, when the caller has it
        already."""
        cfg = config or Config.read(path, device)
        path = checkpoint.model_folder(path, device) if config is None else Path(path)
        with torch.device("meta"):
            model = cls(cfg)
        # a stored copy of the tied embedding
        skip = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        state = checkpoint.read_tensors(path, model.hf_state_dict(), skip, cfg.model_type, dtype,
                                        device)
        return model.assign({k.removeprefix("model."): v for k, v in state.items()}, device)

    def copy_with(self, state: dict) -> "Transformer":
        """A model of this config holding `state`'s tensors (our names) themselves, no
        copy: a sharded model's gathered weights, to decode with
        (infra/distributed.py)."""
        with torch.device("meta"):
            copy = Transformer(self.config)
        return copy.assign(state, next(iter(state.values())).device)

    def for_decoding(self, dtype: torch.dtype) -> "Transformer":
        """A copy whose matmul weights and biases (every nn.Linear, a tied unembedding included)
        are in `dtype`, and whose embedding and norms are this model's own tensors. Under autocast
        it computes what this model computes, with nothing left to cast: a compiled decode step
        has no autocast cast cache, and would cast every weight at every token. Made once and
        refreshed in place after, so that its compiled step (and CUDA graph) is reused."""
        copy = self.__dict__.get("decoding_copy")
        linear = [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Linear)]
        if copy is None or copy.W_U.dtype != dtype:
            cast = {f"{n}.{k}" for n, m in linear for k in ("weight", "bias")}
            state = {n: p.detach().to(dtype) if n in cast else p.detach()
                     for n, p in self.named_parameters()}
            with torch.device("meta"):
                copy = Transformer(self.config)
            copy = copy.assign(state, self.W_U.device).requires_grad_(False)
            copy.lm_head.weight = nn.Parameter(self.W_U.detach().to(dtype), requires_grad=False)
            self.__dict__["decoding_copy"] = copy      # beside the model, not a submodule
            return copy
        with torch.no_grad():
            for n, m in linear:
                target = copy.get_submodule(n)
                target.weight.copy_(m.weight)
                if m.bias is not None:
                    target.bias.copy_(m.bias)
        return copy

    def assign(self, state: dict, device) -> "Transformer":
        """This model (built on the meta device) holding the tensors of `state` (our
        names; a tied lm_head.weight may be left out) themselves, no copy; the rotary
        buffer on `device`."""
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq = rope_inv_freq(self.config).to(device)
        return self.eval()

    def save_pretrained(self, path, copy_from=None, state: dict | None = None):
        """Write config.json + model.safetensors (+ tokenizer files of `copy_from`)
        atomically, loadable by transformers; non-finite weights are refused
        (checkpoint.write_folder). state: the weights to write instead of this model's (a
        sharded model's, gathered)."""
        sd = self.hf_state_dict(state)
        dtype = str(sd["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        checkpoint.write_folder(path, sd,
                                {**self.config.to_hf(), "torch_dtype": dtype}, copy_from)
