"""
One GRPO step here against TRL's GRPOTrainer on the same model, prompts and configuration, in one
run: seconds per RL step (one generation of P x G responses, then its optimizer steps), response
tokens/s, the ratio, and the fraction of the compute bound our steps reach (step_flops at the
measured matmul peak).

    pip install trl datasets          # bench-only dependencies, like transformers for the tests
    python bench/bench_trl.py         # default model, fp32, CPU: 8 sum2 prompts x 8, 48 new tokens
    python bench/bench_trl.py --steps 3 --out experiments/results/bench_trl_cpu.txt

The configuration of both sides: the authors' system prompt and one worked example (sum2, shots 1),
T = 1, at most --max-new-tokens, 4 optimizer steps of 16 responses per generation (one epoch, no
shuffle), lr 2e-5, clip 0.2 both ways, no KL (beta 0), the token-mean loss (TRL's "dapo"), the group
z-score advantage, grad-norm clip 1.0, the authors' \\boxed{} reward. TRL runs with its default
gradient checkpointing on, then off; ours never checkpoints (its --grad-checkpoint is off by
default). The first RL step of each side is a warm-up and is not counted.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402
from bench_rollout import flops_per_token, peak_flops  # noqa: E402
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


def ours(args, tmp: Path) -> tuple[list[float], list[int]]:
    """Seconds and response tokens of each of our RL steps (metrics.jsonl), with the same
    configuration (--old-logprobs as given: auto is the sampler's in fp32)."""
    out = tmp / "ours"
    train.main(["--model", args.model, "--out", str(out), "--algo", "grpo", "--task", "sum2",
                "--shots", "1", "--steps", str(args.steps + 1), "--prompts-per-step",
                str(args.prompts), "--group-size", str(args.group_size), "--max-new-tokens",
                str(args.max_new_tokens), "--mini-batches", "4", "--micro-batch-size", "16",
                "--lr", "2e-5", "--clip-low", "0.2", "--clip-high", "0.2", "--dual-clip", "0",
                "--eval-every", "0", "--save-every", str(10**6), "--device", "cpu",
                "--old-logprobs", args.old_logprobs])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    n = args.prompts * args.group_size
    return ([r["step_time"] for r in rows],
            [round(r["completions/mean_length"] * n) for r in rows])


def theirs(args, tmp: Path, checkpointing: bool) -> tuple[list[float], list[int]]:
    """Seconds and response tokens of each of TRL's RL steps: the time between generations, from a
    callback; the tokens from the reward function's completion_ids."""
    trl = need_trl()
    import datasets
    from transformers import TrainerCallback
    # the prompts train.py draws at steps 1, 2, ... (--seed 0), in that order (no shuffle)
    problems = [p for s in range(1, args.steps + 2) for p in tasks.problems("sum2", args.prompts,
                                                                             seed=s)]
    rows = [{"prompt": tasks.chat(p, "sum2", 1), "answer": p.answer} for p in problems]

    tokens = []

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
    stamps = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step % 4 == 0:   # a new generation starts every 4 optimizer steps
                stamps.append(time.perf_counter())

        def on_train_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
    trainer = trl.GRPOTrainer(model=args.model, reward_funcs=reward, args=config,
                              train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()])
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])][1:], tokens[1:]


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


def main(argv=None):
    p = cli.Parser(description="One GRPO step here against TRL's GRPOTrainer, same config.")
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR))
    p.add_argument("--prompts", type=int, default=8, help="P prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="G responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=2, help="RL steps timed, after one warm-up step")
    p.add_argument("--old-logprobs", default="auto", choices=train.OLD_LOGPROBS,
                   help="train.py's flag for our side")
    p.add_argument("--skip-trl", action="store_true", help="time our side only")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    cli.positive(args, "--prompts", "--group-size", "--max-new-tokens", "--steps")
    if args.prompts * args.group_size % 64:
        raise UserError("--prompts x --group-size must be a multiple of 64 (4 optimizer steps of "
                        "16 responses per generation on both sides)")
    if args.out:
        files.check_writable_file(args.out)
    need_trl()
    weights.ensure_if_default(args.model)
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {"this project": ours(args, tmp)}
        if not args.skip_trl:
            runs["TRL, gradient checkpointing on (its default)"] = theirs(args, tmp, True)
            runs["TRL, gradient checkpointing off"] = theirs(args, tmp, False)
    model, tok = analyze.load(args.model)
    prompts = [len(tok.encode_chat(tasks.chat(p, "sum2", 1)))
               for s in range(2, args.steps + 2)
               for p in tasks.problems("sum2", args.prompts, seed=s)]
    peak = peak_flops(torch.float32)
    mine = sum(runs["this project"][0]) / len(runs["this project"][0])
    lines = [f"{args.prompts} prompts x {args.group_size} responses, <= {args.max_new_tokens} new "
             f"tokens, 4 updates per step, fp32, CPU, {torch.get_num_threads()} threads, peak "
             f"{peak / 1e12:.3f} TFLOP/s (a 2048^3 matmul); {args.steps} RL steps timed after one "
             f"warm-up; ours with --old-logprobs {args.old_logprobs}"]
    for name, (ts, toks) in runs.items():
        mean, n_tok = sum(ts) / len(ts), sum(toks)
        ratio = "" if name == "this project" else f"; this project is {mean / mine:.2f}x faster"
        lines.append(f"{name}: {mean:.1f} s per RL step ({', '.join(f'{t:.1f}' for t in ts)}), "
                     f"{n_tok / sum(ts):.1f} response tokens/s" + ratio)
    # the compute bound of our steps: their useful FLOPs at the peak (step_flops)
    ts, toks = runs["this project"]
    Tp = sum(prompts) / len(prompts)
    for old_pass in (False, True):
        bound = sum(step_flops(model, Tp, args.prompts, args.group_size, n, old_pass)
                    for n in toks) / peak
        work = "rollout, old pass, updates" if old_pass else "rollout, updates"
        lines.append(f"compute bound of our steps ({work}): {bound / len(ts):.1f} s per step; "
                     f"this project at {100 * bound / sum(ts):.0f}% of it")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        files.write_text(args.out, f"$ python bench/bench_trl.py {' '.join(argv or sys.argv[1:])}\n"
                                  + text)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
