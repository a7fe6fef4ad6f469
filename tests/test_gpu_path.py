"""What would crash, run out of memory or crawl at the paper's sizes on GPUs, shown on the CPU:
real FSDP2 on gloo, saved-tensor hooks, two ranks whose collectives are minutes apart."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model as model_module

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, world: int, env: dict | None = None, timeout: int = 180):
    """`script` in `world` processes with the launcher's variables set (as torchrun sets them)."""
    port, procs = free_port(), []
    for rank in range(world):
        e = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
             **(env or {})}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return [(p.wait(timeout), *p.communicate()) for p in procs]


# -----------------------------------------------------------------------------
# phase 1 under --parallel fsdp: one fp32 W_U per micro-batch, not one per logits chunk

SAVED_WU = """
    import sys, torch
    sys.path.insert(0, ".")
    import bupo
    from infra import distributed as dp
    from model import Config, Transformer
    dp.setup("cpu", 2, 1, 2, False, "fsdp")
    torch.manual_seed(0)
    cfg = Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=16)
    model = Transformer(cfg)
    dp.shard(model, "cpu", dp.world(), torch.bfloat16)
    ids = torch.randint(0, 512, (2, 24))
    batch = bupo.Batch(ids, torch.ones_like(ids), 4)
    bupo.chunk_rows = lambda model, budget=None: 8    # 40 response tokens: 5 chunks
    saved = {}
    def pack(t):
        if t.dtype == torch.float32 and sorted(t.shape) == [64, 512]:   # W_U or its transpose
            saved[t.untyped_storage().data_ptr()] = t
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, _ = bupo.policy_logprobs(model, batch, 2)
    logp.sum().backward()
    print("fp32 W_U copies saved:", len(saved))
    dp.teardown()
"""


def test_phase1_under_fsdp_keeps_one_fp32_unembedding():
    """Under FSDP2's bf16 policy the gathered W_U is bf16: a cast per logits chunk would keep one
    fp32 [V, d] copy per chunk for the backward (38 of them for an 8k-token answer of Qwen3-8B,
    +88 GiB). Two ranks of real FSDP2 on gloo, 5 chunks each: one copy each."""
    for rc, out, err in run_ranks(SAVED_WU, 2):
        assert rc == 0, err[-2000:]
        assert "fp32 W_U copies saved: 1" in out, out + err[-2000:]


# -----------------------------------------------------------------------------
# collectives outlive the rendezvous timeout

LATE_RANK = """
    import sys, time, torch
    sys.path.insert(0, ".")
    from infra import distributed as dp
    dp.setup("cpu", 2, 1, 2, False)
    if dp.rank() == 1:
        time.sleep(8)        # a rank still decoding, or rank 0 writing a checkpoint
    print("sum", dp.all_sum({"x": 1}, "cpu")["x"])
    dp.teardown()
"""


def test_a_collective_waits_longer_than_the_rendezvous():
    """init_process_group's timeout is every collective's: a rank 8 s late under a 5 s join
    timeout used to kill the job. The join keeps its own timeout; collectives wait far longer."""
    for rc, out, err in run_ranks(LATE_RANK, 2, {"BUPO_INIT_TIMEOUT_S": "5"}):
        assert rc == 0 and "sum 2.0" in out, err[-2000:]


# -----------------------------------------------------------------------------
# decode with a mask on CUDA: the query heads of a group fold into the query length, no KV copy

