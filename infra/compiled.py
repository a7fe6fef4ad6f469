"""
The sampler's compiled decode step (rollout.generate(compile=True)): the model's forward for one
token over a StaticKVCache (model.KVCache with shapes that never change), compiled once with
torch.compile and, on a GPU, replayed as a CUDA graph. Speed only: tests/test_rollout.py checks that
its static-cache path gives the usual tokens and that the step traces into one graph.
"""
import sys

import torch

from infra.errors import first_line
from model import Config, KVCache, Transformer


class StaticKVCache(KVCache):
    """model.KVCache with shapes that do not change while decoding, for the compiled one-token
    decode step (compiled_decode): every step attends over all max_len slots, the unused ones
    masked, and the current slot is a tensor, so no Python number changes from one step to the next
    and the step is not recompiled (only a compaction, which changes the batch, is a new shape)."""

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        super().__init__(cfg, batch, max_len, dtype, device)
        # the slot the next token goes to
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mark_static()

    def mark_static(self):
        """On a GPU the compiled step replays as a CUDA graph, which writes into these tensors at
        the addresses it was recorded with: tell torch.compile that they stay where they are."""
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
    (torch.compile), the way gpt-fast decodes. Compiled on its first call and reused by every later
    step and call; a new cache shape (another max_len or P x G, the cache compaction) compiles again
    once, after which torch makes that dimension dynamic. On a GPU the compiled step also replays as
    a CUDA graph (mode "reduce-overhead"): one launch per token instead of a few thousand kernels
    from Python. Off by default: on a CPU it is slower than eager decoding (the measurements:
    docs/usage.md, "Sampling"). Where torch cannot compile (no C++ compiler), one line says so and
    decoding stays eager."""
    slot = model.__dict__       # kept beside the model's attributes, not registered as a submodule
    if "compiled_decode" not in slot:
        cuda = model.embed_tokens.weight.is_cuda
        if cuda:
            # each call's new cache moves the graphs' inputs, which re-records them; torch stops
            # that (and replays nothing) after 128 times by default: a run samples every step
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
        return first_call
    return slot["compiled_decode"]
