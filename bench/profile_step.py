"""
Where the time of one RL step goes: train.py's step, with bench_trl.py's configuration, timed by
phase (sampling: prefill, decode forwards, the sampler itself; rewards; the old pass; per update the
forwards, the backwards, clip + AdamW) and by torch operator (torch.profiler, the top self times).

    python bench/profile_step.py                  # default model, fp32, CPU, 8 sum2 prompts x 8
    python bench/profile_step.py --out experiments/results/profile_step_cpu.txt

The first step is a warm-up (not reported); the second is timed and profiled. The phase timers wrap
the functions train.py calls (no change to train.py), so their sum is the step less Python glue.
"""
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bupo  # noqa: E402
import model as model_mod  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
from infra import cli, files, weights  # noqa: E402

SECONDS = defaultdict(float)
CALLS = defaultdict(int)


def timer(name, fn):
    def wrapped(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SECONDS[name] += time.perf_counter() - t0
            CALLS[name] += 1
    return wrapped


def instrument():
    """Timers around the functions of a step; nested names are parts of their parent."""
    train.sample_step = timer("1 sampling (generate)", train.sample_step)
    rollout.prefill = timer("1.1 prefill", rollout.prefill)
    rollout.sample = timer("1.2 sampler (filters, inverse CDF)", rollout.sample)
    forward = model_mod.Transformer.forward

    def fwd(self, input_ids, *a, **kw):   # decode forwards: one new token per row
        name = "1.3 decode forwards" if input_ids.shape[1] == 1 and kw.get("last_only") else None
        return timer(name, forward)(self, input_ids, *a, **kw) if name else forward(self,
                                                                                    input_ids,
                                                                                    *a, **kw)
    model_mod.Transformer.forward = fwd
    train.old_pass = timer("2 old pass (no grad, with diagnostics)", train.old_pass)
    train.update = timer("3 updates", train.update)
    # the updates' forwards (the old pass calls the same function without gradients: that
    # time is the old pass's)
    plain, timed = bupo.policy_logprobs, timer("3.1 forwards (with grad)", bupo.policy_logprobs)
    bupo.policy_logprobs = lambda *a, **kw: (timed if torch.is_grad_enabled()
                                             else plain)(*a, **kw)
    backward = torch.Tensor.backward
    torch.Tensor.backward = timer("3.2 backwards", backward)
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = timer("3.3 grad clip", clip)
    step = torch.optim.AdamW.step
    torch.optim.AdamW.step = timer("3.4 AdamW step", step)


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--top", type=int, default=15, help="operators listed")
    p.add_argument("--old-logprobs", default="auto", choices=train.OLD_LOGPROBS,
                   help="train.py's flag (recompute: with the old pass)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    cli.positive(args, "--prompts", "--group-size", "--max-new-tokens", "--top")
    if args.out:
        files.check_writable_file(args.out)
    weights.ensure_if_default(args.model)
    instrument()
    rows = {}
    real_rl_step = train.rl_step

    def rl_step(*a, **kw):
        step = a[5]
        SECONDS.clear()
        CALLS.clear()
        if step < 2:
            return real_rl_step(*a, **kw)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = real_rl_step(*a, **kw)
        rows["phases"] = dict(SECONDS), dict(CALLS)
        rows["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total",
                                                row_limit=args.top)
        rows["metrics"] = out
        return out
    train.rl_step = rl_step
    with tempfile.TemporaryDirectory() as tmp:
        train.main(["--model", args.model, "--out", str(Path(tmp) / "run"), "--algo", "grpo",
                    "--task", "sum2", "--shots", "1", "--steps", "2", "--prompts-per-step",
                    str(args.prompts), "--group-size", str(args.group_size), "--max-new-tokens",
                    str(args.max_new_tokens), "--mini-batches", "4", "--micro-batch-size", "16",
                    "--lr", "2e-5", "--clip-low", "0.2", "--clip-high", "0.2", "--dual-clip", "0",
                    "--eval-every", "0", "--save-every", str(10**6), "--device", "cpu",
                    "--old-logprobs", args.old_logprobs])
    (seconds, calls), m = rows["phases"], rows["metrics"]
    total = m["step_time"]
    lines = [f"one RL step (the second): {args.prompts} prompts x {args.group_size} responses, "
             f"<= {args.max_new_tokens} new tokens, 4 updates of 16, fp32, CPU, "
             f"{torch.get_num_threads()} threads; "
             f"{m['completions/mean_length'] * args.prompts * args.group_size:.0f} response "
             f"tokens; step_time {total:.1f} s (profiler on)",
             f"{'phase':44s} {'s':>8s} {'% step':>7s} {'calls':>6s}"]
    for name in sorted(seconds):
        lines.append(f"{name:44s} {seconds[name]:8.2f} {100 * seconds[name] / total:6.1f}% "
                     f"{calls[name]:6d}")
    text = "\n".join(lines) + "\n\ntop operators by self CPU time:\n" + rows["ops"] + "\n"
    print(text, end="")
    if args.out:
        files.write_text(args.out, f"$ python bench/profile_step.py "
                                  f"{' '.join(argv or sys.argv[1:])}\n" + text)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
