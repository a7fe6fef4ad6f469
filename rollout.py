"""
The grouped sampler: P prompts x G responses from the full policy, written by hand.

    python chat.py --prompt "What is 7 * 8?" -G 4 --temperature 1   # G answers from this sampler
    python bench/bench_rollout.py                  # tokens/s against transformers' generate

How one call works:
  1. prefill: the P prompts, left-padded, go through the model once; only the last
     position's logits are kept. Each prompt is prefilled once, however large G is.
  2. the prompt's keys/values are copied into the G rows of its group, in a cache
     allocated once for the P*G rows and the longest sequence (prompt + max_new_tokens);
     nothing is reallocated while decoding.
  3. decode, one token per step. A row stops at a stop id (kept in the response) or at
     max_new_tokens. Once a quarter of the rows in the cache have stopped, the cache is
     compacted (KVCache.keep), so finished rows stop costing compute without a copy at
     every single stop; in between, on a CPU, the linear layers and the unembedding
     already skip them.
  4. sampling: temperature, then top-k, top-p, min-p (the order of transformers and vLLM),
     then inverse-CDF sampling with one uniform number per row. The uniforms come from a
     counter-based generator (Philox4x32-10, the one cuRAND and torch use on a GPU): the
     number of row r at token t is philox(counter = t, key = the row's seed), so one
     vectorised call draws every row's, on the device, and a row's tokens depend on its
     prompt and its seed only, not on the other rows of the batch: prompt i of a call uses
     the seed `seed + i` (or `seed[i]`, given a list), response j of it the key
     row_seed(that, j), so a data-parallel rank that samples prompts 4..7 of a step gets
     the tokens one process would.
  5. stops: the bookkeeping stays on the device (which rows stopped, their lengths); the
     host looks at it once every SYNC_EVERY tokens on a GPU (every token on a CPU, where
     it costs nothing), to end the call or compact the cache. Rows that stopped in between
     are fed padding and ignored, so the tokens are the same whatever the interval.
The log-prob returned for each token is under the distribution it was sampled from (after
temperature and the filters; for greedy decoding, temperature 0, under the model's own
softmax). At T = 1 with no filter these are the "old policy" log-probs of GRPO.
"""
import hashlib
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from infra.errors import first_line
from model import Config, KVCache, Transformer


@dataclass
class Rollouts:
    """N = P * G responses, group-major: rows g*G .. g*G+G-1 answer prompt g."""
    prompt_ids: torch.Tensor      # [N, Tp] left-padded with pad_id
    prompt_mask: torch.Tensor     # [N, Tp] 1 = prompt token
    response_ids: torch.Tensor    # [N, R] right-padded with pad_id; the stop token is included
    response_mask: torch.Tensor   # [N, R] 1 = generated token (stop token included), 0 = padding
    logprobs: torch.Tensor        # [N, R] log-prob of each token under the sampling distribution
    finish_reason: list           # "stop" or "length", per row
    group: torch.Tensor           # [N] index of the prompt each row answers
    text: list = field(default_factory=list)  # decoded responses, when a tokenizer is given

    def __len__(self):
        return len(self.finish_reason)

    @staticmethod
    def cat(parts: list["Rollouts"], pad_id: int) -> "Rollouts":
        """The rollouts of consecutive calls as one: prompts left-padded and responses
        right-padded to the longest, group indices numbered on across the parts."""
        Tp = max(p.prompt_ids.shape[1] for p in parts)
        R = max(p.response_ids.shape[1] for p in parts)

        def pad(t, width, value, left=False):
            extra = width - t.shape[1]
            return F.pad(t, (extra, 0) if left else (0, extra), value=value)
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + int(p.group.max()) + 1)
        return Rollouts(torch.cat([pad(p.prompt_ids, Tp, pad_id, True) for p in parts]),
                        torch.cat([pad(p.prompt_mask, Tp, 0, True) for p in parts]),
                        torch.cat([pad(p.response_ids, R, pad_id) for p in parts]),
                        torch.cat([pad(p.response_mask, R, 0) for p in parts]),
                        torch.cat([pad(p.logprobs, R, 0.0) for p in parts]),
                        [f for p in parts for f in p.finish_reason],
                        torch.cat([p.group + o for p, o in zip(parts, offsets)]),
                        [t for p in parts for t in p.text])

    def records(self) -> list[dict]:
        """One plain dict per response, padding removed."""
        out = []
        for i in range(len(self)):
            n = int(self.response_mask[i].sum())
            out.append(dict(group=int(self.group[i]),
                            prompt_ids=self.prompt_ids[i][self.prompt_mask[i].bool()].tolist(),
                            response_ids=self.response_ids[i, :n].tolist(),
                            logprobs=self.logprobs[i, :n].tolist(),
                            finish_reason=self.finish_reason[i],
                            text=self.text[i] if self.text else None))
        return out


