"""
How stable is the project's closest-layer rule? It repeats train.py's own quick analysis for
--internal-layer auto (N of the model's answers to the task, T = 1, seeded; analyze.py's entropy
flow with the KL of every layer policy to the model's) for several seeds, and prints, per seed, the
paper's boundary layer, the layer of least KL, the project's closest layer (closest_layer below:
the lowest layer within 10% of the least KL; docs/method.md 5) and the layer auto picks (the
boundary layer, else the penultimate one; the closest layer was tested and is not used).

    python experiments/layer_rule.py        # default model, sum2, 8 answers, seeds 0-4
    python experiments/layer_rule.py --task sum2 --shots 1 -n 8 --seeds 0 1 2 3 4 \\
        --out experiments/results/layer_rule.json
"""
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import analyze  # noqa: E402
import bupo  # noqa: E402
from infra import cli  # noqa: E402
import tasks  # noqa: E402
from infra.errors import UserError  # noqa: E402
from infra.files import check_writable_file, write_atomic  # noqa: E402

# layers within 10% of the least KL count as equally close (docs/method.md 5)
CLOSEST_TOLERANCE = 0.10


def closest_layer(kl: list, tolerance: float = CLOSEST_TOLERANCE) -> int:
    """The project's closest-layer rule (not the paper's), tested and not adopted for
    --internal-layer auto: the lowest layer l < L whose policy pi^l is about as close to the
    model's policy as any, mean KL(pi^l || pi_theta) <= (1 + tolerance) * the least of them, on
    the model's own answers (bupo.kl_flow). The tolerance keeps the pick from hopping between
    layers of a plateau. On SmolLM2-135M it picks layer 24, which trained worse than the
    penultimate layer on 4 of 5 seeds (docs/method.md 5)."""
    # a NaN (overflow) never counts as close
    below = [d if math.isfinite(d) else math.inf for d in kl[:-1]]
    if not below or min(below) == math.inf:
        # no layer below L (a 1-layer model), or none measurable: the penultimate
        return max(1, len(kl) - 1)
    return next(l for l, d in enumerate(below, start=1) if d <= (1 + tolerance) * min(below))


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[1])
    cli.add_model_args(p, dtype=False)
    p.add_argument("--task", default="sum2", choices=sorted(tasks.TASKS))
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("-n", "--num-responses", type=int, default=8,
                   help="answers per seed (train.py's quick analysis: 8)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=None, help="a JSON file for the per-layer KL of every seed")
    args = p.parse_args(argv)
    cli.positive(args, "--num-responses", "--max-new-tokens")
    cli.non_negative(args, "--shots")
    if min(args.seeds) < 0:
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: seeds must be 0 or more")
    if args.out:
        check_writable_file(args.out)
    torch.set_flush_denormal(True)
    model, tok = analyze.load(args.model, device=cli.check_device(args.device))
    L, rows = model.config.num_layers, []
    for seed in args.seeds:
        pairs = analyze.sample_responses(model, tok, tasks.Source(args.task, args.shots),
                                         args.num_responses, args.max_new_tokens, seed)
        means = bupo.entropy_changes(analyze.analyze(model, pairs)[0])
        kl = means["KL_resid"]
        rows.append({"seed": seed, "KL_resid": kl,
                     "boundary_layer": bupo.boundary_layer(means["dH_mlp"]),
                     "least_kl_layer": closest_layer(kl, tolerance=0.0),
                     "closest_layer": closest_layer(kl),
                     "auto": bupo.choose_internal_layer(means["dH_mlp"])})
        r = rows[-1]
        print(f"seed {seed}: boundary {r['boundary_layer']}, least KL at {r['least_kl_layer']} "
              f"({kl[r['least_kl_layer'] - 1]:.2f} nats), closest layer {r['closest_layer']}, KL "
              f"at L-1 {kl[L - 2]:.2f}; auto -> {r['auto'][0]} ({r['auto'][1]})", flush=True)
    if args.out:
        result = {"command": "python experiments/layer_rule.py " + " ".join(argv or []),
                  "num_layers": L, "tolerance": CLOSEST_TOLERANCE, "seeds": rows}
        write_atomic(Path(args.out),
                     lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
