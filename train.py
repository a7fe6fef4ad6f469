"""
GRPO and BuPO training of a decoder on a task with a verifiable reward (paper section 3;
docs/method.md).

    python train.py --algo bupo --out runs/bupo      # default model, one-digit sums, CPU-sized
    python train.py --algo grpo --out runs/grpo --seed 1
    python train.py --resume runs/bupo --steps 40    # continue exactly where it stopped
    torchrun --standalone --nproc-per-node 8 train.py --device cuda --prompts-per-step 128 \\
        --out runs/dp

One RL step (steps count from 1, like the authors' global_steps), in the order rl_step runs it:
  1. sample: P prompts of the task (a fixed function of --seed and the step) and G responses to
     each, from the FULL policy at temperature T (rollout.py), in both phases.
  2. score: 1/0 from the last \\boxed{} (tasks.reward); group advantages (bupo.group_advantages).
  3. the policy of the step: bupo.phase_layer, pi^l while step <= --internal-steps in BuPO (phase
     1), pi_theta after (eq. 10). Its "old" log-probs, no grad, with the weights of the start of the
     step (bupo.policy_logprobs), and diagnostics: H(pi_theta) always, H(pi^l), KL(pi^l ||
     pi_theta), cos(h_l, h_L) for BuPO in both phases (bupo.policy_stats). On pi_theta in fp32
     the sampler's own log-probs are the old ones (--old-logprobs auto): no old pass, and the
     diagnostics come from the updates' forwards.
  4. update: --mini-batches AdamW updates on consecutive slices of the P*G responses (1 epoch, no
     shuffle), each the clipped surrogate of the same policy (bupo.policy_loss; on pi^l it is eq.
     9), token-mean, grad-norm clip 1.0, and zero_grad(set_to_none=True), so that in phase 1 the
     blocks above l and the final norm stay untouched. An update whose loss or gradient norm is not
     finite is skipped and counted (metric skipped_steps).
  5. log one line of metrics.jsonl; evaluate every --eval-every steps; save every --save-every
     steps.
Evaluation on held-out problems before training, every --eval-every steps and at the end: greedy
accuracy, avg@n and the unbiased pass@k = 1 - C(n-c, k) / C(n, k) over n = --eval-samples samples at
T.

Departures from the authors' code, on purpose:
  1. Phase 1's gradient passes stop the forward after block l: nothing above l gets a gradient
     either way, so the loss and the gradients are the authors', for a fraction of the compute (they
     run all L blocks).
  2. The loss is an exact masked token-mean over each mini-batch, however it is cut into
     micro-batches (the authors' dynamic batching only approximates it; docs/method.md).
  3. The prompts are generated (tasks.py) instead of a 5k DeepMath file; the reward is the authors'.
  4. Sizes fit a CPU: 8 prompts x 8 responses per step instead of 128 x 8, short responses. The
     ratios of the authors' schedule (s_inter = 10% of the steps, 4 updates per step) are kept.
  5. On pi_theta in fp32 the sampler's log-probs are the old ones (--old-logprobs auto; the authors
     recompute them, as --old-logprobs recompute does).
Data parallelism under torchrun: infra/distributed.py, sharding: infra/fsdp.py. What each metric of
OUT/metrics.jsonl means (one line per step, TRL's names where TRL has one): infra/metrics.py. The
run folder (args.json, metrics.jsonl, curves.png, checkpoints/) and its safety rules: infra/runs.py.
"""
import argparse
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
from infra import cli, fsdp, metrics, precision, runs
from infra.evaluation import evaluate
from infra import distributed as dp
from model import Transformer
from rollout import generate

# flags that may differ from the saved run's when resuming: they change where or how often, not what
# is computed
OLD_LOGPROBS = ("auto", "sampler", "recompute")
# a flag added since a run was saved takes this value on its resume (what the run did), not the
# default
BEFORE_THE_FLAG = {"old_logprobs": "recompute"}
RESUME_MAY_CHANGE = ("steps", "device", "save_every", "keep_checkpoints", "micro_batch_size",
                     "rollout_batch", "grad_checkpoint", "ignore_memory_plan",
                     "eval_batch", "parallel")


# -----------------------------------------------------------------------------
# arguments

