"""
How fast the matrix multiplications of one RL step run at their own shapes, against the 2048^3
matmul that bench_trl.py's compute bound divides by: the ceiling that bound cannot show.

    python bench/gemm_shapes.py                   # the default model's shapes, fp32, CPU
    python bench/gemm_shapes.py --out experiments/results/gemm_shapes_cpu.txt

Rows (M) of each product: a decode step has one row per response still running (64 at the start of
bench_trl.py's 8 x 8 step, a few at its end); an update's micro-batch has its real response tokens
(about 440 of 16 sum2 responses) and its distinct prompts' tokens (2 x 119). Each weight [out, in]
appears as the forward x W^T, and in training also the backward's input gradient dY W and weight
gradient dY^T X. Also the memory bandwidth (a copy of the weights), the floor of a decode step
with few rows: all the weights are read once per token, whatever the number of rows. For a decode
step, also the time of ways the model does not use (stacked weights, W x^T), against its own.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra import cli, files, weights  # noqa: E402
from infra.errors import UserError  # noqa: E402
from model import Config  # noqa: E402
from infra.checkpoint import read_json  # noqa: E402


def seconds(fn, budget: float = 0.5) -> float:
    """The best of a few repeats of fn, each repeat about `budget` seconds long."""
    fn()
    n, t0 = 1, time.perf_counter()
    fn()
    n = max(1, int(budget / max(time.perf_counter() - t0, 1e-6)))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def row_counts(text: str, flag: str) -> list[int]:
    try:
        rows = [int(x) for x in text.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise UserError(f"{flag} {text!r}: give positive row counts separated by commas, e.g. 64,8")
    return rows


def main(argv=None):
    p = cli.Parser(description="TFLOP/s of the step's matmul shapes against a 2048^3 matmul.")
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR))
    p.add_argument("--decode-rows", default="64,32,8", help="rows of a decode step")
    p.add_argument("--train-rows", default="441,238", help="rows of an update's micro-batch")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    decode_rows = row_counts(args.decode_rows, "--decode-rows")
    train_rows = row_counts(args.train_rows, "--train-rows")
    if args.out:
        files.check_writable_file(args.out)
    weights.ensure_if_default(args.model)
    c = Config.from_hf(read_json(Path(args.model) / "config.json"))
    d, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    shapes = {"q, o": (c.num_heads * c.head_dim, d), "k, v": (kv, d),
              "gate, up": (c.intermediate_size, d), "down": (d, c.intermediate_size),
              "unembedding": (c.vocab_size, d)}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = 2 * 2048**3 / seconds(lambda: a @ b)
    lines = [f"fp32, CPU, {torch.get_num_threads()} threads; peak {peak / 1e12:.3f} TFLOP/s "
             f"(a 2048^3 matmul); each cell: TFLOP/s and its fraction of the peak"]

    def rate(part, M, out, inp):
        """TFLOP/s of one product of weight [out, inp] with M rows, in the layout autograd uses."""
        W, x, dy = torch.randn(out, inp), torch.randn(M, inp), torch.randn(M, out)
        fn = {"forward x W^T": lambda: torch.nn.functional.linear(x, W),   # nn.Linear
              "input grad dY W": lambda: dy @ W,
              "weight grad dY^T X": lambda: dy.t() @ x}[part]
        r = 2 * M * out * inp / seconds(fn)
        return f"{r / 1e12:.3f} ({r / peak:.0%})"

    def alternative(M, parts, fused):
        """Time of another way to compute the same products over the layers' way (F.linear per
        weight): one matmul of the weights stacked (`fused` [out, in]), or (None) W x^T for the
        single weight of `parts`, transposed back to [M, out]."""
        x = torch.randn(M, parts[0][1])
        Ws = [torch.randn(o, i) for o, i in parts]
        own = seconds(lambda: [torch.nn.functional.linear(x, W) for W in Ws])
        if fused is None:
            other = seconds(lambda: (Ws[0] @ x.t()).t().contiguous())
        else:
            stacked = torch.randn(*fused)
            other = seconds(lambda: torch.nn.functional.linear(x, stacked))
        return other / own
    for M in decode_rows:
        lines.append(f"decode, {M} rows: " + "; ".join(
            f"{name} {rate('forward x W^T', M, o, i)}" for name, (o, i) in shapes.items()))
        lines.append(f"  alternatives at {M} rows, time against the layers' own: " + "; ".join(
            f"{name} {alternative(M, parts, fused):.2f}x" for name, parts, fused in (
                ("q|k|v as one matmul", [shapes["q, o"], shapes["k, v"], shapes["k, v"]],
                 (shapes["q, o"][0] + 2 * kv, d)),
                ("gate|up as one matmul", [shapes["gate, up"]] * 2, (2 * c.intermediate_size, d)),
                ("the unembedding as W h^T", [shapes["unembedding"]], None))))
    for M in train_rows:
        for part in ("forward x W^T", "input grad dY W", "weight grad dY^T X"):
            lines.append(f"training, {M} rows, {part}: " + "; ".join(
                f"{name} {rate(part, M, o, i)}" for name, (o, i) in shapes.items()))
    # the bytes of every weight, read once per decode step
    per_layer = 2 * c.num_heads * c.head_dim * d + 2 * kv * d + 3 * c.intermediate_size * d
    n_params = c.num_layers * per_layer + c.vocab_size * d
    src = torch.randn(n_params)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / seconds(lambda: dst.copy_(src))
    lines.append(f"memory: {bandwidth / 1e9:.1f} GB/s (a copy, read + write); the weights "
                 f"({n_params * 4 / 1e6:.0f} MB fp32) once per decode step: "
                 f"{n_params * 4 / bandwidth * 1e3:.0f} ms, the floor of a step with few rows")
    report = "\n".join(lines)
    print(report)
    if args.out:
        files.write_text(args.out, f"$ python bench/gemm_shapes.py {' '.join(argv or sys.argv[1:])}"
                                   f"\n{report}\n")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
