"""
Does a bf16 run really train? A few GRPO steps of the default model under mixed precision
(infra/precision.py), with every matmul run under autocast checked against a fresh bf16 cast of the
weights as they are at that moment, and a probe forward after every update that must differ from the
one before it.

    python bench/bf16_train_check.py --device cuda          # bench/gpu.sh runs this
    python bench/bf16_train_check.py --device cpu --steps 1 # the same on a CPU (slowly)

Prints, per optimizer update, how far the probe's logits moved and how many autocast matmuls used
stale weights; exit 1 if any matmul was stale or any update left the probe unchanged.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from gpu_oneshot import instrument_stale  # noqa: E402
from infra import weights  # noqa: E402
from infra import precision  # noqa: E402
from model import Transformer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--steps", type=int, default=3, help="RL steps (4 updates each)")
    p.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR), help="HF-layout model folder")
    args = p.parse_args()
    weights.ensure_if_default(args.model)
    bf = torch.bfloat16
    state = {"updates": 0, "checked": 0, "stale": 0, "probe": None, "moved": [],
             "step_in_region": 0}
    probe = torch.arange(1, 33, device=args.device)[None]
    # every autocast matmul against a fresh bf16 cast; autocast's nesting at every update
    instrument_stale(args.device, state)
    checked_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = checked_step(self, *a, **k)
        model = self.param_groups[0]["params"][0]._bupo_model
        with torch.no_grad(), precision.autocast(args.device, bf):
            logits = model(probe).float()
        if state["probe"] is not None:
            moved = (logits - state["probe"]).abs().max().item()
            state["moved"].append(moved)
            print(f"update {state['updates']}: probe logits moved by {moved:.3e}; autocast matmuls "
                  f"checked {state['checked']}, stale {state['stale']}")
        state["probe"] = logits
        return out
    real_load = Transformer.from_pretrained.__func__

    def load(cls, path, **k):
        # tag the parameters with their model, for the probe forward after each update
        m = real_load(cls, path, **k)
        for prm in m.parameters():
            prm._bupo_model = m
        return m
    torch.optim.AdamW.step, Transformer.from_pretrained = step, classmethod(load)
    with tempfile.TemporaryDirectory() as out:
        train.main(["--model", args.model, "--device", args.device, "--dtype", "bfloat16",
                    "--algo", "grpo",
                    "--task", "sum2", "--steps", str(args.steps), "--prompts-per-step", "8",
                    "--group-size", "8",
                    "--max-new-tokens", "48", "--lr", "2e-5", "--eval-every", "0", "--save-every",
                    str(args.steps), "--out", str(Path(out) / "run")])
    # the probe is taken after each update, so the first one has no predecessor
    ok = state["stale"] == 0 and state["step_in_region"] == 0 and all(m > 0 for m in state["moved"])
    print(f"{'OK' if ok else 'FAIL'}: {state['updates']} updates, {state['checked']} autocast "
          f"matmuls checked, {state['stale']} stale, opt.step inside autocast "
          f"{state['step_in_region']} times, probe moved after every update: "
          f"{all(m > 0 for m in state['moved'])}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