# -----------------------------------------------------------------------------
# sampling

def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0) -> torch.Tensor:
    """Set the logits outside the top-k / top-p (nucleus) / min-p sets to -inf. logits [n,
    V] (already / T)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest prefix of the sorted tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # the top token always stays
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if min_p > 0.0:  # drop tokens less likely than min_p times the most likely one
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values,
                                    float("-inf"))
    return logits


def sample(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0):
    """logits [n, V] (fp32), u [n] uniforms (fp64) -> tokens [n], their log-probs [n].
    Row i's token depends on its logits and u[i] only."""
    if temperature == 0.0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logits = logits if temperature == 1.0 else logits / temperature
    if top_k or top_p < 1.0 or min_p:
        logits = filter_logits(logits, top_k, top_p, min_p)
    logp = logits.log_softmax(-1)
    tok = inverse_cdf(logp.exp(), u)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


CDF_BLOCK = 256


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds u * total (never one
    of probability 0). In two levels, with no [n, V] fp64 copy: fp64 sums of blocks of
    CDF_BLOCK tokens pick the block, then the cumulative sum inside it picks the token."""
    n, V = probs.shape
    pad = -V % CDF_BLOCK
    blocks = F.pad(probs, (0, pad)).view(n, -1, CDF_BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum(-1)                          # [n, V / 256]
    total = block_cdf[:, -1]
    # stays below the total
    x = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    b = torch.searchsorted(block_cdf, x[:, None], right=True)[:, 0].clamp_(max=blocks.shape[1] - 1)
    before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    block = blocks[torch.arange(n, device=probs.device), b]                      # [n, 256]
    j = torch.searchsorted(block.double().cumsum(-1), (x - before)[:, None], right=True)[:, 0]
    # rounding can put x - before past the block's sum: then its last token of p > 0
    last = (block > 0).long().cumsum(-1).argmax(-1)
    return b * CDF_BLOCK + torch.minimum(j, last)


# -----------------------------------------------------------------------------
# each row's uniforms: Philox4x32-10, the counter-based generator of Salmon et al. (SC'11;
# Random123), the one cuRAND and torch use on a GPU, in plain int64 tensor arithmetic so
# that it runs the same on any device. philox(counter, key) is a pure function: each row
# owns a stream (its key) and draws its number at token t (the counter) in one vectorised
# call. tests/test_rollout.py checks Random123's known-answer vectors.

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
MASK32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for 32-bit a (int64 tensor) and constant m, in int64
    without overflow: m is split into 16-bit halves."""
    p_lo, p_hi = a * (m & 0xFFFF), a * (m >> 16)                 # each < 2^48
    t = p_lo + ((p_hi & 0xFFFF) << 16)                            # < 2^49
    return (p_hi >> 16) + (t >> 32), t & MASK32


def philox(counter: list, key: list) -> list:
    """Philox4x32-10: four 32-bit counter words and two key words (int64 tensors that
    broadcast, or ints) -> four 32-bit random words. Ten rounds, the key bumped by the
    Weyl constants between them."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]



def row_keys(seeds: list[int], group_size: int, device) -> torch.Tensor:
    """[P * G, 2] Philox keys: response j to a prompt seeded s gets row_seed(s, j)."""
    k = [row_seed(s, j) for s in seeds for j in range(group_size)]
    return torch.tensor([[x & MASK32, x >> 32] for x in k], dtype=torch.long, device=device)


def uniforms(keys: torch.Tensor, t: int) -> torch.Tensor:
    """[n] fp64 uniforms in [0, 1) (53 bits) at token t of the rows with Philox keys [n,
    2]: each row's number is a function of its key and t only."""
    zero = torch.zeros_like(keys[:, 0])
    x = philox([zero + t, zero, zero, zero], [keys[:, 0], keys[:, 1]])
    return ((x[0] >> 5) * 2**26 + (x[1] >> 6)).double() * 2.0**-53


