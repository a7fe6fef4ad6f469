"""
One GRPO step here against TRL's GRPOTrainer on the same model, prompts and configuration, in one
run: seconds per RL step (one generation of P x G responses, then its optimizer steps), the ratio.

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
import tasks  # noqa: E402
import train  # noqa: E402
from infra import cli, weights  # noqa: E402
from infra.errors import UserError  # noqa: E402


def need_trl():
    try:
        import datasets  # noqa: F401
        import trl
    except ImportError:
        raise UserError("this benchmark runs TRL, a bench-only dependency that is not installed; "
                        "pip install trl datasets") from None
    return trl


def ours(args, tmp: Path) -> list[float]:
    """Seconds of each of our RL steps (metrics.jsonl's step_time), with the same configuration."""
    out = tmp / "ours"
    train.main(["--model", args.model, "--out", str(out), "--algo", "grpo", "--task", "sum2",
                "--shots", "1", "--steps", str(args.steps + 1), "--prompts-per-step",
                str(args.prompts), "--group-size", str(args.group_size), "--max-new-tokens",
                str(args.max_new_tokens), "--mini-batches", "4", "--micro-batch-size", "16",
                "--lr", "2e-5", "--clip-low", "0.2", "--clip-high", "0.2", "--dual-clip", "0",
                "--eval-every", "0", "--save-every", str(10**6), "--device", "cpu"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in rows if "step_time" in r][1:]


def theirs(args, tmp: Path, checkpointing: bool) -> list[float]:
    """Seconds of each of TRL's RL steps: the time between generations, from a callback."""
    trl = need_trl()
    import datasets
    from transformers import TrainerCallback
    # the prompts train.py draws at steps 1, 2, ... (--seed 0), in that order (no shuffle)
    problems = [p for s in range(1, args.steps + 2) for p in tasks.problems("sum2", args.prompts,
                                                                             seed=s)]
    rows = [{"prompt": tasks.chat(p, "sum2", 1), "answer": p.answer} for p in problems]

    def reward(completions, answer, **_):
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
    return [b - a for a, b in zip(stamps, stamps[1:])][1:]


def main(argv=None):
    p = cli.Parser(description="One GRPO step here against TRL's GRPOTrainer, same config.")
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR))
    p.add_argument("--prompts", type=int, default=8, help="P prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="G responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=2, help="RL steps timed, after one warm-up step")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    cli.positive(args, "--prompts", "--group-size", "--max-new-tokens", "--steps")
    if args.prompts * args.group_size % 64:
        raise UserError("--prompts x --group-size must be a multiple of 64 (4 optimizer steps of "
                        "16 responses per generation on both sides)")
    need_trl()
    weights.ensure_if_default(args.model)
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times = {"this project": ours(args, tmp)}
        times["TRL, gradient checkpointing on (its default)"] = theirs(args, tmp, True)
        times["TRL, gradient checkpointing off"] = theirs(args, tmp, False)
    mine = sum(times["this project"]) / len(times["this project"])
    lines = [f"{args.prompts} prompts x {args.group_size} responses, <= {args.max_new_tokens} new "
             f"tokens, 4 updates per step, fp32, CPU, {torch.get_num_threads()} threads; "
             f"{args.steps} RL steps timed after one warm-up"]
    for name, ts in times.items():
        mean = sum(ts) / len(ts)
        ratio = "" if name == "this project" else f", this project is {mean / mine:.2f}x faster"
        lines.append(f"{name}: {mean:.1f} s per RL step ({', '.join(f'{t:.1f}' for t in ts)})"
                     + ratio)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(f"$ python bench/bench_trl.py {' '.join(argv or sys.argv[1:])}\n"
                                  + text)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
