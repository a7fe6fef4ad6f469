"""
Correctness on a device in a dtype (made for CUDA in bf16): ours against transformers on the same
weights.

    python bench/gpu_check.py --device cuda --dtype bfloat16
    python bench/gpu_check.py --device cpu --dtype float32   # the same checks here (fp32: exact)

For the default model and a tiny random Qwen3 (q/k-norm, head_dim != hidden/heads, untied W_U) it
prints and checks: the largest |logit difference| against transformers relative to the logits'
spread (bf16 tolerance: 3% of the logits' standard deviation; in fp32, 1e-4 absolute), greedy tokens
equal on a few prompts (bf16 may flip a near-tie, so a mismatch is reported with the top-2 margin at
the first differing step), and the residual record exactly additive (h_l == h_{l-1} + a_l + f_l, bit
for bit, in any dtype). Exit 1 if any check fails. transformers is a test-only dependency; this
script needs it (bash setup.sh --test).
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra import cli  # noqa: E402
from infra import weights  # noqa: E402
from bench_rollout import need_transformers  # noqa: E402
from model import Transformer  # noqa: E402
from rollout import generate  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["What is the capital of France?", "What is 17 + 25?", "Name three primary colors."]


def tiny_qwen3(folder: Path):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=128,
                         tie_word_embeddings=False)
    tf.Qwen3ForCausalLM(cfg).save_pretrained(folder)


def check(name, folder, device, dtype, prompts) -> bool:
    from transformers import AutoModelForCausalLM
    ours = Transformer.from_pretrained(folder, dtype=dtype, device=device)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    ok = True
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            a, rec = ours(x, return_residuals=True)
            b = hf(x).logits
        diff = (a.float() - b.float()).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 0.03 * b.float().std().item()
        additive = all(torch.equal(rec.resid[l + 1],
                                   rec.resid[l] + rec.attn_out[l] + rec.mlp_out[l])
                       for l in range(ours.config.num_layers))
        g_ours = generate(ours, [ids], 1, 16, temperature=0.0).response_ids[0].tolist()
        g_hf = hf.generate(x, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, len(ids):].tolist()
        note = ""
        if g_ours != g_hf:
            t = next(i for i, (p, q) in enumerate(zip(g_ours, g_hf)) if p != q)
            with torch.no_grad():
                logits = ours(torch.tensor([ids + g_ours[:t]], device=device))[0, -1]
            top2 = logits.float().topk(2).values
            note = (f" (first differs at token {t}; top-2 logit margin there "
                    f"{float(top2[0] - top2[1]):.3g})")
        passed = diff <= tol and additive
        ok &= passed
        print(f"{name:10s} {str(dtype):15s} max|dlogit| {diff:.4g} (tol {tol:.3g}), residual "
              f"additive {additive}, greedy 16 tokens equal {g_ours == g_hf}{note}: "
              f"{'ok' if passed else 'FAIL'}")
    return ok


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    cli.check_device(args.device)
    need_transformers()
    dtype = getattr(torch, args.dtype)
    weights.ensure()
    tok = Tokenizer(weights.DEFAULT_MODEL_DIR)
    ok = check("smollm2", weights.DEFAULT_MODEL_DIR, args.device, dtype,
               [tok.encode_chat([{"role": "user", "content": q}]) for q in PROMPTS])
    with tempfile.TemporaryDirectory() as d:
        tiny_qwen3(Path(d))
        g = torch.Generator().manual_seed(1)
        ok &= check("tiny qwen3", d, args.device, dtype,
                    [torch.randint(0, 128, (12,), generator=g).tolist() for _ in range(3)])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli.run(main, sys.argv[1:]))
