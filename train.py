"""
GRPO and BuPO training of a decoder on a task with a verifiable reward.
(Paper section 3; docs/method.md.)

    python train.py --algo bupo --out runs/bupo      # default model, one-digit sums, CPU-sized
    python train.py --algo grpo --out runs/grpo --seed 1
    python train.py --resume runs/bupo --steps 40    # continue exactly where it stopped
    torchrun --standalone --nproc-per-node 8 train.py --device cuda --prompts-per-step 128
    \\
        --out runs/dp

One RL step, as rl_step runs it (steps count from 1, like the authors' global_steps):
  1. sample: P prompts and G responses to each, from the FULL policy at temperature T
     (rollout.generate), in both phases. The prompts are a fixed function of --seed and
     step.
  2. score: 1/0 from the last \\boxed{} (tasks.reward), then group advantages
     (bupo.group_advantages).
  3. old log-probs: the step optimises pi^l while step <= --internal-steps in BuPO (phase
     1), pi_theta after (bupo.phase_layer, eq. 10). A pass without gradients, at the
     weights of the start of the step, gives its old log-probs and the diagnostics
     (bupo.policy_logprobs). On pi_theta in fp32 the sampler's own log-probs are the old
     ones (--old-logprobs auto).
  4. update: --mini-batches AdamW steps on consecutive slices of the P*G responses (one
     epoch, no shuffle), on the clipped surrogate (bupo.policy_loss; on pi^l it is eq. 9).
     zero_grad(set_to_none=True), so in phase 1 the blocks above l stay untouched.
  5. log: one line of metrics.jsonl (infra/metrics.py says what each metric means).
main also evaluates (analyze.evaluate) and saves checkpoints (infra/runs.py).

Departures from the authors' code, on purpose:
  1. Phase 1's gradient passes stop the forward after block l. Nothing above l gets a
     gradient either way: the same loss and gradients, for less compute.
  2. The loss is an exact masked token-mean over each mini-batch, however it is cut into
     micro-batches (the authors' dynamic batching only approximates it; docs/method.md).
  3. The prompts are generated (tasks.py) instead of a 5k DeepMath file. The reward is
     theirs.
  4. Sizes fit a CPU: 8 prompts x 8 responses per step instead of 128 x 8, short
     responses. The ratios of the authors' schedule are kept: s_inter = 10% of the steps,
     4 updates.
  5. On pi_theta in fp32 the sampler's log-probs are the old ones.
     The authors recompute them, as --old-logprobs recompute does.
Scale enters as one call each: torchrun and FSDP2 (infra/distributed.py), mixed precision
(infra/precision.py).
"""
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import analyze
import bupo
import tasks
from analyze import evaluate
from infra import cli, memory, metrics, precision, runs, weights
from infra import distributed as dp
from model import Config, Transformer
from rollout import generate
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# one RL step

def rl_step(model, tok, src, opt, args, step, layer, ref=None, amp=contextlib.nullcontext,
            sampler_old: bool = False):
    """One RL step, in the order of the module docstring. amp(): a fresh autocast region.
    sampler_old: a step on pi_theta takes the sampler's log-probs as the old ones."""
    t0 = time.perf_counter()
    L, G = model.config.num_layers, args.group_size
    # 1. sample G responses to each of this rank's prompts, from the full policy
    problems, ro = sample_step(model, tok, src, args, step, amp)
    batch, device = bupo.Batch.of(ro), ro.response_ids.device
    # 2. score; the advantages of each group (a rank holds whole groups)
    rewards = torch.tensor([tasks.reward(text, problems[g].answer)
                            for text, g in zip(ro.text, ro.group.tolist())], device=device)
    adv = bupo.group_advantages(rewards, G, args.advantage)
    # 3. the policy this step optimises (eq. 10), and its old log-probs
    policy_layer = bupo.phase_layer(args.algo, step, args.internal_steps, layer, L)
    stats_layer = layer if args.algo == "bupo" else L
    groups = micro_batches(len(batch.ids), args, device)
    if sampler_old and policy_layer == L:
        # the sampler drew each token from pi_theta_old itself: its log-probs are the old
        # ones; the diagnostics come from the updates' forwards
        old, ref_logp, stats = ro.logprobs, None, {}
    else:
        old, ref_logp, stats = old_pass(model, ref, batch, groups, policy_layer, stats_layer,
                                        args, amp)
        stats_layer = None
    # 4. one AdamW step per mini-batch, on the clipped surrogate of the same policy
    sums, grad_norms, skipped = update(model, opt, batch, groups, old, ref_logp, adv,
                                       policy_layer, stats_layer, args, amp)
    # 5. the metrics of the whole step, over all ranks
    sums.update(n_tok=int(batch.response_mask.sum()),
                clipped=sum(f == "length" for f in ro.finish_reason),
                **{f"stat/{name}": v for name, v in stats.items()})
    return metrics.step_row(step, policy_layer, L, G, dp.all_gather(rewards),
                            dp.all_sum(sums, device), grad_norms, skipped, len(groups),
                            time.perf_counter() - t0, device)