# -----------------------------------------------------------------------------
# prefill, copy to the group, decode

def row_seed(seed: int, j: int) -> int:
    """The 64-bit Philox key of response j to a prompt seeded `seed`: (seed << 20) + j, or
    64 bits of its sha256 when that does not fit (a Unix time as --seed)."""
    v = (seed << 20) + j
    return (v if 0 <= v < 2**64
            else int.from_bytes(hashlib.sha256(str(v).encode()).digest()[:8], "little"))


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


SYNC_EVERY = 8


def sync_every(device) -> int:
    """Tokens between two looks of the host at the stops: SYNC_EVERY on a GPU (a look
    waits for the device), 1 on a CPU (a look costs nothing there)."""
    return SYNC_EVERY if torch.device(device).type == "cuda" else 1


@dataclass
class Prefilled:
    """P prompts after their prefill. generate() only reads it, so calls on the same
    prompts can share one prefill (the evaluation samples greedily and at T = 1 from the
    same prompts; the prefill is most of a greedy call)."""
    ids: torch.Tensor             # [P, Tp] left-padded
    mask: torch.Tensor            # [P, Tp] 1 = prompt token
    logits: torch.Tensor          # [P, V] fp32, the next-token logits after each prompt
    cache: KVCache                # the prompts' keys and values
    # set before the last call: it frees the cache once copied, before decoding
    release: bool = False

    def __len__(self):
        return len(self.ids)


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], pad_id: int = 0) -> Prefilled:
    """One forward pass over the P prompts (token id lists), left-padded."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt, and every prompt needs at least "
                         "one token")
    ids, mask = left_pad(prompts, pad_id, model.embed_tokens.weight.device)
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)
    return Prefilled(ids, mask, logits[:, -1].float(), cache)


def copy_to_groups(model: Transformer, prompt_cache: KVCache, group_size: int, max_len: int,
                   static: bool = False) -> KVCache:
    """A cache of P * G rows and max_len slots; rows g*G .. g*G+G-1 copy prompt g."""
    L, P, H, T, D = prompt_cache.k.shape
    if static:                                   # fewer distinct shapes, fewer compilations
        max_len = -(-max_len // 64) * 64
    cache = model.new_cache(P * group_size, max_len, StaticKVCache if static else KVCache)
    for dst, src in ((cache.k, prompt_cache.k), (cache.v, prompt_cache.v)):
        # broadcast: no temporary copy
        dst[:, :, :, :T].view(L, P, group_size, H, T, D).copy_(src[:, :, None])
    cache.valid[:, :T] = prompt_cache.valid.repeat_interleave(group_size, 0)
    cache.pos = prompt_cache.pos.repeat_interleave(group_size, 0)
    cache.len = T
    if static:
        cache.slot.fill_(T)
    return cache


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]] | Prefilled, group_size: int = 1,
             max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, stop_ids=(), pad_id: int = 0,
             seed: int | list[int] = 0, tokenizer=None, progress: bool = False,
             compile: bool = False, max_rows: int = 0) -> Rollouts:
    """Sample `group_size` responses to each prompt (token id lists, or their Prefilled)
    from the model's full policy. Prompt i is seeded seed + i, or seed[i]. max_rows > 0:
    at most that many rows at a time (generate_in_chunks)."""
    if max_new_tokens < 1 or group_size < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and group_size ({group_size}) must "
                         f"be at least 1")
    seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"generate() got {len(seeds)} seeds for {len(prompts)} prompts; give "
                         f"one seed per prompt, or an int")
    if max_rows and len(prompts) * group_size > max_rows and not isinstance(prompts, Prefilled):
        return generate_in_chunks(model, prompts, group_size, max_new_tokens, temperature, top_k,
                                  top_p, min_p, stop_ids, pad_id, seeds, tokenizer, progress,
                                  compile, max_rows)
    device = model.embed_tokens.weight.device
    # 1. prefill; 2. the prompt's keys and values copied into the G rows of its group
    pre = prompts if isinstance(prompts, Prefilled) else prefill(model, prompts, pad_id)
    P, G, Tp = len(pre), group_size, pre.ids.shape[1]
    N = P * G
    cache = copy_to_groups(model, pre.cache, G, Tp + max_new_tokens, static=compile)
    if pre.release:                  # the caller's last use: not held through the decode
        pre.cache = None
    prompt_ids, prompt_mask = pre.ids, pre.mask
    logits = pre.logits.repeat_interleave(G, 0)                                 # [N, V], a copy
    del pre, prompts                 # a prefill of this call alone is freed here
    keys = row_keys(seeds, G, device)          # row r draws philox(t, keys[r]) at token t
    decode = compiled_decode(model) if compile else model
    every = sync_every(device)
    # 3. decode, one token per step
    out = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(N, max_new_tokens, device=device)
    length = torch.full((N,), max_new_tokens, dtype=torch.long, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    row = torch.arange(N, device=device)       # cache row c holds response row[c]
    running = torch.ones(N, dtype=torch.bool, device=device)
    for t in tqdm(range(max_new_tokens), desc="sampling", leave=False, disable=not progress):
        # 4. every row of the cache samples; those that stopped are ignored (no host sync)
        tok, lp = sample(logits, uniforms(keys[row], t), temperature, top_k, top_p, min_p)
        out[row, t] = torch.where(running, tok, pad_id)
        logprobs[row, t] = torch.where(running, lp, 0.0)
        stopped = running & torch.isin(tok, stop)
        length[row] = torch.where(stopped, t + 1, length[row])
        running = running & ~stopped
        if t == max_new_tokens - 1:
            break
        # 5. the host looks: all done? a quarter of the cache stopped?
        if (t + 1) % every == 0:
            n_running = int(running.sum())
            if n_running == 0:
                break
            if (len(running) - n_running) * 4 >= len(running):
                keep = running.nonzero()[:, 0]
                cache.keep(keep)
                row, running, tok = row[keep], running[keep], tok[keep]
        # stopped rows still in the cache are fed padding; on a CPU they are marked as
        # such, and the linear layers skip them (the host knows them at every token there)
        logits = decode(torch.where(running, tok, pad_id)[:, None],
                        attention_mask=running[:, None] if every == 1 and not compile else None,
                        cache=cache, last_only=True)[:, -1].float()
    R = int(length.max())
    response_mask = (torch.arange(R, device=device)[None, :] < length[:, None]).long()
    response_ids = out[:, :R].masked_fill(response_mask == 0, pad_id)
    finish = ["stop" if torch.isin(response_ids[i, length[i] - 1], stop) else "length"
              for i in range(N)]
    text = [tokenizer.decode(response_ids[i, :length[i]].tolist())
            for i in range(N)] if tokenizer else []
    return Rollouts(prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0),
                    response_ids, response_mask, logprobs[:, :R] * response_mask, finish,
                    torch.arange(P, device=device).repeat_interleave(G), text)


def generate_in_chunks(model, prompts, group_size, max_new_tokens, temperature, top_k, top_p,
                       min_p, stop_ids, pad_id, seeds, tokenizer, progress, compile,
                       max_rows) -> Rollouts:
    """generate() on at most max_rows rows (whole groups) at a time, so the KV cache holds
    max_rows rows instead of all of them. Every row is seeded by its prompt, so the tokens
    are those of one call, up to the float rounding of other batch shapes
    (docs/usage.md)."""
    per = max(1, max_rows // group_size)
    return Rollouts.cat([generate(model, prompts[i:i + per], group_size, max_new_tokens,
                                  temperature, top_k, top_p, min_p, stop_ids, pad_id,
                                  seeds[i:i + per], tokenizer, progress, compile)
                         for i in range(0, len(prompts), per)], pad_id)


# -----------------------------------------------------------------------------
# the compiled decode step (generate(compile=True)), speed only: the model's forward for
# one token over a StaticKVCache (a KVCache whose shapes never change), compiled once with
# torch.compile and, on a GPU, replayed as a CUDA graph. tests/test_rollout.py checks that
# it gives the usual tokens and that the step traces into one graph.

class StaticKVCache(KVCache):
    """model.KVCache with shapes that do not change while decoding, for the compiled
    one-token decode step (compiled_decode): every step attends over all max_len slots,
    the unused ones masked, and the current slot is a tensor, so no Python number changes
    from one step to the next and the step is not recompiled (only a compaction, which
    changes the batch, is a new shape)."""

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        super().__init__(cfg, batch, max_len, dtype, device)
        # the slot the next token goes to
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mark_static()

    def mark_static(self):
        """On a GPU the compiled step replays as a CUDA graph, which writes into these
        tensors at the addresses it was recorded with: tell torch.compile that they stay
        where they are."""
        if self.k.is_cuda:
            for t in (self.k, self.v, self.valid, self.pos, self.slot):
                torch._dynamo.mark_static_address(t)

    def keep(self, rows: torch.Tensor):
        self.len = int(self.slot)
        super().keep(rows)
        self.mark_static()      # new tensors (fewer rows): a new graph, recorded once

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.k[layer].index_copy_(2, self.slot, k)   # one token: k [B, n_kv, 1, hd]
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

    def extend(self, mask: torch.Tensor):
        self.valid.index_copy_(1, self.slot, mask)
        return self.slot, torch.arange(self.max_len, device=mask.device), self.valid

    def advance(self, mask: torch.Tensor):
        self.slot += 1
        self.pos += mask.sum(-1)


def compiled_decode(model: Transformer):
    """The model's forward compiled for the one-token decode step over a StaticKVCache
    (torch.compile), the way gpt-fast decodes. Compiled on its first call and reused by
    every later step and call; a new cache shape (another max_len or P x G, the cache
    compaction) compiles again once, after which torch makes that dimension dynamic. On a
    GPU the compiled step also replays as a CUDA graph (mode "reduce-overhead"): one
    launch per token instead of a few thousand kernels from Python. Off by default: on a
    CPU it is slower than eager decoding (the measurements: docs/usage.md, "Sampling").
    Where torch cannot compile (no C++ compiler), one line says so and decoding stays
    eager."""
    slot = model.__dict__       # kept beside the model's attributes, not registered as a submodule
    if "compiled_decode" not in slot:
        cuda = model.embed_tokens.weight.is_cuda
        if cuda:
            # each call's new cache moves the graphs' inputs, which re-records them; torch
            # stops that (and replays nothing) after 128 times by default: a run samples
            # every step
            from torch._inductor import config as inductor
            cfg = inductor.triton
            cfg.cudagraph_unexpected_rerecord_limit = max(cfg.cudagraph_unexpected_rerecord_limit,
                                                          1 << 20)
        compiled = torch.compile(model, mode="reduce-overhead" if cuda else None)

        def first_call(*args, **kwargs):
            if "compiled_decode" in slot:
                # decided by an earlier step of the same call
                return slot["compiled_decode"](*args, **kwargs)
            try:
                out = compiled(*args, **kwargs)
                slot["compiled_decode"] = compiled
                return out
            except torch._dynamo.exc.BackendCompilerFailed as e:
                print(f"warning: torch.compile is not available here "
                      f"({first_line(e)}); decoding without it", file=sys.stderr)
                slot["compiled_decode"] = model
                return model(*args, **kwargs)
        slot["compiled_step"] = first_call
    step = slot.get("compiled_decode", slot["compiled_step"])
    if not model.embed_tokens.weight.is_cuda:
        return step

    def graph_step(*args, **kwargs):
        # a new step of the CUDA graph: the last step's outputs (read above) may be
        # overwritten
        torch.compiler.cudagraph_mark_step_begin()
        return step(*args, **kwargs)
    return graph_step
