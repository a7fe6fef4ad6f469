"""
Sampler throughput: rollout.generate against transformers' generate, on the same prompts, in the
same run.

    python bench/bench_rollout.py               # default model, fp32, CPU, batch 1 and 8 x G=8
    python bench/bench_rollout.py --stop --new-tokens 64
    python bench/bench_rollout.py --device cuda --dtype bfloat16 --stop
    python bench/bench_rollout.py --stop --compile   # and the compiled decode step

Both sides sample at T = 1 with no top-k / top-p and produce exactly --new-tokens tokens per
response (stop tokens are ignored), so the work is identical. Timings include the prefill. With
--stop, both stop at the model's stop tokens instead, as in RL rollouts, and tokens/s counts the
tokens actually produced (the samples, hence the lengths, differ between the two; transformers keeps
computing finished rows, ours drops them). Each case runs --repeat times per side, the sides
alternated (ours, transformers, ours, ...) after a warm-up of each, so that a host that slows down
mid-run slows both alike. It prints, per case, new tokens/s of both (median and range), the ratio of
the medians, and the physical bound the case is compared with:
  - batch 1 (one prompt, one response): decoding reads every weight once per token, so
    tokens/s <= memory bandwidth / weight bytes; the bandwidth is measured here (a 1 GiB read);
  - P prompts x G responses: tokens/s <= peak matmul FLOP/s / FLOPs per token, with FLOPs per token
    = 2 x (matmul parameters, the unembedding included) + attention, and the peak measured here on a
    2048^3 matmul in the same dtype.
and last the host's matmul rate before and after, and the share of the CPU other processes took
(bench/host.py), with a warning when the run was not quiet. --out also writes the report to a file.
transformers is a test-only dependency of the project; this script needs it installed (bash setup.sh
--test).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402
from infra import cli, files  # noqa: E402
from infra import weights  # noqa: E402
from analyze import load  # noqa: E402
from infra.errors import UserError  # noqa: E402
from rollout import generate, left_pad  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 17 + 25?",
           "Explain photosynthesis to a child in two sentences.",
           "List three prime numbers larger than 50.",
           "Translate 'good morning' into Spanish and German.", "Why is the sky blue?",
           "Give me a short recipe for pancakes with exact quantities, step by step."]


def memory_bandwidth(device="cpu") -> float:
    x = torch.ones(256 * 2**20, device=device)  # 1 GiB of fp32
    return x.numel() * 4 / host.timed(lambda: x.sum(), 3, device=device)


def weight_bytes(model) -> int:
    # a tied matrix counts once
    return sum(p.numel() * p.element_size() for p in model.parameters())


def flops_per_token(model, context: int) -> float:
    c = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and "embed" not in n)
    if c.tie_word_embeddings:
        matmul_params += model.lm_head.weight.numel()
    # q.k and p.v over the context
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * context
    return 2 * matmul_params + attention


def hf_generate(hf, ids, mask, G, n, stop_ids):
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                      top_p=1.0,
                      num_return_sequences=G, max_new_tokens=n, min_new_tokens=0 if stop_ids else n,
                      eos_token_id=sorted(stop_ids) or None, pad_token_id=0)
    new = out[:, ids.shape[1]:]
    if not stop_ids:
        return new.numel()
    is_stop = torch.isin(new, torch.tensor(sorted(stop_ids), device=new.device))
    # tokens up to the first stop
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, new.shape[1])
    return int(first.sum())


def alternate(model, hf, batch, G, args, tok) -> dict:
    """side -> [(tokens made, seconds)] of --repeat runs of each side on `batch` x G, alternated
    (ours, transformers, compiled, ours, ...), each run with its own seed, after a warm-up of
    each; with --compile, "first" is the compiled side's first call (its compilation)."""
    ids, mask = left_pad(batch, 0, args.device)
    stop = tok.stop_ids if args.stop else ()

    def ours(seed, **kw):
        return int(generate(model, batch, G, args.new_tokens, stop_ids=stop, seed=seed,
                            **kw).response_mask.sum())

    @torch.no_grad()
    def theirs(seed):
        torch.manual_seed(seed)
        return hf_generate(hf, ids, mask, G, args.new_tokens, stop)
    sides = {"ours": ours, "transformers": theirs}
    runs = {}
    if args.compile:
        t0 = time.perf_counter()
        ours(0, compile=True)       # compiles (again for a new shape), then decodes
        runs["first"] = time.perf_counter() - t0
        sides["compiled"] = lambda seed: ours(seed, compile=True)
    ours(0)
    theirs(0)                       # the warm-ups
    for r in range(args.repeat):
        for name, fn in sides.items():
            host.sync(args.device)
            t0 = time.perf_counter()
            made = fn(1 + r)
            host.sync(args.device)
            runs.setdefault(name, []).append((made, time.perf_counter() - t0))
    return runs


