"""
Sharded training for train.py --parallel fsdp under torchrun, on torch's FSDP2
(torch.distributed.fsdp.fully_shard): each rank keeps 1/W of every weight, gradient and AdamW
moment, so a model whose fp32 state does not fit one device (Qwen3-8B: ~131 GB) trains on several.

  - each block is sharded, then the root (embedding, final norm, unembedding; a tied W_U = E is one
    parameter of the root). A block's weights are gathered for its forward and backward and
    dropped again after; the root's stay gathered from its forward until the backward is done
    (reshard_after_forward=False), so that the internal policies, entropies and diagnostics of
    bupo.py, which read W_U and the final norm after the model's forward, see full tensors and
    their gradients reach the shards.
  - mixed precision: FSDP2's MixedPrecisionPolicy (weights gathered in the compute dtype, gradients
    reduced in fp32) instead of autocast regions; the fp32 islands of model.py and bupo.py stay.
  - the gradients are summed over ranks, not averaged (gradient divide factor 1): every rank's loss
    is already divided by the token count of the whole mini-batch (all ranks), so the sum is the
    one-process gradient of the exact token-mean (train.py, departure 2).
  - in phase 1 the blocks above l never run: they are never gathered, their gradients stay None
    and AdamW skips them, as unsharded.
  - sampling and evaluation decode token by token: they run on a full copy of the weights in the
    compute dtype, gathered once per use (sampling_model), not on the sharded model, which would
    gather every block for every token.
  - checkpoints: the full weights and optimizer state are gathered to rank 0 and written exactly as
    one process writes them (full_state), so the folder loads in transformers and a run resumes
    with any number of ranks, bit for bit with the same number.
The data-parallel bookkeeping (each rank's prompts, the reductions of metrics) is distributed.py's.
"""
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from infra.precision import compute_dtype
from model import Transformer


def shard(model: Transformer, device: str, world: int, dtype: torch.dtype) -> Transformer:
    """Shard `model` (fp32 masters) in place across the `world` ranks, one mesh dimension on
    `device`'s type; dtype: the compute dtype."""
    mesh = init_device_mesh(torch.device(device).type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                              reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # sums, not means (module docstring); plain SUM collectives, which gloo has too
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def sampling_model(model: Transformer, args) -> Transformer:
    """The model to decode with: itself when it is not sharded; else a plain copy of its current
    weights in the compute dtype (train.py's --dtype), gathered from the shards (every rank calls
    it, in step)."""
    if not is_sharded(model):
        return model
    dtype = compute_dtype(args.dtype, args.device)
    model.reshard()      # the root's gathered weights may be of before the last update
    with torch.device("meta"):
        copy = Transformer(model.config)
    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().to(dtype)
            for name, p in model.named_parameters()}
    return copy.assign(full, next(iter(full.values())).device).requires_grad_(False)


def grad_norm(total) -> float:
    """clip_grad_norm_'s result as a number (a DTensor when the gradients are sharded)."""
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, opt) -> tuple[dict | None, dict | None]:
    """(weights, optimizer state) as one process holds them (model.state_dict(), opt.state_dict()
    with parameters numbered in model.parameters() order), on rank 0; every rank calls it, and the
    others get (None, None). Unsharded: the model's and optimizer's own."""
    if not is_sharded(model):
        return model.state_dict(), opt.state_dict()
    model.reshard()
    weights = get_model_state_dict(model, options=FULL)
    osd = get_optimizer_state_dict(model, opt, options=FULL)
    if not weights:          # not rank 0
        return None, None
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return weights, {"state": {index[k]: v for k, v in osd["state"].items()},
                     "param_groups": [{**g, "params": [index[k] for k in g["params"]]}
                                      for g in osd["param_groups"]]}


def load_optimizer(model, opt, saved: dict):
    """Load a one-process optimizer state (full_state's layout) into `opt`, sharded or not."""
    if not is_sharded(model):
        opt.load_state_dict(saved)
        return
    name = [n for n, _ in model.named_parameters()]
    osd = {"state": {name[i]: v for i, v in saved["state"].items()},
           "param_groups": [{**g, "params": [name[i] for i in g["params"]]}
                            for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))