def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(description="GRPO / BuPO training with a verifiable reward.")
    g = cli.add_model_args(p, dtype=False)
    g.add_argument("--dtype", default="auto", choices=["auto", *precision.DTYPES],
                   help="compute dtype. bfloat16: "
                   "mixed precision (bf16 matmuls under autocast; fp32 master weights, optimizer "
                   "state, norms, log-probs, entropies; infra/precision.py), also on a CPU "
                   "(slowly); auto: bfloat16 on CUDA, float32 elsewhere")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train",
                   help="output folder: args.json, metrics.jsonl, curves.png, checkpoints/")
    g.add_argument("--resume", default=None,
                   help="a run folder: continue from its newest complete checkpoint, "
                   "with the saved arguments (only "
                   + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
                   + " may differ)")
    g.add_argument("--overwrite", action="store_true", help="if --out holds a run, move it aside "
                   "to OUT.old-<time>/ (never deleted) and start a new one")
    g.add_argument("--steps", type=int, default=20,
                   help="RL steps in total (with --resume: the saved run's, unless given)")
    g.add_argument("--save-every", type=int, default=10,
                   help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="how many recent checkpoints to keep")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts, the sampler and the held-out draws")
    g = p.add_argument_group("task and rollout")
    g.add_argument("--task", default="add", choices=sorted(tasks.TASKS), help=tasks.HELP)
    g.add_argument("--shots", type=int, default=None, choices=[0, 1],
                   help="1: a worked example of the task before each question (tasks.py; 0: "
                   "the authors' zero-shot prompt, which a 135M model rarely answers in a box); "
                   "default 1 for a --task, 0 for --data")
    g.add_argument("--prompts-per-step", type=int, default=8,
                   help="P prompts per step (the authors: 128)")
    g.add_argument("--group-size", type=int, default=8,
                   help="G responses per prompt (the authors: 8)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest response")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout temperature, > 0 (also "
                   "divides the training logits)")
    g.add_argument("--compile", action="store_true", help="sample with the compiled decode step "
                   "(torch.compile; slower than eager on a CPU, see docs/usage.md, 'Sampling')")
    g.add_argument("--rollout-batch", type=int, default=0,
                   help="responses sampled together, a multiple of --group-size (memory only: "
                   "the KV cache holds this many rows; 0 = all of the step's at once)")
    cli.add_data_args(p, train=True)
    g = p.add_argument_group("objective")
    g.add_argument("--algo", default="bupo", choices=["bupo", "grpo"],
                   help="bupo: phase 1 on pi^l, then GRPO")
    g.add_argument("--advantage", default="grpo", choices=bupo.ADVANTAGES, help="group baseline: "
                   "grpo z-score, drgrpo, rloo")
    g.add_argument("--loss-agg", default="token-mean", choices=bupo.AGGREGATIONS,
                   help="loss aggregation (bupo.py)")
    g.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1, in [0, 1)")
    g.add_argument("--clip-high", type=float, default=0.2,
                   help="ratio clip above 1 (clip-higher when > clip-low)")
    g.add_argument("--dual-clip", type=float, default=10.0,
                   help="dual-clip constant c > 1 for A < 0 (0 = off)")
    g.add_argument("--kl-coef", type=float, default=0.0,
                   help="weight of a KL penalty to the frozen initial model")
    g.add_argument("--kl-type", default="k3", choices=["k1", "k3"], help="KL estimator")
    g.add_argument("--old-logprobs", default="auto", choices=OLD_LOGPROBS,
                   help="the old policy's log-probs when a step optimises pi_theta: sampler = "
                   "the rollout's own (no old pass; the diagnostics come from the updates' "
                   "forwards), recompute = a no-grad pass at the step's start weights; auto = "
                   "sampler in fp32 without --kl-coef, else recompute (phase 1 always recomputes)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-6,
                   help="AdamW learning rate, constant (the authors: 1e-6)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm")
    g.add_argument("--mini-batches", type=int, default=4,
                   help="optimizer steps per RL step (the authors: 4)")
    g.add_argument("--micro-batch-size", type=int, default=8,
                   help="responses per forward/backward pass (memory only)")
    g.add_argument("--ignore-memory-plan", action="store_true", help="start even when the memory "
                   "plan printed at the start exceeds the device (its estimates are upper bounds)")
    g.add_argument("--parallel", default="dp", choices=["dp", "fsdp"], help="under torchrun: dp "
                   "replicates the model and optimizer on every rank; fsdp shards them (FSDP2, "
                   "infra/fsdp.py), for models whose state does not fit one device")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block in the backward pass instead of keeping its "
                   "activations (memory only: the same gradients, about one more forward)")
    g = p.add_argument_group("BuPO")
    g.add_argument("--internal-layer", default="auto",
                   help="paper layer l (1-based: pi^l = softmax(W_U h_l)) of "
                   "phase 1, or auto (bupo.choose_internal_layer on an analysis)")
    g.add_argument("--analysis", default=None,
                   help="entropy.json of analyze.py for auto (else a quick analysis)")
    g.add_argument("--internal-steps", type=int, default=2, help="s_inter: steps 1..s_inter "
                   "optimise pi^l (the authors: 30 of 300)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=10,
                   help="evaluate every N steps, before and after (0 = never)")
    g.add_argument("--eval-problems", type=int, default=32, help="held-out problems per evaluation")
    g.add_argument("--eval-samples", type=int, default=4,
                   help="n samples per problem for avg@n and pass@k")
    g.add_argument("--eval-batch", type=int, default=0, help="problems sampled together (memory "
                   "only: the KV cache grows with problems x samples; 0 = all at once)")
    return p