def case_line(model, dtype, P, G, T, runs, bw, peak, args) -> str:
    """One line per case (P x G responses to prompts left-padded to T tokens): each side's
    tokens/s (median and range), the ratio of the medians, the bound and our fraction of it."""
    rate = {k: [n / t for n, t in v] for k, v in runs.items() if k != "first"}
    med = {k: statistics.median(v) for k, v in rate.items()}
    if P * G == 1:
        bound = bw / weight_bytes(model)
        what = f"bandwidth bound {bw / 1e9:.1f} GB/s / {weight_bytes(model) / 1e6:.0f} MB"
    else:
        flops = flops_per_token(model, T + args.new_tokens // 2)
        bound = peak / flops
        what = f"matmul bound {peak / 1e9:.0f} GFLOP/s / {flops / 1e9:.3f} GFLOP per token"
    line = (f"{str(dtype).removeprefix('torch.'):9s} {P}x{G:<3d} ours "
            f"{host.median_range(rate['ours'])} tok/s  transformers "
            f"{host.median_range(rate['transformers'])} tok/s  ratio of medians "
            f"{med['ours'] / med['transformers']:4.2f}x  bound {bound:7.1f} tok/s ({what}): ours "
            f"at {100 * med['ours'] / bound:.0f}%")
    if "compiled" in rate:
        line += (f"  compiled {host.median_range(rate['compiled'])} tok/s "
                 f"({med['compiled'] / med['ours']:4.2f}x eager; first call {runs['first']:.0f} s)")
    if args.stop:
        line += (f"  [tokens produced per run: ours {[n for n, _ in runs['ours']]}, "
                 f"transformers {[n for n, _ in runs['transformers']]}]")
    return line


def need_transformers():
    """transformers' AutoModelForCausalLM, or a one-line error saying how to install it (it is
    test-only)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("this benchmark compares with transformers, a test-only dependency that is "
                        "not installed; install it with: bash setup.sh --test") from None
    return AutoModelForCausalLM


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR), help="HF-layout model folder")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32",
                   help="weights dtype, or several comma-separated (float32,bfloat16)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per response")
    p.add_argument("--prompts", type=int, default=8, help="prompts of the large case")
    p.add_argument("--group-size", type=int, default=8,
                   help="responses per prompt of the large case")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed runs of each side per case, alternated, after a warm-up; "
                   "the median and the range are reported")
    p.add_argument("--stop", action="store_true",
                   help="stop at the model's stop tokens (RL-style) instead of forcing the length")
    p.add_argument("--compile", action="store_true",
                   help="also time generate(compile=True): the compiled decode step, "
                   "its first call (compilation) reported apart")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    cli.positive(args, "--new-tokens", "--prompts", "--group-size", "--repeat")
    if args.prompts > len(PROMPTS):
        raise UserError(f"--prompts {args.prompts}: this benchmark has {len(PROMPTS)} prompts; "
                        f"pass at most {len(PROMPTS)}")
    dtypes = args.dtype.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--dtype {d!r}: not a dtype here; use float32, bfloat16 or float16 "
                            f"(comma-separated)")
    cli.check_device(args.device)
    if args.out:
        files.check_writable_file(args.out)
    AutoModelForCausalLM = need_transformers()
    bw = memory_bandwidth(args.device)
    lines = [f"threads {torch.get_num_threads()}, measured read bandwidth {bw / 1e9:.1f} GB/s; "
             f"{args.repeat} runs of each side per case, alternated, after a warm-up of each"]
    print(lines[0])
    for dtype in [getattr(torch, d) for d in dtypes]:
        model, tok = load(args.model, dtype, args.device)
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        prompts = [tok.encode_chat([{"role": "user", "content": q}])
                   for q in PROMPTS[:args.prompts]]
        cases = ((1, 1), (args.prompts, args.group_size))
        with host.Watch(dtype, args.device) as watch:
            timed_runs = [alternate(model, hf, prompts[:P], G, args, tok) for P, G in cases]
        for (P, G), runs in zip(cases, timed_runs):
            T = max(len(x) for x in prompts[:P])       # left-padded to the longest
            lines.append(case_line(model, dtype, P, G, T, runs, bw, watch.peak, args))
            print(lines[-1])
        lines.append(watch.report())
        print(lines[-1])
    if args.out:
        files.write_text(args.out, f"$ python bench/bench_rollout.py "
                                   f"{' '.join(argv or sys.argv[1:])}\n# {host.provenance()}\n"
                         + "\n".join(lines) + "\n")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
