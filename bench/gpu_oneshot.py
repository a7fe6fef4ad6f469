"""
The one-shot GPU check, made for a borrowed offline machine: no setup.sh, no pip, no network, random
Qwen3-shaped models built on the device from their configs, the default tokenizer's two files as the
only input. Every check is time-boxed and has its own try/except; one JSON summary and one log go to
$OUT (or --out).

    python bench/gpu_oneshot.py --device cuda                 # about 6 minutes on one H100
    python bench/gpu_oneshot.py --device cpu --small          # the same, tiny shapes (< 3 min)

The checks, in order:
  1. env: versions, the device, and which SDPA kernels accept each attention shape of a run.
  2. stale: a few bf16 training steps (GRPO, BuPO phase 1, --grad-checkpoint) in which every matmul
     under autocast is compared with a fresh bf16 cast of its weights, and autocast is never open at
     opt.step().
  3. bf16_vs_fp32: one fixed batch, bf16 against fp32: gradient cosine, max |delta log p|, the
     ppo-kl of a first mini-batch (~0), with data parallelism's autocast and with FSDP2 in one
     process.
  4. learns: 8 updates on one fixed batch lower its loss; in phase 1 the blocks above l and the
     final norm stay bit-identical.
  5. memory: max_memory_allocated of one update on a 1k-token prompt + 8k-token answer (phase 1 and
     the full policy, --grad-checkpoint) beside the memory plan's figure.
  6. decode: ms per token at 1k and 8k tokens of context, eager and compiled.
  7. train: tokens/s and MFU of a forward + backward on pi^L and on pi^l.
  8. parity: bf16 logits against the transformers installed here, on a tiny random Qwen3.
"""
import argparse
import contextlib
import json
import os
import sys
import signal
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bupo  # noqa: E402
from infra import distributed as dp  # noqa: E402
from infra import memory, precision  # noqa: E402
from model import Config, Transformer  # noqa: E402
from rollout import generate  # noqa: E402

QWEN3_4B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6,
                rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True,
                qk_norm=True, eos_token_id=2)
TINY = dict(QWEN3_4B, vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=3,
            num_heads=4, num_kv_heads=2, head_dim=32)
H100_BF16_TFLOPS = 989.0     # dense bf16 peak of an H100 SXM


class Log:
    def __init__(self, out: Path):
        self.file = open(out / "log.txt", "a")

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build(cfg: dict, device, dtype=torch.float32, seed=0) -> Transformer:
    """A random model of config `cfg` on the device, with non-trivial norm gains."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(Config(**cfg)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.02)
    return model


def fixed_batch(cfg: dict, device, rows=2, prompt=8, answer=24, seed=0) -> bupo.Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg["vocab_size"], (rows, prompt + answer), generator=g)
    return bupo.Batch(ids.to(device), torch.ones_like(ids).to(device), prompt)


# -----------------------------------------------------------------------------
# the checks; each returns a dict of results and an "ok" flag

def check_env(args, log) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    c = TINY if args.small else QWEN3_4B
    nh, nkv, hd = c["num_heads"], c["num_kv_heads"], c["head_dim"]
    T = 64 if args.small else 1024
    g = nh // nkv
    # (rows, query heads, kv heads, queries, keys, masked, enable_gqa): the shapes model.attend uses
    shapes = {"decode, masked, gqa": (16, nh, nkv, 1, T, True, True),
              "decode, masked, folded": (16, nkv, nkv, g, T, True, False),
              "prefill, masked, gqa": (2, nh, nkv, T, T, True, True),
              "training row, causal, gqa": (1, nh, nkv, T, T, False, True),
              "training row, masked, repeated": (1, nh, nh, T, T, True, False)}
    kernels = {}
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    for name, (B, h, kvh, Tq, S, masked, gqa) in shapes.items():
        q = torch.randn(B, h, Tq, hd, device=args.device, dtype=dtype)
        k, v = (torch.randn(B, kvh, S, hd, device=args.device, dtype=dtype) for _ in range(2))
        mask = torch.ones(B, 1, Tq, S, dtype=torch.bool, device=args.device) if masked else None
        kernels[name] = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                   is_causal=mask is None, enable_gqa=gqa)
                kernels[name][backend.name] = "ok"
            except RuntimeError as e:
                kernels[name][backend.name] = " ".join(str(e).split())[:80]
    out["sdpa_kernels"] = kernels
    return {**out, "ok": True}


def instrument_stale(device, state):
    """F.linear and AdamW.step wrapped: a matmul under autocast against a fresh bf16 cast of its
    weights; autocast's nesting at every optimizer step."""
    device_type, bf = torch.device(device).type, torch.bfloat16
    real_linear, real_step = F.linear, torch.optim.AdamW.step

    def linear(x, w, b=None):
        out = real_linear(x, w, b)
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                fresh = real_linear(x.to(bf), w.to(bf), None if b is None else b.to(bf))
            state["checked"] += 1
            state["stale"] += int(out.dtype != bf or not torch.equal(out, fresh))
        return out

    def step(self, *a, **k):
        state["step_in_region"] += int(torch.is_autocast_enabled(device_type))
        state["updates"] += 1
        return real_step(self, *a, **k)
    F.linear, torch.optim.AdamW.step = linear, step
    return lambda: (setattr(F, "linear", real_linear),
                    setattr(torch.optim.AdamW, "step", real_step))


