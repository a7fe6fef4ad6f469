"""
Memory: what a training run will hold, planned before any weight is read (what it held is
metrics.jsonl's peak_memory_mb, infra/metrics.py).

The plan (train.py prints it at the start, and refuses a run that cannot fit, naming the flags that
make it smaller) counts, per rank, in bytes:
  weights, AdamW's two moments (fp32), and the gradients (fp32) during an update; with
  --parallel fsdp, 1/W of each, plus the gathered weights of the root and two blocks (compute
  dtype), the unsharded gradients and reduce-scatter copy of the root and a block, phase 1's fp32
  W_U, and the full copy in the compute dtype that sampling and evaluation decode with
  (infra/distributed.py);
  under bf16 without fsdp, autocast's bf16 copy of every weight while a forward region is open;
  the frozen reference of --kl-coef (compute dtype);
  rollout and evaluation: the KV cache of one call (--rollout-batch rows, or all of the rank's;
  --eval-batch problems x --eval-samples), one layer of it copied while finished rows leave, a
  block of the prompts' prefill, and the sampler's fp32 logits;
  the old pass: one block's tensors at a time, the kept h_l and h_L, and the diagnostics' seven
  chunks of fp32 logits (bupo.diagnostics);
  the update: the activations of one micro-batch's forward with gradients (all blocks, or with
  --grad-checkpoint each block's input plus one block; the attention mask, and on CUDA the keys
  and values repeated per query head, included), the fp32
  log-softmax of its positions plus two chunks of its gradient, and the embedding's gradient
  while it is summed.
The phases do not overlap (rollout, old pass, update, evaluation), so the peak is the largest. These
are estimates from the shapes, checked to bound the tensors a run holds on a CPU, and to stay
within 1.5x of them (tests/test_memory_plan.py, bench/memory_check.py); an allocator's rounding,
caching and fragmentation come on top: a plan that exceeds the device is refused, one within it is
not a promise.
"""
import sys

import torch

from infra.errors import UserError

GiB = 2**30


def params(cfg, per_block: bool = False) -> int:
    """The model's parameter count (or one block's), from the config's fields."""
    d, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attention = 2 * d * q + 2 * d * kv                      # q, o; k, v
    attention += (q + 2 * kv) * cfg.qkv_bias + d * cfg.o_bias + 2 * hd * cfg.qk_norm
    mlp = 3 * d * inter + (2 * inter + d) * cfg.mlp_bias    # gate, up, down
    block = attention + mlp + 2 * d                         # and two RMSNorm gains
    if per_block:
        return block
    unembedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + cfg.num_layers * block + d + unembedding


# bytes of fp32 logits a pass unembeds at once: positions go in chunks of
# LOGITS_BUDGET // (2 * 4 * V) (bupo.chunk_rows)
LOGITS_BUDGET = 256 * 2**20


