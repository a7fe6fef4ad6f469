"""
Training throughput: one GRPO micro-batch step (forward with gradient, log-probs of the response
tokens, the clipped surrogate, backward) with our model against the same step with transformers'
model, on the same batch.

    python bench/bench_train.py                                        # default model, fp32, CPU
    python bench/bench_train.py --device cuda --dtype bfloat16 --rows 32 --new-tokens 512 \\
        --peak-tflops 989

The batch is --rows chat prompts (left-padded) followed by --new-tokens random response tokens,
advantages random. Both sides run the same loss code (bupo.policy_loss, token-mean); ours takes the
log-probs with bupo.policy_logprobs, transformers' side with a log-softmax of its full logits.
`--dtype bfloat16` is bf16 autocast over fp32 weights, as train.py runs on a GPU. Ours is also timed
for BuPO's phase 1 at --layer, where the forward stops after block l. It prints, per case, response
tokens/s, all tokens/s (prompt + response) and the model FLOPs utilisation, MFU = 3 x useful forward
FLOPs / step time / peak FLOP/s: the blocks (counted as in bench_rollout.py; phase 1: l of the L
blocks) on every token, the unembedding on the response positions only and the peak is measured on a
matmul here, or given with --peak-tflops (e.g. 989 for an H100 SXM in bf16, its dense peak).
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
import bupo  # noqa: E402
import host  # noqa: E402
from infra import cli, files  # noqa: E402
from infra import weights  # noqa: E402
from bench_rollout import PROMPTS, flops_per_token, need_transformers  # noqa: E402
from analyze import load  # noqa: E402
from infra.errors import UserError  # noqa: E402
from rollout import left_pad  # noqa: E402


def batch(tok, rows: int, new_tokens: int, vocab: int, device):
    prompts = [tok.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
               for i in range(rows)]
    ids, mask = left_pad(prompts, 0, "cpu")
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([ids, torch.randint(vocab, (rows, new_tokens), generator=g)], 1).to(device)
    mask = torch.cat([mask, torch.ones(rows, new_tokens, dtype=torch.long)], 1).to(device)
    return ids, mask, ids.shape[1] - new_tokens, torch.randn(rows, generator=g).to(device)


def step(logp_fn, ids, mask, Tp, adv):
    """One micro-batch of the GRPO loss: log-probs, the surrogate at ratio 1 (old = new, detached),
    backward."""
    logp = logp_fn(ids, mask, Tp)
    rm = mask[:, Tp:]
    loss, _ = bupo.policy_loss(logp, logp.detach(), adv, rm, 0.2, 0.2, 10.0)
    bupo.aggregate(loss, rm, "token-mean", num_seqs=len(ids), num_tokens=int(rm.sum()),
                   max_len=rm.shape[1]).backward()


def hf_logprobs(hf):
    def fn(ids, mask, Tp):
        logits = hf(input_ids=ids, attention_mask=mask).logits[:, Tp - 1:-1].float()
        return logits.log_softmax(-1).gather(-1, ids[:, Tp:, None])[..., 0]
    return fn


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR), help="HF-layout model folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: autocast")
    p.add_argument("--rows", type=int, default=8, help="responses per micro-batch")
    p.add_argument("--new-tokens", type=int, default=64, help="response tokens per row")
    p.add_argument("--layer", type=int, default=None, help="BuPO phase-1 layer l (default: L // 4)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds of the cases, alternated, after a warm-up of each; the median "
                   "and the range are reported")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s for the MFU (default: measured)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    cli.positive(args, "--rows", "--new-tokens", "--layer", "--repeat")
    if args.peak_tflops is not None:
        cli.finite(args, "--peak-tflops", 0, low_open=True)
    cli.check_device(args.device)
    if args.out:
        files.check_writable_file(args.out)
    AutoModelForCausalLM = need_transformers()
    torch.set_flush_denormal(True)  # as train.py does
    device, cuda = torch.device(args.device), args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    model, tok = load(args.model, device=args.device)
    L = model.config.num_layers
    layer = args.layer or L // 4
    if layer >= L:
        raise UserError(f"--layer {layer}: the model has {L} layers; phase 1 needs "
                        f"1 <= l <= {L - 1}")
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    ids, mask, Tp, adv = batch(tok, args.rows, args.new_tokens, model.config.vocab_size, device)
    context = Tp + args.new_tokens // 2
    cases = [("ours, full policy", model, lambda i, m,
              t: bupo.policy_logprobs(model, bupo.Batch(i, m, t), L, 1.0)[0], L),
             (f"ours, phase 1 (pi^{layer})", model, lambda i, m,
              t: bupo.policy_logprobs(model, bupo.Batch(i, m, t), layer, 1.0)[0], layer),
             ("transformers, full policy", hf, hf_logprobs(hf), L)]

    def run(net, fn):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            step(fn, ids, mask, Tp, adv)
        net.zero_grad(set_to_none=True)
        host.sync(device)
    times = {name: [] for name, *_ in cases}
    with host.Watch(dtype, device) as watch:
        for name, net, fn, _ in cases:          # a warm-up of each
            run(net, fn)
        for _ in range(args.repeat):            # then the cases alternated, --repeat rounds
            for name, net, fn, _ in cases:
                t0 = time.perf_counter()
                run(net, fn)
                times[name].append(time.perf_counter() - t0)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else watch.peak
    lines = [f"{args.device} {args.dtype}, {torch.get_num_threads()} threads, peak "
             f"{peak / 1e12:.2f} TFLOP/s ({'given' if args.peak_tflops else 'measured'}); batch "
             f"{args.rows} x ({Tp} prompt + {args.new_tokens} response) tokens; {args.repeat} "
             f"rounds of the cases alternated, after a warm-up of each"]
    n_resp, n_all = int(mask[:, Tp:].sum()), int(mask.sum())
    for name, net, fn, depth in cases:
        dt = statistics.median(times[name])
        # the useful forward FLOPs: the blocks that run (phase 1: l of L) on every token, the
        # unembedding on the response positions only (transformers computes it everywhere: its extra
        # work is not counted); x3 with backward
        head = 2 * model.lm_head.weight.numel()
        flops = 3 * ((flops_per_token(model, context) - head) * depth / L * n_all + head * n_resp)
        lines.append(f"{name:28s} {host.median_range([1000 * t for t in times[name]])} ms/step  "
                     f"{n_resp / dt:9.1f} response tok/s  {n_all / dt:9.1f} tok/s  "
                     f"MFU {100 * flops / dt / peak:5.1f}%")
    if cuda:
        lines.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    lines.append(watch.report())
    print("\n".join(lines))
    if args.out:
        files.write_text(args.out, f"$ python bench/bench_train.py {' '.join(argv or sys.argv[1:])}"
                                   f"\n# {host.provenance()}\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
