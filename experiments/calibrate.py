"""
Base rate of a model on each task level, measured as train.py evaluates (analyze.evaluate):
greedy accuracy and avg@n at T = 1 on held-out problems of the test split, with the worked example
of --shots.

    python experiments/calibrate.py                     # default model, the sum* levels and add
    python experiments/calibrate.py --tasks sum2 sum3 --problems 512   # smaller error bars

Writes experiments/results/calibration.md (a table with the standard error of each accuracy) and
prints it. The standard error of a greedy accuracy p over n distinct problems is sqrt(p (1 - p) /
n).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from infra import cli  # noqa: E402
from infra import files  # noqa: E402
import analyze  # noqa: E402
import tasks  # noqa: E402
from infra import weights  # noqa: E402


def main(argv=None):
    p = cli.Parser(description="Base rate of a model on each task level (held-out, as train.py "
                   "evaluates).")
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR), help="HF-layout model folder")
    p.add_argument("--tasks", nargs="+", default=["add", "sum2", "sum2x3", "sum3", "sum4"],
                   choices=sorted(tasks.TASKS),
                   help="the task levels to measure")
    p.add_argument("--problems", type=int, default=256, help="held-out problems per level")
    p.add_argument("--samples", type=int, default=2, help="samples per problem at T = 1 for avg@n")
    p.add_argument("--shots", type=int, default=1, choices=[0, 1],
                   help="worked examples before each question")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest response")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results" / "calibration.md"),
                   help="the table")
    args = p.parse_args(argv)
    cli.positive(args, "--problems", "--samples", "--max-new-tokens")
    files.check_writable_file(args.out)
    torch.set_flush_denormal(True)
    model, tok = analyze.load(args.model)
    for task in args.tasks:
        cli.fits_context(tasks.longest_prompt(tok, task, args.shots, args.seed),
                         args.max_new_tokens,
                         model.config.max_position_embeddings, f"the longest {task} prompt")
    rows = ["| task | held-out problems (distinct) | greedy accuracy | SE | avg@%d (T = 1) | "
            "seconds |" % args.samples,
            "|---|---|---|---|---|---|"]
    for task in args.tasks:
        t0 = time.perf_counter()
        ns = argparse.Namespace(task=task, eval_problems=args.problems, eval_samples=args.samples,
                                seed=args.seed, shots=args.shots,
                                max_new_tokens=args.max_new_tokens, temperature=1.0,
                                eval_batch=0, eval_greedy=False, compile=False)
        m = analyze.evaluate(model, tok, tasks.Source(task, args.shots), ns)
        distinct = len({q.question
                        for q in tasks.problems(task, args.problems, args.seed, split="test")})
        g = m["eval/greedy_acc"]
        se = math.sqrt(g * (1 - g) / distinct)
        rows.append(f"| {task} | {args.problems} ({distinct}) | {g:.3f} | {se:.3f} | "
                    f"{m[f'eval/avg@{args.samples}']:.3f} | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)
    cmd = "python experiments/calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"Base rates of {Path(args.model).name} (shots={args.shots}, max {args.max_new_tokens} "
            f"new tokens, seed {args.seed}), from `{cmd.strip()}`:\n\n" + "\n".join(rows) + "\n")
    files.write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