# -----------------------------------------------------------------------------
# one RL step

def micro_batches(n: int, args):
    """Row groups of each mini-batch: consecutive slices (one epoch, no shuffle), cut into
    micro-batches. The old pass uses the same groups as the updates, so the first mini-batch
    reproduces the old log-probs bit for bit."""
    return [list(mb.split(args.micro_batch_size))
            for mb in torch.arange(n).chunk(args.mini_batches)]


def rl_step(model, tok, src, opt, args, step, layer, ref=None, amp=contextlib.nullcontext,
            sampler_old: bool = False):
    """One RL step, in the order of the module docstring's algorithm. amp: a fresh autocast region
    per forward phase, never around opt.step() (infra/precision.py). sampler_old: the rollout's
    log-probs serve as the old ones whenever the step optimises pi_theta (old_logprobs_source)."""
    t0 = time.perf_counter()
    L, G = model.config.num_layers, args.group_size
    # 1. sample G responses to each of this rank's prompts, from the full policy
    problems, ro = sample_step(model, tok, src, args, step, amp)
    device, batch = ro.response_ids.device, bupo.Batch.of(ro)
    # 2. score, and the advantages of each group (a rank holds whole groups)
    rewards = torch.tensor([tasks.reward(t, problems[g].answer)
                            for t, g in zip(ro.text, ro.group.tolist())], device=device)
    adv = bupo.group_advantages(rewards, G, args.advantage)
    # 3. the policy this step optimises (eq. 10), its old log-probs (start-of-step weights), the
    #    diagnostics
    policy_layer = bupo.phase_layer(args.algo, step, args.internal_steps, layer, L)
    stats_layer = layer if args.algo == "bupo" else L
    groups = micro_batches(len(batch.ids), args)
    from_sampler = sampler_old and policy_layer == L
    if from_sampler:
        # the sampler drew each token from pi_theta_old itself (T, no filter): its log-probs are the
        # old ones, and the diagnostics come from the updates' forwards
        old, ref_logp, stats = ro.logprobs, None, {}
    else:
        old, ref_logp, stats = old_pass(model, ref, batch, groups, policy_layer, stats_layer,
                                        args, amp)
    # 4. the updates: one AdamW step per mini-batch, on the clipped surrogate of the same policy
    sums, grad_norms, skipped = update(model, opt, batch, groups, old, ref_logp, adv, policy_layer,
                                       args, amp, stats_layer if from_sampler else None)
    # 5. the metrics of the whole step
    sums.update(n_tok=int(batch.response_mask.sum()),
                clipped=sum(f == "length" for f in ro.finish_reason),
                **{f"stat/{name}": v for name, v in stats.items()})
    return metrics.step_row(step, policy_layer, L, G, dp.all_gather(rewards),
                            dp.all_sum(sums, device), grad_norms, skipped, len(groups),
                            time.perf_counter() - t0, device)


def old_logprobs_source(args, dtype, ref) -> str:
    """Where a step on pi_theta takes its old log-probs (--old-logprobs; phase 1 always recomputes
    pi^l's). The sampler's are log softmax(logits / T) of the same policy, token and prefix
    (training has no top-k/p filter), computed by the KV-cache decode instead of one pass: equal up
    to the float rounding of other shapes in fp32 (a test bounds it). In bf16 the two paths round
    apart by more, so auto recomputes there, as verl and TRL do beside an inference engine; with
    --kl-coef the old pass also computes the reference's log-probs."""
    if args.old_logprobs != "auto":
        return args.old_logprobs
    return "sampler" if dtype == torch.float32 and ref is None else "recompute"