def check_stale(args, log) -> dict:
    import train
    results, ok = {}, True
    cfg = dict(TINY) if args.small else dict(TINY, hidden_size=256, intermediate_size=512,
                                              num_layers=4)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(cfg, "cpu").save_pretrained(folder, copy_from=args.tokenizer)
        runs = {"grpo": ["--algo", "grpo"],
                "bupo phase 1": ["--algo", "bupo", "--internal-layer", "2",
                                 "--internal-steps", "2"],
                "grad checkpoint": ["--algo", "bupo", "--internal-layer", "2",
                                    "--internal-steps", "1", "--grad-checkpoint"]}
        for name, extra in runs.items():
            state = {"checked": 0, "stale": 0, "step_in_region": 0, "updates": 0}
            undo = instrument_stale(args.device, state)
            try:
                train.main(["--model", str(folder), "--device", args.device, "--dtype", "bfloat16",
                            "--task", "add", "--steps", "2", "--prompts-per-step", "4",
                            "--group-size", "4", "--max-new-tokens", "8", "--eval-every", "0",
                            "--save-every", "100", "--lr", "1e-3", "--out",
                            str(Path(tmp) / name.replace(" ", "-")), *extra])
            finally:
                undo()
            good = state["stale"] == 0 and state["step_in_region"] == 0 and state["checked"] > 0
            results[name] = {**state, "ok": good}
            ok &= good
            log(f"  stale {name}: {state}")
    return {**results, "ok": ok}


def grads_and_logp(model, batch, layer, amp):
    model.zero_grad(set_to_none=True)
    with amp():
        logp, _ = bupo.policy_logprobs(model, batch, layer)
    (logp * batch.response_mask).sum().backward()
    grads = torch.cat([dp.gathered(p.grad).float().flatten() for p in model.parameters()
                       if p.grad is not None])
    return logp.detach(), grads


def check_bf16_vs_fp32(args, log) -> dict:
    cfg = TINY if args.small else dict(QWEN3_4B, num_layers=4)
    batch = fixed_batch(cfg, args.device, rows=2, prompt=16, answer=48)
    results, ok = {}, True
    for layer in (2, cfg["num_layers"]):
        model = build(cfg, args.device)
        want_logp, want = grads_and_logp(model, batch, layer, contextlib.nullcontext)
        got_logp, got = grads_and_logp(model, batch, layer,
                                       precision.regions(args.device, torch.bfloat16))
        with torch.no_grad(), precision.autocast(args.device, torch.bfloat16):
            old, _ = bupo.policy_logprobs(model, batch, layer)
        with precision.autocast(args.device, torch.bfloat16):
            new, _ = bupo.policy_logprobs(model, batch, layer)
        mask = batch.response_mask.bool()
        row = {"grad_cosine": F.cosine_similarity(got, want, dim=0).item(),
               "max_abs_dlogp": (got_logp - want_logp)[mask].abs().max().item(),
               "ppo_kl_first_minibatch": (old - new.detach())[mask].mean().item()}
        row["ok"] = row["grad_cosine"] > 0.99 and abs(row["ppo_kl_first_minibatch"]) < 1e-3
        results[f"dp, layer {layer}"] = row
        ok &= row["ok"]
        log(f"  bf16 vs fp32, dp, layer {layer}: {row}")
        # FSDP2 in one process, its bf16 policy instead of autocast
        sharded = build(cfg, args.device)
        dp.shard(sharded, args.device, 1, torch.bfloat16)
        got_logp, got = grads_and_logp(sharded, batch, layer, contextlib.nullcontext)
        row = {"grad_cosine": F.cosine_similarity(got, want, dim=0).item(),
               "max_abs_dlogp": (got_logp - want_logp)[mask].abs().max().item()}
        row["ok"] = row["grad_cosine"] > 0.99
        results[f"fsdp2, layer {layer}"] = row
        ok &= row["ok"]
        log(f"  bf16 vs fp32, fsdp2 (one process), layer {layer}: {row}")
        del model, sharded
    return {**results, "ok": ok}


