"""
One GRPO step here against TRL's GRPOTrainer on the same model, prompts and configuration, in one
run, the two sides alternated step by step: seconds per RL step (one generation of P x G responses,
then its optimizer steps), median and range, response tokens/s, the ratio, and the fraction of the
compute bound our steps reach (step_flops at the measured matmul rate).

    pip install trl datasets          # bench-only dependencies, like transformers for the tests
    python bench/bench_trl.py         # default model, fp32, CPU: 8 sum2 prompts x 8, 48 new tokens
    python bench/bench_trl.py --steps 3 --out experiments/results/bench_trl_cpu.txt

The configuration of both sides: the authors' system prompt and one worked example (sum2, shots 1),
T = 1, at most --max-new-tokens, 4 optimizer steps of 16 responses per generation (one epoch, no
shuffle), lr 2e-5, clip 0.2 both ways, no KL (beta 0), the token-mean loss (TRL's "dapo"), the group
z-score advantage, grad-norm clip 1.0, the authors' \\boxed{} reward. TRL runs with its default
gradient checkpointing on, then off; ours never checkpoints (its --grad-checkpoint is off by
default).

The order is ours, TRL, ours, TRL, ...: TRL's trainer runs, and at the start of each of its
generations a callback runs one RL step of ours (train.rl_step on the objects train.py builds),
timed apart, so a host that slows down mid-run slows both sides alike. The first step of each side
in each block is a warm-up and is not counted. The host's matmul rate is measured before and after,
and the share of the CPU other processes took (bench/host.py): a warning says when the run was not
quiet.
"""
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import host  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from bench_rollout import flops_per_token  # noqa: E402
from infra import cli, files, weights  # noqa: E402
from infra.errors import UserError  # noqa: E402


def need_trl():
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError:
        raise UserError("this benchmark runs TRL, a bench-only dependency that is not installed; "
                        "pip install trl datasets") from None
    return trl


class Ours:
    """Our trainer, one RL step per call: train.rl_step on the model, tokenizer, optimizer and
    prompt source train.py builds for the same command line (--old-logprobs as given: auto is
    the sampler's in fp32)."""

    def __init__(self, args, tmp: Path):
        import torch
        self.targs = train.build_parser().parse_args([
            "--model", args.model, "--out", str(tmp / "ours"), "--algo", "grpo", "--task",
            "sum2", "--shots", "1", "--prompts-per-step", str(args.prompts), "--group-size",
            str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
            "--mini-batches", "4", "--micro-batch-size", "16", "--lr", "2e-5", "--clip-low",
            "0.2", "--clip-high", "0.2", "--dual-clip", "0", "--eval-every", "0", "--device",
            "cpu", "--old-logprobs", args.old_logprobs])
        cli.check_train(self.targs)
        torch.set_flush_denormal(True)          # as train.py does
        self.src = tasks.source(self.targs)
        self.model, self.tok = train.load(args.model, True, self.src, self.targs, "cpu", True)
        self.opt = train.optimizer(self.model, self.targs)
        self.sampler_old = train.old_logprobs_source(self.targs, torch.float32, None) == "sampler"
        self.step_no, self.n = 0, args.prompts * args.group_size

    def step(self) -> tuple[float, int]:
        """Seconds and response tokens of our next RL step."""
        self.step_no += 1
        row = train.rl_step(self.model, self.tok, self.src, self.opt, self.targs, self.step_no,
                            self.model.config.num_layers, None, contextlib.nullcontext,
                            self.sampler_old)
        return row["step_time"], round(row["completions/mean_length"] * self.n)