def sample_step(model, tok, src, args, step, amp):
    """This rank's prompts of the step (a fixed function of --seed and the step) and G responses to
    each."""
    problems = src.step(step, args.prompts_per_step, args.seed)
    mine = dp.my_prompts(len(problems), args.mini_batches)      # all of them in a single process
    problems = [problems[g] for g in mine]
    # prompt g of the step: first_seed + g
    first_seed = (args.seed << 32) + step * args.prompts_per_step
    # a sharded model decodes from a full copy in the compute dtype, gathered once for the step
    policy = fsdp.sampling_model(model, args)
    with amp():
        ro = generate(policy,
                      [src.encode(tok, p) for p in problems],
                      args.group_size, args.max_new_tokens, args.temperature, stop_ids=tok.stop_ids,
                      pad_id=tok.pad_id, seed=[first_seed + g for g in mine], tokenizer=tok,
                      compile=args.compile, max_rows=args.rollout_batch)
    return problems, ro


@torch.no_grad()
def old_pass(model, ref, batch, groups, policy_layer, stats_layer, args, amp):
    """The old log-probs [n, R] of the step's policy, the reference model's (with --kl-coef, else
    None), and the sums of the diagnostics at stats_layer (bupo.policy_stats), on the micro-batches
    the updates use."""
    with amp():
        old, stats = torch.zeros_like(batch.response_mask, dtype=torch.float), {}
        ref_logp = torch.zeros_like(old) if ref is not None else None
        for rows in (rows for mb in groups for rows in mb):
            mb_batch = batch.rows(rows)
            R = mb_batch.ids.shape[1] - mb_batch.Tp
            # one forward for both: the old log-probs and the diagnostics
            old[rows, :R], mb_stats = bupo.old_logprobs_and_stats(model, mb_batch, policy_layer,
                                                                  stats_layer, args.temperature)
            if ref is not None:   # the same policy (pi^l in phase 1) of the frozen initial model
                ref_logp[rows, :R] = bupo.policy_logprobs(ref, mb_batch, policy_layer,
                                                          args.temperature)
            add_sums(stats, mb_stats)
    return old, ref_logp, stats


def update(model, opt, batch, groups, old, ref_logp, adv, policy_layer, args, amp,
           stats_layer=None):
    """One AdamW step per mini-batch of `groups` (1 epoch, no shuffle) on the clipped surrogate;
    returns the sums of the loss statistics, the grad norms of the steps taken and how many were
    skipped. stats_layer: also the sums of the diagnostics at that layer from the same forwards
    (sums["stat/..."]; mini-batch k at the weights after k updates, as TRL logs its entropy)."""
    device = batch.ids.device
    sums, grad_norms, skipped = {}, [], 0
    for k, mb in enumerate(groups):
        rows_all = torch.cat(mb)
        # the loss is normalised by the whole mini-batch, all ranks together (exact token-mean,
        # departure 2)
        totals = dp.all_sum({"num_seqs": len(rows_all),
                             "num_tokens": int(batch.response_mask[rows_all].sum())},
                            device)
        totals = {k_: int(v) for k_, v in totals.items()} | {"max_len": args.max_new_tokens}
        loss_total = 0.0
        for rows in mb:
            mb_batch = batch.rows(rows)
            with amp():
                # the forward only; backward and opt.step outside
                if stats_layer is None:
                    logp = bupo.policy_logprobs(model, mb_batch, policy_layer, args.temperature)
                else:
                    logp, mb_stats = bupo.logprobs_and_stats(model, mb_batch, policy_layer,
                                                             stats_layer, args.temperature)
                    add_sums(sums, mb_stats, "stat/")
            R, rm = logp.shape[1], mb_batch.response_mask
            tok_loss, s = bupo.policy_loss(logp, old[rows, :R], adv[rows], rm, args.clip_low,
                                           args.clip_high,
                                           args.dual_clip)
            if ref_logp is not None:
                kl = bupo.kl_penalty(logp, ref_logp[rows, :R], args.kl_type)
                tok_loss = tok_loss + args.kl_coef * kl
                s["kl_ref"] = (kl.detach() * rm).sum()
            loss = bupo.aggregate(tok_loss, rm, args.loss_agg, **totals)
            loss.backward()
            loss_total += loss.item()
            add_sums(sums, s)
        if not fsdp.is_sharded(model):       # FSDP sums its gradients itself (infra/fsdp.py)
            dp.all_reduce_grads(model)
        gn = fsdp.grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        if (math.isfinite(gn)
            and dp.all_sum({"bad": not math.isfinite(loss_total)}, device)["bad"] == 0):
            opt.step()
            grad_norms.append(gn)
        else:
            # a NaN/inf loss or gradient never reaches the weights (as the authors' trainer guards
            # it)
            skipped += 1
        # None, not 0: AdamW skips params without a gradient
        opt.zero_grad(set_to_none=True)
        # this rank's share of mini-batch k's loss
        sums[f"loss/{k}"] = loss_total
    return sums, grad_norms, skipped