def plan(cfg, args, prompt_tokens: int, world: int = 1, compute_bytes: int = 4) -> dict:
    """{phase: {item: bytes}} of one rank, for a model of config `cfg` trained with train.py's
    `args`; compute_bytes: 2 under bf16 autocast, 4 in fp32."""
    n, c = params(cfg), compute_bytes
    L, d, inter, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    Tp, R = prompt_tokens, args.max_new_tokens
    seq = Tp + R
    rows = args.prompts_per_step * args.group_size // world
    sharded, offload = getattr(args, "parallel", "dp") == "fsdp", offloads(args)
    W = world if sharded else 1
    of = f" 1/{W}" if sharded and W > 1 else ""
    # with --cpu-offload the fp32 state lives in CPU memory (offloaded(), not on the device)
    state = {} if offload else {f"weights (fp32{of})": 4 * n // W,
                                f"AdamW moments (fp32{of})": 8 * n // W}
    sampling, gathered = {}, {}
    if sharded:
        block = params(cfg, per_block=True)
        root = n - L * block
        sampling = {"full copy for decoding (compute dtype)": c * n,
                    f"its shards, cast for the gather (compute dtype{of})": c * n // W}
        if getattr(args, "compile", False):    # kept from step to step (distributed.py)
            state["full copy for the compiled decode step (compute dtype)"] = c * n
            sampling = {}
        gathered = {"gathered root and two blocks (compute dtype)": c * (root + 2 * block)}
        if getattr(args, "algo", "bupo") == "bupo":
            gathered["fp32 W_U of pi^l (phase 1)"] = 4 * V * d
        in_flight = {"the root's and a block's unsharded gradients, and the root's "
                     "reduce-scatter copy (fp32)": 4 * (2 * root + block)}
    else:    # the embedding's gradient: the compute-dtype matmul's, and its fp32 sum
        in_flight = {"the embedding's gradient in flight": (4 + c) * V * d}
    if not sharded and c < 4:
        state["bf16 copies of the weights (autocast)"] = c * n
        if getattr(args, "compile", False):     # model.for_decoding, kept from step to step
            tied = V * d if cfg.tie_word_embeddings else 0
            state["bf16 copy for the compiled decode step"] = c * (n + tied)
    if args.kl_coef > 0:
        state["reference model (--kl-coef)"] = c * n
    kv_bytes = 2 * L * kv * c                                   # keys and values, per token

    def decoding(n_rows, n_prompts):
        """A rollout call's KV cache, the transient copy of its compaction (one layer's keys
        or values of the rows that go on), the prompts' prefill (one block's tensors and the
        attention mask) and the sampler's fp32 logits and softmax."""
        cache = n_rows * seq * kv_bytes
        prefill = n_prompts * Tp * (c * (3 * d + 2 * q + 2 * kv + 3 * inter + Tp) + 8 * d)
        return {f"KV cache of {n_rows} rows x {seq} tokens": cache,
                "its compaction's copy": cache // (2 * L), "the prefill's block": prefill,
                "the sampler's logits (fp32)": 5 * 4 * V * n_rows}

    # one micro-batch of m rows: N response positions, unembedded in chunks
    m = min(args.micro_batch_size, rows)
    N = m * R
    chunk = min(max(1, LOGITS_BUDGET // (8 * V)), N)
    # a block's saved tensors per token: fp32 residual terms and norms, the compute-dtype
    # inputs of its matmuls, q / k / v / attention output, the MLP's gate, up and their
    # product, and the attention mask in the compute dtype (a row of seq keys)
    per_layer = 4 * 4 * d + c * (2 * d + 2 * q + 2 * kv + 4 * inter) + c * seq
    if str(getattr(args, "device", "cuda")).startswith("cuda") and q != kv:
        per_layer += c * 2 * q     # keys and values repeated per query head (model.attend)
    if args.grad_checkpoint:   # each block's input (fp32), the prompts' keys and values
        blocks = L * 4 * d + per_layer + L * 2 * kv * c
    else:
        blocks = L * per_layer
    # the diagnostics (bupo.diagnostics) hold 7 chunks of fp32 logits at once: the old pass's,
    # and the update's when it takes the sampler's log-probs as the old ones
    source = getattr(args, "old_logprobs", "auto")
    sampler_old = source == "sampler" or (source == "auto" and c == 4 and args.kl_coef == 0)
    old_pass = {**state, **gathered,
                "the kept h_l, h_L and the prompts' keys and values": m * seq * (3 * 4 * d
                                                                                 + L * 2 * kv * c),
                "a block's tensors": m * seq * per_layer,
                "the diagnostics' logits (fp32)": 7 * 4 * V * chunk}
    share = -(-args.eval_problems // world)       # a rank evaluates every W-th problem
    evals = min(args.eval_batch or share, share)
    rollout_rows = min(args.rollout_batch or rows, rows)
    return {
        "rollout": {**state, **sampling,
                    **decoding(rollout_rows, -(-rollout_rows // args.group_size))},
        "old pass": old_pass,
        "update": {**state, **({} if offload else {f"gradients (fp32{of})": 4 * n // W}),
                   **gathered, **in_flight,
                   f"activations of {m} rows x {seq} tokens": m * seq * blocks,
                   # each chunk's log-softmax is saved; a chunk's backward holds two more
                   "log-softmax and its gradient (fp32)":
                       4 * V * (N + (7 if sampler_old else 2) * chunk)},
        "evaluation": {**state, **sampling, **decoding(evals * args.eval_samples, evals)}
        if args.eval_every else state,
    }


def offloads(args) -> bool:
    """Whether the sharded fp32 state leaves the device for CPU memory (--cpu-offload on a GPU;
    on a CPU it is all one memory)."""
    return (getattr(args, "parallel", "dp") == "fsdp" and getattr(args, "cpu_offload", False)
            and str(getattr(args, "device", "cuda")).startswith("cuda"))


def offloaded(cfg, args, world: int = 1) -> int:
    """Bytes of CPU memory per rank that --cpu-offload holds: the fp32 weights, AdamW moments
    and gradients of its shard (0 without it)."""
    return 16 * params(cfg) // world if offloads(args) else 0


def peak(phases: dict) -> tuple[str, int]:
    """(phase, bytes) of the largest phase."""
    name = max(phases, key=lambda k: sum(phases[k].values()))
    return name, sum(phases[name].values())


def available(device: str) -> int | None:
    """Bytes a run may use on `device`: a GPU's total memory, a CPU's RAM (Linux; the total, since
    the plan's estimates run above what a CPU run measures, e.g. 4.1 GiB planned for the quick
    start's 3.3 GiB peak)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def describe(phases: dict, limit: int | None) -> str:
    """The plan as a few lines: each phase's items and total, the device's memory."""
    lines = []
    for name, items in phases.items():
        total = sum(items.values())
        lines.append(f"  {name}: {total / GiB:.1f} GiB = " + ", ".join(
            f"{k} {v / GiB:.2f}" for k, v in items.items() if v))
    where = f"{limit / GiB:.1f} GiB available" if limit else "available memory unknown"
    return "memory plan per rank (estimates, GiB; " + where + "):\n" + "\n".join(lines)


def fixes(names: list, args, state_fits: bool) -> str:
    """What would make the phases `names` fit: the flags of this run that are not given yet."""
    sharded, offload = getattr(args, "parallel", "dp") == "fsdp", offloads(args)
    # offloading to CPU memory helps a GPU only
    gpu = str(getattr(args, "device", "cuda")).startswith("cuda") and not offload
    if not state_fits:    # the weights and AdamW state alone: shard them, or move them to the CPU
        if not sharded:
            steps = ["--parallel fsdp under torchrun with more GPUs"
                     + (", or --parallel fsdp --cpu-offload on one" if gpu else "")]
        else:
            steps = [] if offload else ["more GPUs under torchrun"] + (["--cpu-offload"] * gpu)
        return ("the weights and AdamW state alone do not fit: "
                + (" or ".join(steps) if steps else "a smaller model or more GPUs"))
    each = {"rollout": ["--rollout-batch (fewer rows sampled at a time, a multiple of "
                        "--group-size)"] if not args.rollout_batch else [],
            "update": (["--micro-batch-size 1"] if args.micro_batch_size > 1 else [])
            + ([] if args.grad_checkpoint else ["--grad-checkpoint"]),
            "evaluation": ["--eval-batch 1"] if args.eval_batch != 1 else []}
    each["old pass"] = ["--micro-batch-size 1"] if args.micro_batch_size > 1 else []
    steps = list(dict.fromkeys(step for name in names for step in each[name]))
    if not steps and not sharded:
        steps = ["--parallel fsdp (the state sharded over the GPUs of torchrun"
                 + (", or in CPU memory with --cpu-offload on one GPU)" if gpu else ")")]
    elif not steps and gpu:
        steps = ["--cpu-offload"]
    return ("add " + " and ".join(steps) if steps
            else "shorten --max-new-tokens, or a device with more memory")


def check(cfg, args, prompt_tokens: int, device: str, world: int, compute_bytes: int,
          lead: bool = True) -> dict:
    """The plan of train.py's run from the model's config (its fields only), printed by rank 0; a
    run whose peak exceeds the device is refused in one line, before any weight is read (with
    --ignore-memory-plan it is only warned about)."""
    phases = plan(cfg, args, prompt_tokens, world, compute_bytes)
    limit = available(device)
    if lead:
        print(describe(phases, limit), file=sys.stderr, flush=True)
        host = offloaded(cfg, args, world)
        if host:
            print(f"  and in CPU memory (--cpu-offload): {host / GiB:.1f} GiB of fp32 weights, "
                  f"AdamW moments and gradients", file=sys.stderr, flush=True)
    name, need = peak(phases)
    if limit and need > limit:
        # what every phase holds: the weights and the optimizer's state
        state = sum(v for k, v in phases["rollout"].items()
                    if all(k in items for items in phases.values()))
        over = [k for k, items in phases.items() if sum(items.values()) > limit]
        fix = fixes(over, args, state < limit)
        why = (f"this run needs about {need / GiB:.1f} GiB per rank (its {name}, "
               f"{params(cfg) / 1e9:.2f}B parameters) and {device} has {limit / GiB:.1f} GiB "
               f"available; {fix}")
        if not getattr(args, "ignore_memory_plan", False):
            raise UserError(why + " (or --ignore-memory-plan to try anyway)")
        print(f"warning: {why}", file=sys.stderr)
    return phases