def sample_step(model, tok, src, args, step, amp):
    """This rank's prompts of the step, and G responses to each."""
    problems = src.step(step, args.prompts_per_step, args.seed)
    mine = dp.my_prompts(len(problems), args.mini_batches)    # all of them in one process
    problems = [problems[g] for g in mine]
    first = (args.seed << 32) + step * args.prompts_per_step  # prompt g: seed first + g (any rank)
    # a sharded model (or the compiled step) decodes from a copy made once per step
    policy = dp.sampling_model(model, args)
    with amp():
        ro = generate(policy, [src.encode(tok, p) for p in problems], args.group_size,
                      args.max_new_tokens, args.temperature, stop_ids=tok.stop_ids,
                      pad_id=tok.pad_id, seed=[first + g for g in mine], tokenizer=tok,
                      compile=args.compile, max_rows=args.rollout_batch)
    return problems, ro


def micro_batches(n: int, args, device="cpu") -> list:
    """The rows of each mini-batch: consecutive slices, cut into micro-batches. The old
    pass uses the same cuts as the updates: the first update's ratio is exactly 1."""
    return [list(mb.split(args.micro_batch_size))
            for mb in torch.arange(n, device=device).chunk(args.mini_batches)]


@torch.no_grad()
def old_pass(model, ref, batch, groups, layer, stats_layer, args, amp):
    """The old log-probs [n, R] of pi^layer, the reference model's (with --kl-coef) and
    the sums of the diagnostics at stats_layer, on the micro-batches of the updates."""
    old = torch.zeros_like(batch.response_mask, dtype=torch.float)
    ref_logp = torch.zeros_like(old) if ref is not None else None
    stats = {}
    with amp():
        for rows in (rows for mb in groups for rows in mb):
            mb_batch = batch.rows(rows)
            R = mb_batch.ids.shape[1] - mb_batch.Tp
            old[rows, :R], mb_stats = bupo.policy_logprobs(model, mb_batch, layer,
                                                           args.temperature, stats_layer)
            if ref is not None:   # the same policy (pi^l in phase 1) of the initial model
                ref_logp[rows, :R] = bupo.policy_logprobs(ref, mb_batch, layer,
                                                          args.temperature)[0]
            add_sums(stats, mb_stats)
    return old, ref_logp, stats


