"""
Data parallelism (--parallel dp) and sharded training (--parallel fsdp) for train.py under
torchrun: one process (rank) per CPU process slot or GPU.

Every rank holds the whole model and optimizer, samples its share of each step's prompts with the
seeds one process would use, and trains on its own responses. Each rank divides its loss by the
token count of the whole mini-batch (all ranks), and the gradients are summed over the ranks before
every optimizer step, so W ranks compute what one process computes, up to the order of float sums
(tests/test_distributed.py). Metrics and evaluations are reduced across ranks; only rank 0 writes
files. In a single process every helper here is the identity, so train.py reads the same either way.
"""
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                    fully_shard)
from torch.distributed.tensor import DTensor

from infra.errors import UserError
from infra.precision import compute_dtype

LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# how long a rank waits for the others to join (BUPO_INIT_TIMEOUT_S overrides it)
INIT_TIMEOUT_S = 600
# how long one collective waits for the slowest rank (BUPO_COLLECTIVE_TIMEOUT_S). The timeout of
# init_process_group is every collective's, and at the paper's sizes ranks reach them minutes apart
# (8k-token answers, an evaluation of 64 problems x 17 answers per rank, a 100 GB checkpoint)
COLLECTIVE_TIMEOUT_S = 4 * 3600


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def launcher_env() -> dict | None:
    """The launcher's variables when this process is one rank of several (WORLD_SIZE > 1), checked:
    None for a single process. Variables a launcher left behind, or a half-set environment, give one
    line instead of a hang or a traceback in the rendezvous."""
    env = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    if env["WORLD_SIZE"] in (None, "", "1"):
        return None
    hint = (f"the environment has {', '.join(f'{k}={v}' for k, v in env.items() if v is not None)}"
            f": start several ranks with torchrun --nproc-per-node N train.py ..., or unset "
            f"{' '.join(LAUNCHER_VARS)} to run one process")
    ints = {}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        v = env[k] if env[k] is not None or k != "LOCAL_RANK" else env["RANK"]
        if v is None or not v.strip().isdigit():
            what = "is not set" if v is None else f"is {v!r}, not a number"
            raise UserError(f"{k} {what}; {hint}")
        ints[k] = int(v)
    if not env["MASTER_ADDR"]:
        raise UserError(f"MASTER_ADDR is not set; {hint}")
    if not ints["RANK"] < ints["WORLD_SIZE"] or ints["WORLD_SIZE"] < 2:
        raise UserError(f"RANK {ints['RANK']} is not a rank of WORLD_SIZE {ints['WORLD_SIZE']}; "
                        f"{hint}")
    return {**env, **ints}


def setup(device: str, prompts_per_step: int, mini_batches: int, eval_problems: int,
          evaluates: bool, parallel: str = "dp") -> str:
    """Join the torchrun group when there is one (WORLD_SIZE > 1): gloo on a CPU, nccl with one GPU
    per rank. Returns this process's device."""
    env = launcher_env()
    cuda = device.startswith("cuda")
    # gloo for CPU tensors (the shards of --cpu-offload live there), nccl for GPU ones
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if env is None:
        if parallel == "fsdp":      # FSDP2 in one process: a group of one (for --cpu-offload)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return device
    if cuda:
        device = f"cuda:{env['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    wait = int(os.environ.get("BUPO_INIT_TIMEOUT_S", INIT_TIMEOUT_S))
    collective = datetime.timedelta(seconds=int(os.environ.get("BUPO_COLLECTIVE_TIMEOUT_S",
                                                               COLLECTIVE_TIMEOUT_S)))
    try:
        # the rendezvous and the first barrier wait `wait` seconds; collectives after, longer
        store, r, w = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=wait)))
        dist.init_process_group(backend, store=store, rank=r, world_size=w, timeout=collective)
        dist.barrier()
        store.set_timeout(collective)
    except (RuntimeError, ValueError) as e:   # torch's DistError types are RuntimeErrors
        why = " ".join(str(e).split())[:200]
        raise UserError(f"rank {env['RANK']} of {env['WORLD_SIZE']} could not join the group at "
                        f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} within {wait} s ({why}); if "
                        f"no other ranks were started, unset {' '.join(LAUNCHER_VARS)}") from None
    W = world()
    if prompts_per_step % (mini_batches * W):
        raise UserError(f"--prompts-per-step ({prompts_per_step}) must be a multiple of "
                        f"--mini-batches x ranks ({mini_batches} x {W}) so that every rank holds "
                        f"whole groups of every mini-batch")
    if evaluates and eval_problems < W:
        raise UserError(f"--eval-problems ({eval_problems}) must be at least the number of ranks "
                        f"({W})")
    return device


def launched_rank() -> int:
    """This process's rank as torchrun announces it, before the group is joined (0 in a single
    process)."""
    env = launcher_env()
    return env["RANK"] if env else 0


