"""
GRPO and BuPO training of a decoder on a task with a verifiable reward (BUPO.md section 3).

    python train.py --algo bupo --out runs/bupo                # default model, arithmetic task, CPU-sized
    python train.py --algo grpo --out runs/grpo --seed 1
    python train.py --resume runs/bupo --steps 40              # continue exactly where it stopped
    torchrun --standalone --nproc-per-node 8 train.py --device cuda --prompts-per-step 128 --out runs/dp

One RL step (BUPO.md 3.8; steps count from 1, like the authors' global_steps):
  1. P prompts of the task (a fixed function of --seed and the step) and G responses to each, sampled from the
     FULL policy at T = 1 (rollout.py), in both phases.
  2. rewards, 1/0 from the last \\boxed{} (tasks.reward); group advantages (bupo.group_advantages).
  3. "old" log-probs, no grad, with the weights of the start of the step: of pi^l while step <= --internal-steps
     in BuPO (phase 1), of pi_theta otherwise. The same pass logs the full policy's entropy and, for BuPO,
     H(pi^l), KL(pi^l || pi^L) and cos(h_l, h_L) on the response tokens.
  4. --mini-batches updates on consecutive slices of the P*G responses (1 epoch, no shuffle): the clipped
     surrogate of the same policy as 3, token-mean, AdamW (wd 0.01), grad-norm clip 1.0, and
     zero_grad(set_to_none=True), so that in phase 1 the blocks above l and the final norm stay untouched.
Evaluation on held-out problems before training, every --eval-every steps and at the end: greedy accuracy,
avg@k and the unbiased pass@k = 1 - C(n-c, k) / C(n, k) over n = --eval-samples samples at T = 1.

Departures from the authors' code, on purpose:
  1. Phase 1's gradient passes stop the forward after block l (model(..., upto_layer=l)): nothing above l gets a
     gradient and everything logged comes from the no-grad pass of 3, so the loss and the gradients are the
     authors', for a fraction of the compute (the authors run all L blocks and discard the top).
  2. The loss is an exact masked token-mean over each mini-batch, however it is cut into micro-batches
     (the authors' dynamic batching only approximates it; BUPO.md 3.5).
  3. The prompts are generated (tasks.py) instead of a 5k DeepMath file; the reward is the authors'.
  4. Sizes fit a CPU: 8 prompts x 8 responses per step instead of 128 x 8, short responses. The ratios of the
     authors' schedule (s_inter = 10% of the steps, 4 updates per step) are kept.
Data parallelism (torchrun; gloo on a CPU, nccl with one GPU per rank): every rank holds the whole model and
optimizer, samples a 1/W share of each mini-batch's prompts with the seeds one process would use, and the
gradients are summed across ranks before every optimizer step (the loss is normalised by the token count of all
ranks), so W ranks compute what one process computes, up to the order of float sums (tested). Metrics and
evaluations are reduced across ranks; only rank 0 writes files. --prompts-per-step must be a multiple of
--mini-batches x W. torchrun passes a Ctrl-C on to every rank, and they stop after the same step and save, but
it kills them 30 s later: a longer step is lost, and --resume starts from the last checkpoint.
Metrics (OUT/metrics.jsonl, one line per step, TRL's names where TRL has one): reward, reward_std,
frac_reward_zero_std, completions/mean_length, completions/clipped_ratio, clip_ratio/low|high|dual,
kl (verl's ppo_kl: mean -log ratio, new vs. old policy, over the updates), kl_ref (with --kl-coef), entropy
(the full policy, always), loss, grad_norm, step_time, tokens_per_s; for BuPO also internal/entropy,
internal/kl_to_policy and internal/cos_to_top (pi^l against pi^L, h_l against h_L); peak_memory_mb; eval/* when evaluated.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import analyze
import bupo
import tasks
import weights
from chat import Tokenizer, load
from model import ModelLoadError, Transformer
from rollout import generate

# -----------------------------------------------------------------------------
# log-probs of the responses under the policy of the current phase


def batch_tensors(ro):
    """Prompt (left-padded) + response (right-padded) as one input; position Tp-1+t predicts response token t."""
    ids = torch.cat([ro.prompt_ids, ro.response_ids], 1)
    mask = torch.cat([ro.prompt_mask, ro.response_mask], 1)
    return ids, mask, ro.prompt_ids.shape[1]


def trim(ids, mask, Tp, rows):
    """The rows of a micro-batch without the columns that are padding in all of them."""
    ids, mask = ids[rows], mask[rows]
    first = int(mask[:, :Tp].any(0).nonzero()[0])
    last = Tp + int(mask[:, Tp:].sum(1).max())
    return ids[:, first:last], mask[:, first:last], Tp - first


def micro_batches(n: int, args):
    """Row groups of each mini-batch: consecutive slices (one epoch, no shuffle), cut into micro-batches. The old
    pass uses the same groups as the updates, so the first mini-batch reproduces the old log-probs bit for bit."""
    return [list(mb.split(args.micro_batch_size)) for mb in torch.arange(n).chunk(args.mini_batches)]


def response_logprobs(model, ids, mask, Tp, layer, temperature):
    """log pi^layer of each response token [n, R] (layer = L: the model's policy), 0 on padding; with gradient."""
    h = model(ids, attention_mask=mask, upto_layer=layer)[:, Tp - 1:-1]      # positions predicting the response
    keep = mask[:, Tp:].bool()
    logp = torch.zeros(keep.shape, device=h.device)
    logp[keep] = bupo.token_logprobs(model, h[keep], ids[:, Tp:][keep], layer, temperature=temperature)
    return logp


@torch.no_grad()
def old_logprobs(model, ids, mask, Tp, groups, policy_layer, stats_layer, temperature):
    """Old log-probs of pi^policy_layer [N, R] (no grad) and the per-token stats of bupo.rollout_stats, where
    stats_layer < L adds the internal policy pi^stats_layer to them."""
    L, R = model.config.num_layers, ids.shape[1] - Tp
    logp, stats = torch.zeros(len(ids), R, device=ids.device), {}
    for rows in (rows for mb in groups for rows in mb):
        i, m, tp = trim(ids, mask, Tp, rows)
        _, rec = model(i, attention_mask=m, return_residuals=True)
        keep = m[:, tp:].bool()
        pick = lambda h: h[:, tp - 1:-1][keep]  # noqa: E731  (response positions, flattened)
        low = pick(rec.resid[stats_layer]) if stats_layer < L else None
        s = bupo.rollout_stats(model, pick(rec.resid[L]), i[:, tp:][keep], low, stats_layer, temperature)
        part = torch.zeros(keep.shape, device=ids.device)
        part[keep] = s["logp_layer"] if policy_layer < L else s["logp"]
        logp[rows, :keep.shape[1]] = part
        for k, v in s.items():
            stats.setdefault(k, []).append(v)
    return logp, {k: torch.cat(v) for k, v in stats.items()}


# -----------------------------------------------------------------------------
# data parallelism: torchrun starts one process (rank) per CPU process slot or GPU; every rank holds the whole
# model, samples its share of the step's prompts and trains on its own responses; the gradients are summed
# across ranks before each optimizer step, so every rank applies the same update and the weights stay equal.

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(values: dict, device) -> dict:
    """The sums over ranks of a dict of numbers (itself in a single process)."""
    if world() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_grads(model):
    """Sum the gradients over ranks: each rank's loss is already divided by the token count of the whole
    mini-batch (all ranks), so the sum is the gradient of the one-process loss. Parameters without a gradient
    (above l in phase 1) have none on every rank."""
    if world() > 1:
        work = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters() if p.grad is not None]
        for w in work:
            w.wait()


