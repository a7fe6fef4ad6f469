"""
Does a quick-start run keep README's promises, and is a difference from the reference float
rounding or a change of the code?

    bash run.sh && python experiments/check_quickstart.py runs/quickstart/<date-time>
    python experiments/check_quickstart.py RUN --reference runs/quickstart/<earlier run>

The run is deterministic for a given machine and thread count, but not across CPUs: their float
rounding differs (1e-7 to 2e-4 relative in the step-1 entropy on the machines tried), and once a
sampled token flips, two runs part ways. So the reference (experiments/results/quickstart/, from
which README's figures are copied) is compared in three stages, and the verdict is one of:

  identical   every metric but the timings equals the reference's (the machine that made it);
  rounding    the first step where the run differs still has the same sampled tokens (equal
              rewards, lengths and accuracies) and its other metrics within ROUNDING (relative) of
              the reference's, and every README range below holds;
  regression  (exit 1) at the first differing step the tokens are the same but a metric moved by
              more than rounding (the computation changed), or the untrained model's greedy
              accuracy differs (step 0 samples nothing), or a README range fails.
When the first difference is a flipped token at a sampled step, that step cannot tell rounding from
a change; the check says so and the ranges decide. The analysis (entropy.json beside the run, when
there) is held to the same rule: same token count, means within ROUNDING. A run made with other
arguments (`bash run.sh --steps 3`) gets a note naming them and is compared on the steps both have.
With --reference, another run.sh folder is the reference (a run made on this machine just
before a change): then "identical" also requires the checkpoints' weights to be equal, tensor for
tensor. A full run takes minutes, so this is a script to run by hand before a release, not a test.
"""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "experiments" / "results" / "quickstart"
TIMINGS = {"step_time", "tokens_per_s", "peak_memory_mb", "eval_time"}
# where things are, not what the run does
PATHS = {"model", "out", "analysis", "resume", "overwrite", "code"}
# metrics that count sampled tokens or answers: equal unless a token flipped
COUNTS = ("reward", "reward_std", "frac_reward_zero_std", "completions/", "eval/", "phase",
          "policy_layer", "skipped_steps")
# the relative difference float rounding may make at the first differing step; the updates amplify
# the 1e-7 to 2e-4 of a forward pass, while a change of the computation moves metrics by far more
ROUNDING = 1e-2
# README's quick-start table: what every machine tried showed (min, max, inclusive)
# measured with the Philox sampler on one machine (0.9375 at steps 3 and 6; rewards 0.4375, then
# 0.31-0.94): the accuracies after training are held to at least 0.75, the rewards to 0.25-1
RANGES = {"held-out greedy accuracy before training": (0, "eval/greedy_acc", 0.5625, 0.5625),
          "held-out greedy accuracy at step 3": (3, "eval/greedy_acc", 0.75, 1.0),
          "held-out greedy accuracy at step 6": (6, "eval/greedy_acc", 0.75, 1.0),
          "train reward at step 1": (1, "reward", 0.4375, 0.4375),
          **{f"train reward at step {s}": (s, "reward", 0.25, 1.0) for s in range(2, 7)}}


def read(file: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, AttributeError):
        sys.exit(f"error: {file}: a line is not a JSON record (a run cut mid-write?); resume or "
                 f"re-run it first")


def by_step(records: list[dict]) -> dict[int, dict]:
    """One record per step, timings dropped (an evaluation and a training step may log the same
    step)."""
    steps: dict[int, dict] = {}
    for r in records:
        steps.setdefault(r.get("step"), {}).update({k: v for k, v in r.items() if k not in TIMINGS})
    return steps


def relative(x, y) -> float:
    if x == y:
        return 0.0
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return abs(x - y) / max(abs(y), 1e-30)
    return math.inf


def first_difference(got: dict, want: dict):
    """(step, {metric: (value, reference)}) of the first step where the two differ, or None."""
    for step in sorted(set(got) & set(want)):
        diff = {k: (got[step][k], want[step][k]) for k in sorted(set(got[step]) & set(want[step]))
                if relative(got[step][k], want[step][k]) > 0}
        if diff:
            return step, diff
    return None


def judge_first(step, diff) -> tuple[str, str]:
    """('rounding' | 'flip' | 'regression', why) for the first differing step."""
    shown = "; ".join(f"{k} = {a} (reference {b}, relative {relative(a, b):.1e})"
                      for k, (a, b) in list(diff.items())[:4])
    counts = [k for k in diff if k.startswith(COUNTS)]
    if step == 0 and "eval/greedy_acc" in diff:
        return "regression", f"step 0, the untrained model's greedy decoding, differs: {shown}"
    if counts:
        return "flip", (f"step {step}: a sampled token flipped ({', '.join(counts)} differ), so "
                        f"this step cannot tell rounding from a change; the ranges decide: {shown}")
    worst = max(relative(a, b) for a, b in diff.values())
    if worst > ROUNDING:
        return "regression", (f"step {step}: the same tokens, but metrics moved by more than "
                              f"rounding ({ROUNDING:g} relative): {shown}")
    return "rounding", f"step {step}, the first difference, is float rounding: {shown}"


def check_ranges(got: dict) -> list[str]:
    """README's ranges that the run (on the steps it has) breaks."""
    broken = []
    for what, (step, key, lo, hi) in RANGES.items():
        v = got.get(step, {}).get(key)
        if v is not None and not lo - 1e-9 <= v <= hi + 1e-9:
            broken.append(f"{what} is {v}, README promises {lo}-{hi}")
    acc = [got[s]["eval/greedy_acc"] for s in sorted(got) if "eval/greedy_acc" in got[s]]
    if len(acc) > 1 and acc[-1] <= acc[0]:
        broken.append(f"held-out greedy accuracy did not rise ({acc[0]} -> {acc[-1]})")
    return broken