def update(model, opt, batch, groups, old, ref_logp, adv, layer, stats_layer, args, amp):
    """One AdamW step per mini-batch, on the clipped surrogate of pi^layer. Returns the
    sums of the loss statistics (and diagnostics), the grad norms, the updates skipped."""
    device = batch.ids.device
    sums, grad_norms, skipped = {}, [], 0
    for k, mb in enumerate(groups):
        # the loss is normalised by the whole mini-batch, all ranks together (departure 2)
        rows = torch.cat(mb)
        totals = dp.all_sum({"num_seqs": len(rows),
                             "num_tokens": int(batch.response_mask[rows].sum())}, device)
        totals = {name: int(v) for name, v in totals.items()} | {"max_len": args.max_new_tokens}
        loss_sum = 0.0
        for rows in mb:
            mb_batch = batch.rows(rows)
            with amp():       # the forward only; backward and opt.step outside
                logp, stats = bupo.policy_logprobs(model, mb_batch, layer, args.temperature,
                                                   stats_layer)
            R, mask = logp.shape[1], mb_batch.response_mask
            tok_loss, s = bupo.policy_loss(logp, old[rows, :R], adv[rows], mask, args.clip_low,
                                           args.clip_high, args.dual_clip)
            if ref_logp is not None:
                kl = bupo.kl_penalty(logp, ref_logp[rows, :R], args.kl_type)
                tok_loss = tok_loss + args.kl_coef * kl
                s["kl_ref"] = (kl.detach() * mask).sum()
            loss = bupo.aggregate(tok_loss, mask, args.loss_agg, **totals)
            loss.backward()
            loss_sum += loss.item()
            add_sums(sums, stats, "stat/")
            add_sums(sums, s)
        grad_norm = dp.clip_grads(model, args.grad_clip)     # summed over ranks, then clipped
        bad_loss = dp.all_sum({"bad": not math.isfinite(loss_sum)}, device)["bad"]
        if math.isfinite(grad_norm) and bad_loss == 0:
            opt.step()
            grad_norms.append(grad_norm)
        else:            # a NaN/inf loss or gradient never reaches the weights
            skipped += 1
        opt.zero_grad(set_to_none=True)      # None, not 0: AdamW skips them (phase 1)
        sums[f"loss/{k}"] = loss_sum         # this rank's share of mini-batch k's loss
    return sums, grad_norms, skipped


def add_sums(into: dict, values: dict, prefix: str = ""):
    """into[prefix + name] += the sum of each value (a tensor of any shape)."""
    for name, v in values.items():
        into[prefix + name] = into.get(prefix + name, 0.0) + float(v.sum())


# -----------------------------------------------------------------------------
# the run

def main(argv=None):
    try:
        run_training(argv)
    finally:             # a run folder's lock ends with the command, however it ends
        runs.unlock_all()