def my_prompts(P: int, args) -> list[int]:
    """The prompts of a step this rank samples and trains on. Mini-batch k of the step is the same set of prompts
    as in one process (consecutive P/M); each rank takes a consecutive 1/W of every mini-batch."""
    W = world()
    if W == 1:
        return list(range(P))
    per = P // (args.mini_batches * W)
    return [k * per * W + rank() * per + i for k in range(args.mini_batches) for i in range(per)]


# -----------------------------------------------------------------------------
# one RL step

def peak_memory_mb(device) -> float:
    """Peak memory so far, MiB: CUDA memory allocated by torch on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB


def rl_step(model, tok, opt, args, step, layer, ref=None):
    t0 = time.perf_counter()
    L, G = model.config.num_layers, args.group_size
    problems = tasks.problems(args.task, args.prompts_per_step, seed=args.seed * 1_000_003 + step)
    mine = my_prompts(len(problems), args)              # all of them in a single process
    problems = [problems[g] for g in mine]
    prompts = [tok.encode_chat(tasks.chat(p, args.task, args.shots)) for p in problems]
    first_seed = (args.seed << 32) + step * args.prompts_per_step     # prompt g of the step: first_seed + g
    ro = generate(model, prompts, G, args.max_new_tokens, args.temperature, stop_ids=tok.stop_ids,
                  pad_id=tok.pad_id, seed=[first_seed + g for g in mine], tokenizer=tok)
    device = ro.response_ids.device
    rewards = torch.tensor([tasks.reward(text, problems[g].answer) for text, g in zip(ro.text, ro.group.tolist())],
                           device=device)
    adv = bupo.group_advantages(rewards, G, args.advantage)   # per group, and a rank holds whole groups
    ids, mask, Tp = batch_tensors(ro)
    internal = bupo.uses_internal_policy(args.algo, step, args.internal_steps)
    policy_layer = layer if internal else L              # the policy whose ratio is clipped this step
    stats_layer = layer if args.algo == "bupo" else L
    groups = micro_batches(len(ids), args)
    old, stats = old_logprobs(model, ids, mask, Tp, groups, policy_layer, stats_layer, args.temperature)
    # the KL penalty, when on, compares the policy being optimised (pi^l in phase 1) with the same policy of the
    # frozen initial model
    ref_logp = old_logprobs(ref, ids, mask, Tp, groups, policy_layer, policy_layer, args.temperature)[0] if ref else None

    sums, grad_norms = {}, []
    resp_mask = ro.response_mask
    for k, mb in enumerate(groups):
        rows_all = torch.cat(mb)
        # the loss is normalised by the whole mini-batch, all ranks together (exact token-mean, departure 2)
        totals = all_sum({"num_seqs": len(rows_all), "num_tokens": int(resp_mask[rows_all].sum())}, device)
        totals = {k_: int(v) for k_, v in totals.items()} | {"max_len": args.max_new_tokens}
        loss_total = 0.0
        for rows in mb:
            i, m, tp = trim(ids, mask, Tp, rows)
            r = i.shape[1] - tp
            logp = response_logprobs(model, i, m, tp, policy_layer, args.temperature)
            rm = m[:, tp:]
            tok_loss, s = bupo.policy_loss(logp, old[rows, :r], adv[rows], rm, args.clip_low, args.clip_high,
                                           args.dual_clip)
            if ref is not None:
                kl = bupo.kl_penalty(logp, ref_logp[rows, :r], args.kl_type)
                tok_loss = tok_loss + args.kl_coef * kl
                s["kl_ref"] = (kl.detach() * rm).sum()
            loss = bupo.aggregate(tok_loss, rm, args.loss_agg, **totals)
            loss.backward()
            loss_total += loss.item()
            for name, v in s.items():
                sums[name] = sums.get(name, 0.0) + float(v)
        all_reduce_grads(model)
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)                     # None, not 0: AdamW skips params without a gradient
        sums[f"loss/{k}"] = loss_total                      # this rank's share of mini-batch k's loss

    # metrics of the whole step: sums over the ranks' tokens and responses, then means
    sums.update(n_tok=int(resp_mask.sum()), clipped=sum(f == "length" for f in ro.finish_reason),
                **{f"stat/{name}": v.sum().item() for name, v in stats.items() if not name.startswith("logp")})
    sums = all_sum(sums, device)
    if world() > 1:
        parts = [torch.empty_like(rewards) for _ in range(world())]
        dist.all_gather(parts, rewards)
        rewards = torch.cat(parts)
    n_tok, n = sums["n_tok"], len(rewards)
    per_group = rewards.view(-1, G)
    dt = time.perf_counter() - t0
    m = {"step": step, "phase": "internal" if internal else "full", "policy_layer": policy_layer,
         "reward": rewards.mean().item(), "reward_std": rewards.std().item() if n > 1 else 0.0,
         "frac_reward_zero_std": (per_group.std(1) == 0).float().mean().item() if G > 1 else 1.0,
         "completions/mean_length": n_tok / n, "completions/clipped_ratio": sums["clipped"] / n,
         **{k: sums[k] / n_tok for k in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/dual",
                                         "kl_ref") if k in sums},
         "kl": sums["ppo_kl"] / n_tok, "entropy": sums["stat/entropy"] / n_tok,
         "loss": sum(sums[f"loss/{k}"] for k in range(len(groups))) / len(groups),
         "grad_norm": sum(grad_norms) / len(grad_norms), "step_time": dt, "tokens_per_s": n_tok / dt,
         "peak_memory_mb": peak_memory_mb(device)}
    if "stat/entropy_layer" in sums:
        m.update({"internal/entropy": sums["stat/entropy_layer"] / n_tok,
                  "internal/kl_to_policy": sums["stat/kl_layer"] / n_tok,
                  "internal/cos_to_top": sums["stat/cos_layer"] / n_tok})
    return m


# -----------------------------------------------------------------------------
# evaluation

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(model, tok, args) -> dict:
    problems = tasks.problems(args.task, args.eval_problems, seed=args.seed, split="test")
    mine = list(range(rank(), len(problems), world()))  # a data-parallel rank answers every W-th problem
    problems = [problems[g] for g in mine]
    prompts = [tok.encode_chat(tasks.chat(p, args.task, args.shots)) for p in problems]
    common = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, tokenizer=tok)
    greedy = generate(model, prompts, 1, args.max_new_tokens, temperature=0.0, **common)
    n = args.eval_samples
    sampled = generate(model, prompts, n, args.max_new_tokens, temperature=args.temperature,
                       seed=[12345 + g for g in mine], **common)
    correct = torch.tensor([tasks.reward(t, problems[g].answer) for t, g in zip(sampled.text, sampled.group.tolist())])
    c = correct.view(-1, n).sum(1).int().tolist()
    ks = sorted({1, n})
    sums = all_sum({"greedy": sum(tasks.reward(t, p.answer) for t, p in zip(greedy.text, problems)),
                    "correct": sum(c), **{f"pass@{k}": sum(pass_at_k(n, ci, k) for ci in c) for k in ks}},
                   greedy.response_ids.device)
    P = args.eval_problems
    return {"eval/greedy_acc": sums["greedy"] / P, f"eval/avg@{n}": sums["correct"] / (P * n),
            **{f"eval/pass@{k}": sums[f"pass@{k}"] / P for k in ks}}


# -----------------------------------------------------------------------------
# checkpoints, metrics, plots

def save_checkpoint(model, opt, args, step, layer):
    """OUT/checkpoints/step_N: an HF-layout folder (loadable by from_pretrained and transformers) plus
    trainer_state.pt (optimizer, step, arguments), written in a temporary folder and renamed into place."""
    root = Path(args.out) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    model.save_pretrained(tmp, copy_from=args.model)
    torch.save({"step": step, "optimizer": opt.state_dict(), "args": vars(args), "internal_layer": layer},
               tmp / "trainer_state.pt")
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-args.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def plot_metrics(out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "reward" in r]
    keys = [("reward", "eval/greedy_acc"), ("entropy", "internal/entropy"), ("completions/mean_length",),
            ("internal/kl_to_policy", "internal/cos_to_top")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for ax, group in zip(axes, keys):
        for k in group:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=k)
        internal = [r["step"] for r in train if r.get("phase") == "internal"]
        if internal:
            ax.axvspan(min(internal) - 0.5, max(internal) + 0.5, color="orange", alpha=0.15, label="phase 1 (pi^l)")
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{out.name}")
    analyze.write_atomic(out / "curves.png", lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------

def resolve_layer(value: str, model, tok, args) -> int:
    """--internal-layer: a paper (1-based) layer l, where pi^l = softmax(W_U h_l) (the authors' k = l - 1), or auto."""
    L = model.config.num_layers
    if value != "auto":
        if not value.isdigit() or not 1 <= int(value) <= L:
            raise ValueError(f"--internal-layer must be auto or a layer 1..{L} (1-based, h_l), not {value!r}")
        return int(value)
    if args.analysis:
        try:
            result = json.loads(Path(args.analysis).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{args.analysis}: not a readable entropy.json ({e})") from None
    else:
        print("--internal-layer auto: analysing 8 responses to find the boundary layer ...", file=sys.stderr)
        pairs = analyze.sample_responses(model, tok, args.task, 8, min(args.max_new_tokens, 64), args.seed,
                                         args.shots)
        result = analyze.summarize(Path(args.model).name, model, analyze.analyze(model, pairs)[0], 8, False)
    layer = result["internal_layer"]
    why = ("the boundary layer (last layer with mean dH_mlp > 0)" if result["internal_layer_rule"] == "boundary" else
           "no boundary layer below L, so the penultimate layer (the authors' choice for late-converging models)")
    print(f"internal layer: {layer} of {L}, {why}", file=sys.stderr)
    return layer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GRPO / BuPO training with a verifiable reward.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default=str(weights.DEFAULT_MODEL_DIR), help="HF-layout model folder to start from")
    a("--out", default="runs/train", help="output folder: metrics.jsonl, curves.png, checkpoints/")
    a("--resume", default=None, help="a previous --out folder: continue from its latest checkpoint, same arguments")
    a("--algo", default="bupo", choices=["bupo", "grpo"], help="bupo: phase 1 on pi^l, then GRPO; grpo: GRPO only")
    a("--internal-layer", default="auto", help="paper layer l (1-based: pi^l = softmax(W_U h_l)) of phase 1, or auto")
    a("--analysis", default=None, help="entropy.json of analyze.py for --internal-layer auto (else a quick analysis)")
    a("--internal-steps", type=int, default=2, help="s_inter: steps 1..s_inter optimise pi^l (the authors: 30 of 300)")
    a("--steps", type=int, default=None, help="RL steps in total (default 20; with --resume, the saved run's)")
    a("--task", default="arithmetic", choices=sorted(tasks.TASKS), help="the training and evaluation task")
    a("--shots", type=int, default=0, choices=[0, 1], help="1: a worked example of the task before each question")
    a("--prompts-per-step", type=int, default=8, help="P prompts per step (the authors: 128)")
    a("--group-size", type=int, default=8, help="G responses per prompt (the authors: 8)")
    a("--mini-batches", type=int, default=4, help="optimizer steps per RL step (the authors: 4)")
    a("--micro-batch-size", type=int, default=8, help="responses per forward/backward pass (memory only)")
    a("--lr", type=float, default=1e-6, help="AdamW learning rate, constant (the authors: 1e-6)")
    a("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay")
    a("--grad-clip", type=float, default=1.0, help="max global grad norm")
    a("--clip-low", type=float, default=0.2, help="ratio clip below 1")
    a("--clip-high", type=float, default=0.2, help="ratio clip above 1 (clip-higher when > clip-low)")
    a("--dual-clip", type=float, default=10.0, help="dual-clip constant c for A < 0 (0 = off)")
    a("--advantage", default="grpo", choices=bupo.ADVANTAGES, help="group baseline: grpo z-score, drgrpo, rloo")
    a("--loss-agg", default="token-mean", choices=bupo.AGGREGATIONS, help="loss aggregation (see bupo.py)")
    a("--kl-coef", type=float, default=0.0, help="weight of a KL penalty to the frozen initial model (0 = off)")
    a("--kl-type", default="k3", choices=["k1", "k3"], help="KL estimator")
    a("--max-new-tokens", type=int, default=128, help="longest response")
    a("--temperature", type=float, default=1.0, help="rollout temperature (also divides the training logits)")
    a("--eval-every", type=int, default=10, help="evaluate every N steps (and before and after training; 0 = never)")
    a("--eval-problems", type=int, default=32, help="held-out problems per evaluation")
    a("--eval-samples", type=int, default=4, help="n samples per problem for avg@n and pass@k")
    a("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    a("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--seed", type=int, default=0, help="seed of the prompts and of the sampler")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (bf16 autocast on cuda)")
    return p.parse_args(argv)


def init_distributed(args) -> str:
    """Join the torchrun group when there is one (WORLD_SIZE > 1): gloo on a CPU, nccl with one GPU per rank.
    Returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return args.device
    cuda = args.device.startswith("cuda")
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else args.device
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    W = world()
    if args.prompts_per_step % (args.mini_batches * W):
        raise ValueError(f"--prompts-per-step ({args.prompts_per_step}) must be a multiple of --mini-batches x ranks "
                         f"({args.mini_batches} x {W}) so that every rank holds whole groups of every mini-batch")
    if args.eval_every and args.eval_problems < W:
        raise ValueError(f"--eval-problems ({args.eval_problems}) must be at least the number of ranks ({W})")
    return device


def main(argv=None):
    args = parse_args(argv)
    # W_U h_l without the norm gives logits so spread that softmax underflows into subnormal floats, which CPUs
    # compute ~5x slower (phase 1 at l=7 of SmolLM2: 6.0 s -> 1.15 s per micro-batch); flush them to 0 instead
    torch.set_flush_denormal(True)
    start, state = 1, None
    try:
        if args.resume:  # the saved run's arguments; only --steps may be changed (to extend the run)
            ckpt = latest_checkpoint(Path(args.resume))
            if ckpt is None:
                raise ValueError(f"{args.resume}: no checkpoints/step_* to resume from")
            state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
            steps, out = args.steps, args.resume
            args = argparse.Namespace(**{**vars(parse_args([])), **state["args"]})  # + flags added since
            args.steps, args.out, start = steps or args.steps, out, state["step"] + 1
            model_dir = ckpt
        else:
            args.steps = args.steps or 20
            model_dir = args.model
        device = init_distributed(args)
        if Path(model_dir).resolve() == weights.DEFAULT_MODEL_DIR.resolve() and rank() == 0:
            weights.ensure()
        if world() > 1:
            dist.barrier()                                  # rank 0 has built the default model, if it was missing
        model = Transformer.from_pretrained(model_dir, device=device)
        tok = Tokenizer(model_dir)
        layer = model.config.num_layers
        if state:
            layer = state["internal_layer"]
        elif args.algo == "bupo" and rank() == 0:
            layer = resolve_layer(args.internal_layer, model, tok, args)
        layer = int(all_sum({"layer": layer if rank() == 0 else 0}, device)["layer"])  # rank 0's choice, everywhere
        ref = load(args.model, device=device)[0] if args.kl_coef > 0 else None
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"error: {e}")
    lead = rank() == 0                                      # only rank 0 writes files and prints progress
    out = Path(args.out)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    metrics_file = out / "metrics.jsonl"
    if state:
        opt.load_state_dict(state["optimizer"])
    if lead and state:
        kept = [line for line in metrics_file.read_text().splitlines() if line.strip() and json.loads(line)["step"] < start]
        analyze.write_atomic(metrics_file, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))
    elif lead:
        out.mkdir(parents=True, exist_ok=True)
        analyze.write_atomic(out / "args.json", lambda tmp: tmp.write_text(json.dumps(vars(args), indent=1) + "\n"))
        metrics_file.write_text("")

    def log(row):
        if lead:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

    stop = []

    def on_interrupt(*_):  # finish the step, save, exit; a second Ctrl-C aborts at once
        stop.append(True)
        print("\nCtrl-C: stopping after this step and saving a checkpoint (again to abort)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, on_interrupt)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    from tqdm import tqdm
    with autocast:
        if start == 1 and args.eval_every:
            log({"step": 0, **evaluate(model, tok, args)})
        bar = tqdm(range(start, args.steps + 1), initial=start - 1, total=args.steps, desc=args.algo, disable=not lead)
        step, stopping = start - 1, False
        for step in bar:
            row = rl_step(model, tok, opt, args, step, layer, ref)
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                row.update(evaluate(model, tok, args))
            log(row)
            bar.set_postfix(reward=f"{row['reward']:.2f}", phase=row["phase"], s_step=f"{row['step_time']:.0f}")
            stopping = all_sum({"stop": len(stop)}, device)["stop"] > 0   # every rank stops after the same step
            if step % args.save_every == 0 or step == args.steps or stopping:
                if lead:
                    save_checkpoint(model, opt, args, step, layer)
                if world() > 1:
                    dist.barrier()
            if stopping:
                break
    if lead:
        plot_metrics(out)
        print(f"{'stopped' if stopping else 'done'} at step {step}: {metrics_file}, {out / 'curves.png'}, "
              f"{out / 'checkpoints'}")
    if world() > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