def check_weights(run: Path, reference: Path) -> tuple[str, str] | None:
    """The checkpoints both runs have, tensor for tensor; None when they have none in common."""
    from safetensors.torch import load_file
    mine, theirs = run / "bupo" / "checkpoints", reference / "bupo" / "checkpoints"
    steps = sorted({p.name for p in mine.glob("step_*")} & {p.name for p in theirs.glob("step_*")})
    if not steps:
        return None
    for step in steps:
        a = load_file(mine / step / "model.safetensors")
        b = load_file(theirs / step / "model.safetensors")
        differ = [k for k in sorted(set(a) | set(b))
                  if k not in a or k not in b or not a[k].equal(b[k])]
        if differ:
            return "regression", (f"weights: {step} differs from the reference in {len(differ)} "
                                  f"tensors (first: {differ[0]})")
    return "identical", f"weights: {', '.join(steps)} equal the reference's, tensor for tensor"


def check_analysis(run: Path) -> tuple[str, str] | None:
    """The analysis beside the run, against the reference's entropy.json; None when absent."""
    file = run / "analysis" / "entropy.json"
    if not file.is_file():
        return None
    try:
        got = json.loads(file.read_text())
        layers = [(r["layer"], k, v) for r in got["layers"] for k, v in r.items() if k != "layer"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        sys.exit(f"error: {file}: not an entropy.json of analyze.py; re-run the analysis")
    want_file = REFERENCE / "entropy.json"
    if not want_file.is_file():         # a run.sh folder given as --reference
        want_file = REFERENCE.parent / "analysis" / "entropy.json"
    want = json.loads(want_file.read_text())
    ref = {(r["layer"], k): v for r in want["layers"] for k, v in r.items() if k != "layer"}
    if got.get("num_tokens") != want["num_tokens"]:
        return "flip", (f"analysis: {got.get('num_tokens')} tokens, the reference "
                        f"{want['num_tokens']}: a sampled token flipped")
    # entropies are O(1-10) nats: small ones (a dH near 0) are compared to 1 nat, not to themselves
    worst = max([relative(v, ref.get((l, k))) * min(1.0, abs(ref.get((l, k)) or 1.0))
                 for l, k, v in layers] + [relative(got.get("H_policy"), want["H_policy"])])
    if worst > ROUNDING:
        return "regression", (f"analysis: the same tokens, but an entropy moved by {worst:.1e} "
                              f"relative (more than rounding, {ROUNDING:g})")
    return ("identical" if worst == 0 else "rounding"), f"analysis: largest difference {worst:.1e}"


def main(argv):
    global REFERENCE
    reference = None
    if len(argv) == 3 and argv[1] == "--reference":
        reference = Path(argv[2])
        REFERENCE = reference / "bupo"
        if not (REFERENCE / "metrics.jsonl").is_file():
            sys.exit(f"error: --reference {reference}: no bupo/metrics.jsonl; pass a folder that "
                     f"run.sh printed")
    elif len(argv) != 1:
        sys.exit("error: give the run folder of run.sh (runs/quickstart/<date-time>), and "
                 "optionally --reference <another one>; see the module docstring")
    run = Path(argv[0])
    folder = run / "bupo" if (run / "bupo").is_dir() else run
    file = folder / "metrics.jsonl"
    if not file.is_file():
        sys.exit(f"error: {file}: no metrics.jsonl; pass the folder that run.sh printed")
    args_file = folder / "args.json"
    if args_file.is_file():
        # arguments added since the reference was made are left out (they did not exist)
        mine = json.loads(args_file.read_text())
        ref = json.loads((REFERENCE / "args.json").read_text())
        changed = [f"--{k.replace('_', '-')} {mine[k]} (reference {ref[k]})"
                   for k in sorted(set(mine) & set(ref) - PATHS) if mine[k] != ref[k]]
        if changed:
            print("note: this run's arguments differ from the reference's: " + ", ".join(changed)
                  + "; only the steps and metrics both have are compared")
    got, want = by_step(read(file)), by_step(read(REFERENCE / "metrics.jsonl"))
    if not set(got) & set(want):
        print(f"{file}: no step in common with the reference")
        return 1
    verdicts = []
    first = first_difference(got, want)
    if first:
        verdicts.append(judge_first(*first))
    analysis = check_analysis(run)
    if analysis:
        verdicts.append(analysis)
    weights = check_weights(run, reference) if reference else None
    if weights:
        verdicts.append(weights)
    for kind, why in verdicts:
        print(why)
    broken = check_ranges(got)
    for b in broken:
        print(f"README range broken: {b}")
    kinds = {kind for kind, _ in verdicts}
    if broken or "regression" in kinds:
        print("verdict: regression")
        return 1
    if kinds <= {"identical"}:
        steps = (f"all {len(want)} steps" if set(got) == set(want) else
                 f"the {len(set(got) & set(want))} steps both have (the run logged steps "
                 f"{sorted(got)}, the reference {sorted(want)})")
        print(f"verdict: identical: {steps} equal the reference (timings aside)")
    else:
        print("verdict: rounding: every difference is float rounding, or follows a token it "
              "flipped, and every README range holds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
