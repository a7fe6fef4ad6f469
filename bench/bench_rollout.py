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
computing finished rows, ours drops them). It prints, per case, new tokens/s of both, their ratio,
and the physical bound the case is compared with:
  - batch 1 (one prompt, one response): decoding reads every weight once per token, so
    tokens/s <= memory bandwidth / weight bytes; the bandwidth is measured here (a 1 GiB read);
  - P prompts x G responses: tokens/s <= peak matmul FLOP/s / FLOPs per token, with FLOPs per token
    = 2 x (matmul parameters, the unembedding included) + attention, and the peak measured here on a
    2048^3 matmul in the same dtype.
transformers is a test-only dependency of the project; this script needs it installed (bash setup.sh
--test).
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra import cli  # noqa: E402
from infra import weights  # noqa: E402
from analyze import load  # noqa: E402
from infra.errors import UserError  # noqa: E402
from rollout import generate, left_pad  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 17 + 25?",
           "Explain photosynthesis to a child in two sentences.",
           "List three prime numbers larger than 50.",
           "Translate 'good morning' into Spanish and German.", "Why is the sky blue?",
           "Give me a short recipe for pancakes with exact quantities, step by step."]


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int, warm_up: bool = True):
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(device="cpu") -> float:
    x = torch.ones(256 * 2**20, device=device)  # 1 GiB of fp32
    return x.numel() * 4 / timed(lambda: x.sum(), 3)


def peak_flops(dtype, device="cpu") -> float:
    a, b = (torch.randn(2048, 2048, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    return 2 * 2048**3 / timed(lambda: (a @ b, sync()), 3)


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
    p.add_argument("--repeat", type=int, default=1,
                   help="timed runs per case (the best is kept), after a warm-up")
    p.add_argument("--stop", action="store_true",
                   help="stop at the model's stop tokens (RL-style) instead of forcing the length")
    p.add_argument("--compile", action="store_true",
                   help="also time generate(compile=True): the compiled decode step, "
                   "its first call (compilation) reported apart")
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
    AutoModelForCausalLM = need_transformers()
    bw = memory_bandwidth(args.device)
    print(f"threads {torch.get_num_threads()}, measured read bandwidth {bw / 1e9:.1f} GB/s")
    for dtype in [getattr(torch, d) for d in dtypes]:
        model, tok = load(args.model, dtype, args.device)
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        peak = peak_flops(dtype, args.device)
        prompts = [tok.encode_chat([{"role": "user", "content": q}])
                   for q in PROMPTS[:args.prompts]]
        for P, G in ((1, 1), (args.prompts, args.group_size)):
            batch = prompts[:P]
            ids, mask = left_pad(batch, 0, args.device)
            T = ids.shape[1]
            stop = tok.stop_ids if args.stop else ()
            made = {}  # tokens produced by the timed run of each side

            def ours_run(key, **kw):
                ro = generate(model, batch, G, args.new_tokens, stop_ids=stop, seed=len(made), **kw)
                made[key] = int(ro.response_mask.sum())
            ours = timed(lambda: ours_run("ours"), args.repeat)
            compiled = ""
            if args.compile:
                t0 = time.perf_counter()
                compiled_run = lambda: ours_run("compiled", compile=True)  # noqa: E731
                compiled_run()   # compiles (again for a new shape), then decodes
                first = time.perf_counter() - t0
                steady = timed(compiled_run, args.repeat, warm_up=False)   # that was the warm-up
                rate = made["compiled"] / steady
                compiled = (f"  compiled {rate:7.1f} tok/s ({rate / (made['ours'] / ours):4.2f}x "
                            f"eager; first call {first:.0f} s)")
            with torch.no_grad():
                theirs = timed(lambda: made.update(theirs=hf_generate(hf, ids, mask, G,
                                                                      args.new_tokens, stop)),
                               args.repeat)
            if P * G == 1:
                bound = bw / weight_bytes(model)
                what = f"bandwidth bound {bw / 1e9:.1f} GB/s / {weight_bytes(model) / 1e6:.0f} MB"
            else:
                flops = flops_per_token(model, T + args.new_tokens // 2)
                bound = peak / flops
                what = f"matmul bound {peak / 1e9:.0f} GFLOP/s / {flops / 1e9:.2f} GFLOP per token"
            r = (str(dtype).removeprefix("torch."), f"{P}x{G}", made["ours"] / ours,
                 made["theirs"] / theirs, bound, what)
            produced = f"  [tokens produced: ours {made['ours']}, transformers {made['theirs']}]"
            print(f"{r[0]:9s} {r[1]:5s} ours {r[2]:7.1f} tok/s  transformers {r[3]:7.1f} tok/s  "
                  f"ratio {r[2] / r[3]:4.2f}x  bound {r[4]:7.1f} tok/s ({r[5]}): "
                  f"ours at {100 * r[2] / r[4]:.0f}%" + compiled + (produced if args.stop else ""),
                  flush=True)


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