def all_sum(values: dict, device) -> dict:
    """The sums over ranks of a dict of numbers (itself in a single process)."""
    if world() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors of equal shape, in rank order (t itself in a single process)."""
    if world() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def clip_grads(model, max_norm: float) -> float:
    """The gradients summed over ranks (FSDP2 sums its own; each rank's loss is divided by the
    whole mini-batch's tokens), clipped to a norm of max_norm; the norm before clipping."""
    if world() > 1 and not is_sharded(model):
        work = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()
                if p.grad is not None]
        for w in work:
            w.wait()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


def my_prompts(P: int, mini_batches: int) -> list[int]:
    """The prompts of a step this rank samples and trains on: a consecutive 1/W of each
    mini-batch, which holds the same prompts as in one process (a consecutive P/M)."""
    W = world()
    if W == 1:
        return list(range(P))
    per = P // (mini_batches * W)
    return [k * per * W + rank() * per + i for k in range(mini_batches) for i in range(per)]


def my_share(n: int) -> list[int]:
    """Every W-th item, from this rank's index (how the evaluation problems are split)."""
    return list(range(rank(), n, world()))


def barrier():
    if world() > 1:
        dist.barrier()


def teardown():
    if world() > 1:
        dist.barrier()      # no rank closes its connections while another still uses them
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# sharded training (--parallel fsdp), on torch's FSDP2 (torch.distributed.fsdp.fully_shard)
#
# Each rank keeps 1/W of every weight, gradient and AdamW moment, so a model whose fp32 state
# does not fit one device (Qwen3-8B: ~131 GB) trains on several.
#   - each block is sharded, then the root (embedding, final norm, unembedding; a tied W_U = E
#     is one parameter of the root). A block's weights are gathered for its forward and
#     backward and dropped after. The root's stay gathered from its forward until the backward
#     is done (reshard_after_forward=False): the internal policies, entropies and diagnostics of
#     bupo.py read W_U and the final norm after the model's forward.
#   - mixed precision: FSDP2's MixedPrecisionPolicy (weights gathered in the compute dtype,
#     gradients reduced in fp32) instead of autocast regions; the fp32 islands stay.
#   - the gradients are summed over ranks, not averaged (divide factor 1): every rank's loss is
#     already divided by the token count of the whole mini-batch (train.py, departure 2).
#   - in phase 1 the blocks above l never run: never gathered, their gradients stay None.
#   - sampling and evaluation decode token by token, from a full copy of the weights in the
#     compute dtype gathered once per use (sampling_model), not from the sharded model.
#   - checkpoints: the full weights and optimizer state are gathered to rank 0 and written as
#     one process writes them (full_state): the folder loads in transformers, and a run
#     resumes with any number of ranks, bit for bit with the same number.

def shard(model, device: str, world: int, dtype: torch.dtype, offload: bool = False):
    """Shard `model` (fp32 masters) in place across the `world` ranks, one mesh dimension on
    `device`'s type; dtype: the compute dtype. offload: the shards live in CPU memory."""
    mesh = init_device_mesh(torch.device(device).type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype,
                              reduce_dtype=torch.float32)
    cuda = torch.device(device).type == "cuda"
    cpu = {"offload_policy": CPUOffloadPolicy(pin_memory=cuda)} if offload else {}
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, **cpu)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, **cpu)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # sums, not means (module docstring); plain SUM collectives, which gloo has too
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def sampling_model(model, args):
    """The model to decode with: itself; a copy gathered from the shards of a sharded model
    (decoding_copy); a copy with bf16 matmul weights for the compiled step (model.for_decoding)."""
    if is_sharded(model):
        return decoding_copy(model, args)
    dtype = compute_dtype(args.dtype, args.device) if getattr(args, "compile", False) else None
    return model.for_decoding(dtype) if dtype not in (None, torch.float32) else model


def decoding_copy(model, args):
    """A plain copy of a sharded model's weights in the compute dtype, gathered from the shards
    (every rank calls it, in step). With --compile the copy is kept and refreshed in place, so
    that its compiled step is reused (and no copy per step waits in a reference cycle)."""
    dtype = compute_dtype(args.dtype, args.device)
    model.reshard()      # the root's gathered weights may be of before the last update
    device = torch.device(args.device)      # the shards may live in CPU memory (--cpu-offload)
    # each shard cast before it is gathered: no fp32 copy of a whole weight on the device
    full = lambda p: gathered(p.detach().to(device, dtype))  # noqa: E731
    kept = model.__dict__.get("decoding_copy") if getattr(args, "compile", False) else None
    if kept is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                kept.get_parameter(name).copy_(full(p))
        return kept
    copy = model.copy_with({name: full(p) for name, p in model.named_parameters()})
    if getattr(args, "compile", False):
        model.__dict__["decoding_copy"] = copy        # beside the model, not a submodule
    return copy.requires_grad_(False)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a sharded DTensor (a plain tensor as it is)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


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