def check_learns(args, log) -> dict:
    cfg = TINY if args.small else dict(QWEN3_4B, num_layers=4)
    batch = fixed_batch(cfg, args.device, rows=4, prompt=16, answer=32, seed=1)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device=args.device)
    results, ok = {}, True
    for layer in (2, cfg["num_layers"]):
        model = build(cfg, args.device)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4 if not args.small else 1e-3)
        amp = precision.regions(args.device, torch.bfloat16)
        with torch.no_grad(), amp():
            old, _ = bupo.policy_logprobs(model, batch, layer)
        losses = []
        for _ in range(8):
            with amp():
                logp, _ = bupo.policy_logprobs(model, batch, layer)
            mask = batch.response_mask
            tok, _ = bupo.policy_loss(logp, old, adv, mask, dual_clip=10.0)
            loss = bupo.aggregate(tok, mask, "token-mean", 4, int(mask.sum()), mask.shape[1])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        L = cfg["num_layers"]
        above = [n for n in before if n.startswith("norm.")
                 or (n.startswith("layers.") and int(n.split(".")[1]) >= layer)]
        untouched = all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in above)
        row = {"losses": [round(x, 5) for x in losses], "falls": losses[-1] < losses[0]}
        if layer < L:
            row["blocks_above_l_untouched"] = untouched
        row["ok"] = row["falls"] and (untouched or layer == L)
        results[f"layer {layer}"] = row
        ok &= row["ok"]
        log(f"  learns, layer {layer}: {row}")
    return {**results, "ok": ok}


