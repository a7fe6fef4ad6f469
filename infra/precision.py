"""
The mixed-precision policy, in one place (train.py follows it; model.py and bupo.py hold the fp32
islands).

  - master weights and AdamW state: fp32. The model is loaded in fp32 and opt.step() updates it in
    place.
  - matmuls: in the compute dtype (bf16) inside torch.autocast regions that open and close around
    each forward phase: the rollout, the old-log-prob pass, each micro-batch's forward, an
    evaluation. Never around opt.step(): autocast keeps the bf16 copy of every fp32 weight it has
    cast until its outermost region exits, and an in-place optimizer update does not invalidate that
    copy, so a region spanning an update would keep serving the weights from before it
    (tests/test_train.py::test_bf16_forwards_see_every_update).
  - the backward pass runs outside the region (autocast's own advice); gradients land in the fp32
    masters.
  - fp32: the RMSNorm statistics (model.RMSNorm), the residual stream h_l (fp32 embeddings plus bf16
    writes promote to fp32), the un-normed internal-policy logits W_U h_l (bupo.unembed turns
    autocast off for them: |W_U h_l| reaches the hundreds, and bf16 keeps 8 bits of mantissa),
    softmax, log-probs and entropies.
  - the KV cache in the compute dtype (model.Transformer.new_cache reads it from the open region).
On a CPU the same path runs (slowly) with --dtype bfloat16, so that CPU tests catch mistakes of this
kind.
"""
import contextlib
import functools

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str, device) -> torch.dtype:
    """--dtype: auto is bf16 on a CUDA device and fp32 elsewhere (a CPU computes bf16 slowly)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def regions(device, dtype: torch.dtype):
    """amp, for train.py: amp() opens a fresh autocast region for one forward phase (a no-op
    context in fp32); torch's own context, so nothing of this file runs inside a step."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, torch.device(device).type, dtype=dtype)


def autocast(device, dtype: torch.dtype):
    """A fresh autocast region for one forward phase (a no-op context in fp32). Call it once per
    phase."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