def add_sums(into: dict, values: dict, prefix: str = ""):
    """into[prefix + name] += the sum of each value (a tensor of any shape)."""
    for name, v in values.items():
        into[prefix + name] = into.get(prefix + name, 0.0) + float(v.sum())


# -----------------------------------------------------------------------------

def main(argv=None):
    try:
        run_training(argv)
    finally:             # a run folder's lock ends with the command, however it ends (runs.lock)
        runs.unlock_all()


def run_training(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    cli.check_train(args)
    # un-normed W_U h_l logits are so spread that softmax underflows into subnormal floats, which
    # CPUs compute ~5x slower: flush them to 0 instead
    torch.set_flush_denormal(True)
    # the weights of a checkpoint to resume are checked on the meta device: the rank's device is
    # not chosen yet, and under torchrun every rank would load onto the default GPU
    args, state, model_dir = runs.open_run(args, argv, build_parser, RESUME_MAY_CHANGE,
                                           BEFORE_THE_FLAG,
                                           lambda c: Transformer.from_pretrained(c, device="meta"))
    device = dp.setup(args.device, args.prompts_per_step, args.mini_batches, args.eval_problems,
                      args.eval_every > 0, args.parallel)
    # only rank 0 writes files and prints progress
    lead = dp.rank() == 0
    src = tasks.source(args)    # every data file read and checked, before any weight
    model, tok = cli.load_for_training(model_dir, not state, src, args, device, lead)
    # the internal layer l of BuPO's phase 1: rank 0's choice for a new run, the saved one on resume
    layer = state["internal_layer"] if state else model.config.num_layers
    if not state and args.algo == "bupo" and lead:
        layer = analyze.resolve_layer(args.internal_layer, model, tok, args, src)
    layer = int(dp.all_sum({"layer": layer if lead else 0}, device)["layer"])
    if not state and lead:   # args.json, metrics.jsonl; an old run moved aside
        runs.start(args.out, args, args.overwrite)
    dtype = precision.compute_dtype(args.dtype, device)
    if args.parallel == "fsdp":
        # each rank keeps 1/W of the weights, gradients and AdamW state; bf16 through FSDP2's
        # mixed-precision policy instead of autocast regions (infra/fsdp.py)
        fsdp.shard(model, device, dp.world(), dtype)
    # the frozen reference of --kl-coef only runs forwards: its weights in the compute dtype
    ref = (Transformer.from_pretrained(args.model, dtype=dtype, device=device)
           if args.kl_coef > 0 else None)
    # fused AdamW: one kernel per step, no foreach temporaries the size of the model (3.6x faster
    # than foreach on a CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999),
                            weight_decay=args.weight_decay, fused=True)
    # 1, or the step after the resumed one
    start = runs.restore(lambda saved: fsdp.load_optimizer(model, opt, saved), state, args.out,
                         lead, dp.world())
    stop = cli.stop_after_ctrl_c()
    # mixed precision: one autocast region per forward phase, inside rl_step / evaluate (a
    # sharded model casts through FSDP2's policy instead)
    amp = (contextlib.nullcontext if fsdp.is_sharded(model)
           else lambda: precision.autocast(device, dtype))
    sampler_old = old_logprobs_source(args, dtype, ref) == "sampler"
    step, stopping = start - 1, False
    if start == 1 and args.eval_every:
        row = {"step": 0, **evaluate(model, tok, src, args, amp)}
        if lead:
            runs.log(args.out, row)
    bar = tqdm(range(start, args.steps + 1), initial=start - 1, total=args.steps, desc=args.algo,
               disable=not lead)
    for step in bar:
        row = rl_step(model, tok, src, opt, args, step, layer, ref, amp, sampler_old)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            row.update(evaluate(model, tok, src, args, amp))
        if lead:
            runs.log(args.out, row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", phase=row["phase"],
                        s_step=f"{row['step_time']:.0f}")
        # every rank stops after the same step
        stopping = dp.all_sum({"stop": len(stop)}, device)["stop"] > 0
        if step % args.save_every == 0 or step == args.steps or stopping:
            runs.checkpoint(model, opt, args, step, layer, lead)   # every rank takes part
        if stopping:
            break
    if lead:
        phase1 = f", pi^{layer} for steps 1..{args.internal_steps}" if args.algo == "bupo" else ""
        runs.finish(args.out, f"{args.algo} on {Path(args.model).name}, task {args.task}{phase1}",
                    step, stopping)
    dp.teardown()


if __name__ == "__main__":
    cli.run(main)