def check_memory(args, log) -> dict:
    """One micro-batch update of 1 row x (prompt + answer) with --grad-checkpoint, bf16 autocast,
    fused AdamW, against the plan's update phase for the same config."""
    cfg = dict(TINY) if args.small else dict(QWEN3_4B, num_layers=4)
    prompt, answer = (64, 256) if args.small else (1024, 8192)
    results, ok = {}, True
    cuda = args.device.startswith("cuda")
    for layer in (2, cfg["num_layers"]):
        model = build(cfg, args.device)
        model.grad_checkpoint = True
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        batch = fixed_batch(cfg, args.device, rows=1, prompt=prompt, answer=answer)
        amp = precision.regions(args.device, torch.bfloat16)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with amp():
            logp, _ = bupo.policy_logprobs(model, batch, layer)
        (logp * batch.response_mask).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        ns = argparse.Namespace(prompts_per_step=1, group_size=1, max_new_tokens=answer,
                                kl_coef=0.0, rollout_batch=1, micro_batch_size=1,
                                grad_checkpoint=True, eval_every=0, eval_problems=1,
                                eval_samples=1, eval_batch=1, parallel="dp", device=args.device)
        plan = memory.plan(Config(**cfg), ns, prompt, 1, 2)["update"]
        row = {"planned_gib": round(sum(plan.values()) / 2**30, 2),
               "seconds": round(time.perf_counter() - t0, 2)}
        if cuda:
            row["measured_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["ok"] = row["measured_gib"] <= row["planned_gib"]
        else:
            row["ok"] = True      # a CPU has no allocator counter here (tests/test_scale.py)
        results[f"layer {layer}"] = row
        ok &= row["ok"]
        log(f"  memory, 1 x ({prompt} + {answer}) tokens, layer {layer}: {row}")
        del model, opt
    return {**results, "ok": ok}


def check_decode(args, log) -> dict:
    cfg = TINY if args.small else QWEN3_4B
    model = build(cfg, args.device, torch.bfloat16 if args.device.startswith("cuda")
                  else torch.float32)
    results = {}
    contexts = (32,) if args.small else (1024, 8192)
    for context in contexts:
        prompt = torch.randint(3, cfg["vocab_size"], (context,)).tolist()
        for compiled in (False, True):
            n = 4 if args.small else 32
            try:
                generate(model, [prompt], 16, 2, temperature=1.0, compile=compiled)   # warm-up
                sync(args.device)
                t0 = time.perf_counter()
                generate(model, [prompt], 16, 2, temperature=1.0, compile=compiled)
                sync(args.device)
                t_short = time.perf_counter() - t0
                t0 = time.perf_counter()
                generate(model, [prompt], 16, n + 2, temperature=1.0, compile=compiled)
                sync(args.device)
                ms = 1000 * (time.perf_counter() - t0 - t_short) / n
                results[f"{context} context, 16 rows, {'compiled' if compiled else 'eager'}"] = \
                    round(ms, 2)
            except Exception as e:
                results[f"{context}, {'compiled' if compiled else 'eager'}"] = f"failed: {e}"[:200]
            log(f"  decode: {results}")
    return {"ms_per_token": results, "ok": True}


def check_train(args, log) -> dict:
    cfg = TINY if args.small else QWEN3_4B
    model = build(cfg, args.device)
    model.grad_checkpoint = not args.small
    rows, answer = (2, 64) if args.small else (4, 2048)
    batch = fixed_batch(cfg, args.device, rows=rows, prompt=256 if not args.small else 16,
                        answer=answer)
    amp = precision.regions(args.device, torch.bfloat16)
    n = memory.params(Config(**cfg))
    results = {}
    for layer in (cfg["num_layers"], max(1, cfg["num_layers"] // 6)):
        times = []
        for _ in range(3):
            sync(args.device)
            t0 = time.perf_counter()
            with amp():
                logp, _ = bupo.policy_logprobs(model, batch, layer)
            logp.sum().backward()
            model.zero_grad(set_to_none=True)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        t = sorted(times)[1]
        tokens = rows * batch.ids.shape[1]
        # 6 N per token for a forward and backward of every matmul (3 with checkpointing's
        # extra forward not counted); below L only the blocks up to l run
        frac = layer / cfg["num_layers"]
        flops = 6 * n * frac * tokens
        key = f"pi^{layer}" + (" (pi_theta)" if layer == cfg["num_layers"] else "")
        results[key] = {"tokens_per_s": round(tokens / t, 1), "seconds": round(t, 3)}
        if args.device.startswith("cuda"):
            results[key]["mfu"] = round(flops / t / (args.peak_tflops * 1e12), 4)
        log(f"  train {key}: {results[key]}")
    return {**results, "ok": True}


def check_parity(args, log) -> dict:
    try:
        import transformers as tf
    except ImportError:
        return {"skipped": "no transformers here", "ok": True}
    cfg = dict(TINY, vocab_size=512)
    model = build(cfg, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        hf = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
        ours = Transformer.from_pretrained(tmp, dtype=dtype, device=args.device)
    ids = torch.randint(3, 512, (2, 40), device=args.device)
    with torch.no_grad():
        a, b = ours(ids).float(), hf(ids).logits.float()
    diff = (a - b).abs().max().item()
    scale = b.std().item()
    row = {"max_abs_dlogit": diff, "logit_std": scale, "relative": diff / scale,
           "greedy_equal": bool((a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95)}
    row["ok"] = row["relative"] < (0.03 if dtype == torch.bfloat16 else 1e-4)
    log(f"  parity: {row}")
    return row


# name, check, seconds it may take on an H100 (and on a CPU with --small)
CHECKS = [("env", check_env, 30), ("stale", check_stale, 90),
          ("bf16_vs_fp32", check_bf16_vs_fp32, 45), ("learns", check_learns, 45),
          ("memory", check_memory, 60), ("decode", check_decode, 150), ("train", check_train, 60),
          ("parity", check_parity, 30)]


class TimeBox(Exception):
    pass


def run_boxed(fn, args, log, seconds):
    """fn(args, log), stopped by an alarm after `seconds` (between two Python steps: a long kernel
    finishes first); a check that fails or overruns is a result, and the next one starts."""
    def alarm(*_):
        raise TimeBox(f"time-boxed: stopped after {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        return fn(args, log)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500],
                "trace": traceback.format_exc()[-1500:]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (a rehearsal on a CPU)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder of summary.json and log.txt (default: $OUT, else runs/gpu-oneshot)")
    p.add_argument("--tokenizer", default=str(ROOT / "models" / "smollm2-135m-instruct"),
                   help="folder with the default tokenizer's tokenizer.json and "
                   "tokenizer_config.json")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                   help="the device's dense bf16 peak, for MFU")
    p.add_argument("--only", default=None, help="comma-separated names of checks to run")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every time box")
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / "runs" / "gpu-oneshot" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    torch.set_flush_denormal(True)
    os.environ.setdefault("BUPO_INIT_TIMEOUT_S", "60")
    dp.setup(args.device, 1, 1, 1, False, "fsdp")     # a group of one, for FSDP2 in check 3
    summary, t_all = {"device": args.device, "small": args.small, "checks": {}}, time.perf_counter()
    for name, fn, seconds in CHECKS:
        if args.only and name not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        log(f"== {name}")
        result = run_boxed(fn, args, log, seconds * args.scale)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        summary["checks"][name] = result
        log(f"== {name}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s"
            + (f" ({result['error']})" if "error" in result else ""))
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    summary["ok"] = all(r.get("ok") for r in summary["checks"].values())
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log(f"all checks {'ok' if summary['ok'] else 'NOT ok'} in {summary['seconds']} s: "
        f"{out / 'summary.json'}")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