@pytest.mark.parametrize("T", [1, 5])
def test_folded_query_heads_are_the_repeated_kv_heads(T, monkeypatch):
    """The memory-efficient kernel takes no enable_gqa: repeating the kv heads for it copied the
    whole cache g times per layer per token. Folding the g query heads of a group into the query
    length gives the same attention (CPU, fp32) and hands SDPA the cache's own keys and values."""
    gen = torch.Generator().manual_seed(0)
    B, nh, nkv, S, hd = 3, 8, 2, 11, 16
    q = torch.randn(B, nh, T, hd, generator=gen)
    k, v = torch.randn(2, B, nkv, S, hd, generator=gen)
    valid = torch.rand(B, S, generator=gen) > 0.3
    valid[:, -T:] = True
    q_slot, k_slot = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
    mask = (((k_slot <= q_slot) & valid[:, None, :]) | (k_slot == q_slot))[:, None]
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1),
                                              v.repeat_interleave(4, 1), attn_mask=mask)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append((a[1].data_ptr(), a[2].data_ptr()))
                        or real(*a, **kw))
    folded = model_module.folded_attention(q, k, v, mask)
    assert seen == [(k.data_ptr(), v.data_ptr())]
    assert (folded - repeated).abs().max() < 1e-5
    gqa = real(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (folded - gqa).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# the compiled decode step under autocast: no weight cast at every token

def test_the_compiled_decode_step_gets_weights_already_in_bf16():
    """Autocast's cast cache does not exist inside a compiled graph, so a graph traced over fp32
    weights casts every one of them at every token. sampling_model hands --compile a copy whose
    matmul weights are bf16 already (embedding and norms the masters'): under autocast it casts no
    weight, and its logits are the fp32 model's under autocast, bit for bit."""
    import argparse

    from torch.utils._python_dispatch import TorchDispatchMode

    from infra import distributed as dp
    from model import Config, KVCache, Transformer
    torch.manual_seed(0)
    model = Transformer(Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8))
    args = argparse.Namespace(dtype="bfloat16", device="cpu", compile=True)
    decoder = dp.sampling_model(model, args)
    weights = {p.data_ptr() for p in model.parameters() if p.dim() == 2}

    class Casts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            if func is torch.ops.aten._to_copy.default and a[0].data_ptr() in weights:
                Casts.n += 1
            return func(*a, **(kw or {}))

    def step(m):
        cache = KVCache(m.config, 2, 8, dtype=torch.bfloat16)
        ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
            return m(ids, cache=cache, last_only=True)
    Casts.n = 0
    want = step(model)
    assert Casts.n > 0                        # the fp32 masters: every matmul weight is cast
    Casts.n = 0
    got = step(decoder)
    assert Casts.n == 0 and torch.equal(got, want)
    assert decoder.embed_tokens.weight is not model.embed_tokens.weight   # a Parameter of its own
    assert decoder.embed_tokens.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


KEPT_COPY = """
    import argparse, sys, torch
    sys.path.insert(0, ".")
    from infra import distributed as dp
    from model import Config, Transformer
    dp.setup("cpu", 2, 1, 2, False, "fsdp")
    torch.manual_seed(0)
    model = Transformer(Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=8))
    dp.shard(model, "cpu", 2, torch.float32)
    args = argparse.Namespace(dtype="float32", device="cpu", compile=True)
    first = dp.sampling_model(model, args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    second = dp.sampling_model(model, args)
    full = {n: dp.gathered(p.detach()) for n, p in model.named_parameters()}
    fresh = all(torch.equal(second.get_parameter(n), t) for n, t in full.items())
    plain = dp.sampling_model(model, argparse.Namespace(dtype="float32", device="cpu",
                                                        compile=False))
    print("same copy", first is second, "refreshed", fresh, "uncompiled new", plain is not first)
    dp.teardown()
"""


def test_a_sharded_model_keeps_one_decoding_copy_for_the_compiled_step():
    """--parallel fsdp --compile: one decoding copy, refreshed in place each step, so that its
    compiled step is reused (a new copy per step recompiled, and each old one waited in a reference
    cycle with its compiled step until the garbage collector ran)."""
    for rc, out, err in run_ranks(KEPT_COPY, 2):
        assert rc == 0, err[-2000:]
        assert "same copy True refreshed True uncompiled new True" in out, out + err[-2000:]