def alternated(args, tmp: Path, ours: Ours, checkpointing: bool) -> dict:
    """One block: TRL's trainer for 1 + --steps generations, one RL step of ours before each.
    Returns each side's seconds and response tokens per step, warm-ups dropped."""
    trl = need_trl()
    import datasets
    from transformers import TrainerCallback
    # the prompts train.py draws at steps 1, 2, ... (--seed 0), in that order (no shuffle)
    problems = [p for s in range(1, args.steps + 2) for p in tasks.problems("sum2", args.prompts,
                                                                             seed=s)]
    rows = [{"prompt": tasks.chat(p, "sum2", 1), "answer": p.answer} for p in problems]
    tokens, mine = [], []

    def reward(completions, answer, completion_ids, **_):
        tokens.append(sum(len(c) for c in completion_ids))
        return [tasks.reward(c[0]["content"], a) for c, a in zip(completions, answer)]

    per_gen = args.prompts * args.group_size
    config = trl.GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, report_to="none",
        per_device_train_batch_size=per_gen // 4, num_generations=args.group_size,
        generation_batch_size=per_gen, num_iterations=1, max_completion_length=args.max_new_tokens,
        learning_rate=2e-5, epsilon=0.2, beta=0.0, loss_type="dapo", scale_rewards="group",
        temperature=1.0, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, gradient_checkpointing=checkpointing, shuffle_dataset=False,
        max_steps=4 * (args.steps + 1), logging_steps=10**6, save_strategy="no", seed=0)
    spans, started = [], []

    class Alternate(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step % 4:       # a new generation starts every 4 optimizer steps
                return
            if started:
                spans.append(time.perf_counter() - started.pop())
            mine.append(ours.step())        # ours, then TRL's next generation and updates
            started.append(time.perf_counter())

        def on_train_end(self, a, state, control, **kw):
            spans.append(time.perf_counter() - started.pop())
    trainer = trl.GRPOTrainer(model=args.model, reward_funcs=reward, args=config,
                              train_dataset=datasets.Dataset.from_list(rows),
                              callbacks=[Alternate()])
    trainer.train()
    return {"theirs": (spans[1:], tokens[1:]),
            "ours": ([t for t, _ in mine[1:]], [n for _, n in mine[1:]])}


def step_flops(model, prompt_tokens: float, n_prompts: int, group_size: int,
               response_tokens: int, old_pass: bool) -> float:
    """The useful FLOPs of one RL step, the work of its algorithm and nothing else: the rollout
    (each prompt prefilled once, one decode forward per response token, the unembedding on the
    positions that sample), the old pass if it runs, and the updates (forward + backward = 3
    forwards) over each distinct prompt once and the real response tokens, no padding; attention at
    the mean context. No implementation can do less: the bound is this over the measured peak."""
    context = prompt_tokens + response_tokens / (n_prompts * group_size) / 2
    per_token = flops_per_token(model, context)
    head = 2 * model.lm_head.weight.numel()
    body = per_token - head
    forward = body * (n_prompts * prompt_tokens + response_tokens) + head * response_tokens
    rollout = forward + head * n_prompts
    return rollout + (forward if old_pass else 0) + 3 * forward


TRL_CONFIGS = {"on": ("TRL, gradient checkpointing on (its default)", True),
               "off": ("TRL, gradient checkpointing off", False)}


def main(argv=None):
    p = cli.Parser(description="One GRPO step here against TRL's GRPOTrainer, same config.")
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR))
    p.add_argument("--prompts", type=int, default=8, help="P prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="G responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=3,
                   help="RL steps of each side timed per block, after one warm-up step each")
    p.add_argument("--trl", default="on,off",
                   help="TRL's configurations, one block each: on (its default gradient "
                   "checkpointing), off, or on,off")
    p.add_argument("--skip-trl", action="store_true",
                   help="time our side only: one warm-up step, then --steps steps")
    p.add_argument("--old-logprobs", default="auto", choices=train.OLD_LOGPROBS,
                   help="train.py's flag for our side")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    cli.positive(args, "--prompts", "--group-size", "--max-new-tokens", "--steps")
    if args.prompts * args.group_size % 64:
        raise UserError("--prompts x --group-size must be a multiple of 64 (4 optimizer steps of "
                        "16 responses per generation on both sides)")
    configs = [] if args.skip_trl else args.trl.split(",")
    if any(c not in TRL_CONFIGS for c in configs) or len(set(configs)) < len(configs):
        raise UserError(f"--trl {args.trl}: name on, off or on,off (TRL's gradient "
                        f"checkpointing)")
    if args.out:
        files.check_writable_file(args.out)
    if configs:
        need_trl()
    weights.ensure_if_default(args.model)
    blocks = {}
    with tempfile.TemporaryDirectory() as tmp, host.Watch() as watch:
        tmp = Path(tmp)
        ours = Ours(args, tmp)
        for c in configs:
            blocks[c] = alternated(args, tmp, ours, TRL_CONFIGS[c][1])
        if not configs:                     # --skip-trl
            mine = [ours.step() for _ in range(args.steps + 1)][1:]
            blocks["ours"] = {"ours": ([t for t, _ in mine], [n for _, n in mine])}
    model, tok = analyze.load(args.model)
    prompts = [len(tok.encode_chat(tasks.chat(p, "sum2", 1)))
               for s in range(1, ours.step_no + 1)
               for p in tasks.problems("sum2", args.prompts, seed=s)]
    peak = watch.peak
    lines = [f"{args.prompts} prompts x {args.group_size} responses, <= {args.max_new_tokens} new "
             f"tokens, 4 updates per step, fp32, CPU; {args.steps} RL steps of each side timed per "
             f"block after one warm-up each, alternated ours / TRL"
             f"{' (--skip-trl: ours only)' if not configs else ''}; ours with --old-logprobs "
             f"{args.old_logprobs}", watch.report()]
    ts = [t for b in blocks.values() for t in b["ours"][0]]
    toks = [n for b in blocks.values() for n in b["ours"][1]]
    lines.append(f"this project: {host.median_range(ts)} s per RL step, "
                 f"{sum(toks) / sum(ts):.1f} response tokens/s; in order: "
                 f"{', '.join(f'{t:.1f}' for t in ts)}")
    for c in configs:
        theirs, their_toks = blocks[c]["theirs"]
        mine = blocks[c]["ours"][0]
        pairs = [b / a for a, b in zip(mine, theirs)]
        lines.append(f"{TRL_CONFIGS[c][0]}: {host.median_range(theirs)} s per RL step, "
                     f"{sum(their_toks) / sum(theirs):.1f} response tokens/s; this project is "
                     f"{statistics.median(theirs) / statistics.median(mine):.2f}x faster (medians "
                     f"of the block; each alternated pair: "
                     f"{', '.join(f'{r:.2f}' for r in pairs)})")
    # the compute bound of our steps: their useful FLOPs at the measured rate (step_flops)
    Tp = sum(prompts) / len(prompts)
    for old_pass in (False, True):
        flops = [step_flops(model, Tp, args.prompts, args.group_size, n, old_pass) for n in toks]
        work = "rollout, old pass, updates" if old_pass else "rollout, updates"
        lines.append(f"compute bound of our steps ({work}): {sum(flops) / len(flops) / 1e12:.2f} "
                     f"TFLOP per step (step_flops), {sum(flops) / peak / len(ts):.1f} s at "
                     f"{peak / 1e12:.3f} TFLOP/s; this project at "
                     f"{100 * sum(flops) / peak / sum(ts):.0f}% of it")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        files.write_text(args.out, f"$ python bench/bench_trl.py {' '.join(argv or sys.argv[1:])}"
                                   f"\n# {host.provenance()}\n" + text)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