def run_training(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    cli.check_train(args)
    # un-normed W_U h_l logits are so spread that softmax underflows into subnormal
    # floats, which CPUs compute slowly: flush them to 0 instead
    torch.set_flush_denormal(True)
    # a resumed run's newest checkpoint, its weights checked on the meta device
    args, state, model_dir = runs.open_run(args, argv, build_parser, RESUME_MAY_CHANGE,
                                           BEFORE_THE_FLAG,
                                           lambda c: Transformer.from_pretrained(c, device="meta"))
    device = dp.setup(args.device, args.prompts_per_step, args.mini_batches, args.eval_problems,
                      args.eval_every > 0, args.parallel)
    lead = dp.rank() == 0         # only rank 0 writes files and prints progress
    src = tasks.source(args)      # every data file read and checked, before any weight
    if state:                     # a resume trains on the data files the run started with
        runs.check_data(args, state, src.files)
    model, tok = load(model_dir, not state, src, args, device, lead)
    # the internal layer l of phase 1: rank 0's choice for a new run, the saved one on
    # resume
    layer = state["internal_layer"] if state else model.config.num_layers
    if not state and args.algo == "bupo" and lead:
        layer = analyze.resolve_layer(args.internal_layer, model, tok, args, src)
    layer = int(dp.all_sum({"layer": layer if lead else 0}, device)["layer"])
    if not state and lead:        # args.json, metrics.jsonl; an old run moved aside
        runs.start(args.out, args, args.overwrite, src.files)
    dtype = precision.compute_dtype(args.dtype, device)
    if args.parallel == "fsdp":   # each rank keeps 1/W of the weights and optimizer state
        dp.shard(model, device, dp.world(), dtype, args.cpu_offload)
    # the frozen reference of --kl-coef only runs forwards: the compute dtype
    ref = (Transformer.from_pretrained(args.model, dtype=dtype, device=device)
           if args.kl_coef > 0 else None)
    opt = optimizer(model, args)
    start = runs.restore(lambda saved: dp.load_optimizer(model, opt, saved), state, args.out,
                         lead, dp.world())
    stop = cli.stop_after_ctrl_c()
    # one autocast region per forward phase (a sharded model casts through FSDP2 instead)
    amp = contextlib.nullcontext if dp.is_sharded(model) else precision.regions(device, dtype)
    sampler_old = old_logprobs_source(args, dtype, ref) == "sampler"
    # a fixed prompt whose logits must stay finite (runs.check_health)
    probe = torch.tensor([src.encode(tok, src.step(1, 1, args.seed)[0])], device=device)
    step, stopping = start - 1, False
    if start == 1 and args.eval_every:
        row = {"step": 0, **evaluate(model, tok, src, args, amp)}
        if lead:
            runs.log(args.out, row)
    bar = tqdm(range(start, args.steps + 1), initial=start - 1, total=args.steps,
               desc=args.algo, disable=not lead)
    for step in bar:
        row = rl_step(model, tok, src, opt, args, step, layer, ref, amp, sampler_old)
        runs.check_health(model, probe, step, args, amp)    # nothing unusable is saved
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            row.update(evaluate(model, tok, src, args, amp))
        if lead:
            runs.log(args.out, row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", phase=row["phase"],
                        s_step=f"{row['step_time']:.0f}")
        # every rank stops after the same step
        stopping = dp.all_sum({"stop": len(stop)}, device)["stop"] > 0
        if (step % args.save_every == 0 or step in (args.steps, runs.phase1_end(args))
                or stopping):
            runs.checkpoint(model, opt, args, step, layer, lead)   # every rank takes part
        if stopping:
            break
    if lead:
        phase1 = f", pi^{layer} for steps 1..{args.internal_steps}" if args.algo == "bupo" else ""
        runs.finish(args.out, f"{args.algo} on {Path(args.model).name}, task {args.task}{phase1}",
                    step, stopping)
    dp.teardown()


def load(model_dir, new_run: bool, src, args, device, lead: bool):
    """The model and tokenizer of a run on this rank's device. config.json is read once,
    the tokenizer built once, and the memory plan checked before any weight is read."""
    if new_run and lead:
        weights.ensure_if_default(model_dir)   # the default model, built on first use
    dp.barrier()                               # rank 0 has built it
    config = Config.read(model_dir, device)    # the folder, the device and config.json, checked
    tok = Tokenizer(model_dir, config)
    prompt = src.longest_prompt(tok, args, say=print if lead else None)
    compute = precision.compute_dtype(args.dtype, device).itemsize
    memory.check(config, args, prompt, device, dp.world(), compute, lead)
    cli.fits_context(prompt, args.max_new_tokens, config.max_position_embeddings,
                     f"the longest {'file' if args.data else args.task} prompt")
    model = Transformer.from_pretrained(model_dir, device=device, config=config)
    model.grad_checkpoint = args.grad_checkpoint
    return model, tok


def optimizer(model, args):
    """AdamW on every weight, constant --lr; fused: one kernel per step, no temporaries the
    size of the model."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                             weight_decay=args.weight_decay, fused=True)


def old_logprobs_source(args, dtype, ref) -> str:
    """Where a step on pi_theta takes its old log-probs (--old-logprobs).

    The sampler's are log softmax(logits / T) of the same policy, token and prefix
    (training has no top-k/p filter), from the KV-cache decode instead of one pass: equal
    up to the rounding of other shapes in fp32 (a test bounds it). In bf16 the two round
    apart by more, so auto recomputes there, as verl and TRL do; with --kl-coef the old
    pass also computes the reference's log-probs. Phase 1 always recomputes pi^l's."""
    if args.old_logprobs != "auto":
        return args.old_logprobs
    return "sampler" if dtype == torch.float32 and ref is None else "recompute"


# -----------------------------------------------------------------------------
# the command line

OLD_LOGPROBS = ("auto", "sampler", "recompute")
# flags a resume may change: they change where or how often, not what is computed
RESUME_MAY_CHANGE = ("steps", "device", "save_every", "keep_checkpoints", "micro_batch_size",
                     "rollout_batch", "grad_checkpoint", "ignore_memory_plan",
                     "eval_batch", "parallel", "cpu_offload", "save_phase1_end",
                     "accept_data_change")
# a flag added since a run was saved takes this value on its resume (what the run did)
BEFORE_THE_FLAG = {"old_logprobs": "recompute"}


def build_parser():
    p = cli.Parser(description="GRPO / BuPO training with a verifiable reward.")
    g = cli.add_model_args(p, dtype=False)
    g.add_argument("--dtype", default="auto", choices=["auto", *precision.DTYPES],
                   help="compute dtype; bfloat16: mixed precision (infra/precision.py), also on a "
                   "CPU (slowly); auto: bfloat16 on CUDA, float32 elsewhere")
    runs.add_run_args(p, RESUME_MAY_CHANGE)
    g = p.add_argument_group("task and rollout")
    g.add_argument("--task", default="add", choices=sorted(tasks.TASKS), help=tasks.HELP)
    g.add_argument("--shots", type=int, default=None, choices=[0, 1],
                   help="1: a worked example before each question (a --task's own; for --data "
                   "see --example); default 1 for a --task, 0 for --data")
    g.add_argument("--prompts-per-step", type=int, default=8,
                   help="P, prompts per RL step (the authors: 128)")
    g.add_argument("--group-size", type=int, default=8, help="G, responses per prompt")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest response")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="rollout temperature, > 0 (also divides the training logits)")
    tasks.add_data_args(p, train=True)
    g = p.add_argument_group("objective")
    g.add_argument("--algo", default="bupo", choices=["bupo", "grpo"],
                   help="bupo: phase 1 on pi^l, then GRPO")
    g.add_argument("--advantage", default="grpo", choices=bupo.ADVANTAGES,
                   help="group baseline: grpo z-score, drgrpo, rloo")
    g.add_argument("--loss-agg", default="token-mean", choices=bupo.AGGREGATIONS,
                   help="loss aggregation (bupo.py)")
    g.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1, in [0, 1)")
    g.add_argument("--clip-high", type=float, default=0.2, help="ratio clip above 1")
    g.add_argument("--dual-clip", type=float, default=10.0,
                   help="dual-clip constant c > 1 for A < 0 (0 = off)")
    g.add_argument("--kl-coef", type=float, default=0.0,
                   help="weight of a KL penalty to the frozen initial model")
    g.add_argument("--kl-type", default="k3", choices=["k1", "k3"], help="KL estimator")
    g.add_argument("--old-logprobs", default="auto", choices=OLD_LOGPROBS,
                   help="old log-probs of a step on pi_theta: sampler = the rollout's own; "
                   "recompute = a pass at the step's start weights; auto = sampler in fp32 "
                   "without --kl-coef, else recompute (phase 1 always recomputes)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate, constant")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm")
    g.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per RL step")
    cli.add_scale_args(p)
    g = p.add_argument_group("BuPO")
    g.add_argument("--internal-layer", default="auto",
                   help="paper layer l (1-based) of phase 1, or auto (from an analysis)")
    g.add_argument("--analysis", default=None,
                   help="entropy.json of analyze.py for auto (else a quick analysis)")
    g.add_argument("--internal-steps", type=int, default=2,
                   help="s_inter: steps 1..s_inter optimise pi^l (the authors: 30 of 300)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=10,
                   help="evaluate every N steps, before and after (0 = never)")
    g.add_argument("--eval-problems", type=int, default=32, help="held-out problems")
    g.add_argument("--eval-samples", type=int, default=4, help="n of avg@n and pass@k")
    return p


if __name__ == "__main__":
    cli.run(main)
