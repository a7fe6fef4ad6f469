"""
Tables and plots of the experiments, from the runs that experiments/run.sh writes under runs/exp/:

    python experiments/report.py                     # runs/exp -> experiments/results/
    python experiments/report.py --runs DIR --out DIR
    python experiments/report.py --cost runs/cost      # the step costs that experiments/cost.sh measures

Writes OUT/results.md (the tables of README's Experiments section), OUT/flow.png (entropy flow of both models
against relative depth), OUT/training.png (reward and held-out accuracy, mean and spread over seeds, and the
internal policy of the BuPO runs), and a copy of every run's small outputs (metrics.jsonl, args.json,
entropy.json) under OUT/runs/, so that each number in the tables can be traced to the run that produced it.
A run named NAME-sK is seed K of the configuration NAME; spreads are over seeds (sample std, n-1).
"""
import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from files import write_atomic  # noqa: E402

COPY = ("metrics.jsonl", "args.json", "entropy.json")


def read_runs(root: Path) -> dict:
    """{name: {"rows": metrics rows, "args": args.json} or {"flow": entropy.json}} of the finished runs."""
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and ".old-" not in p.name):  # not the moved-aside
        if (d / "entropy.json").exists():
            runs[d.name] = {"flow": json.loads((d / "entropy.json").read_text())}
        elif (d / "metrics.jsonl").exists():
            rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
            runs[d.name] = {"rows": rows, "args": json.loads((d / "args.json").read_text()), "done": (d / ".done").exists()}
    return runs


def config_of(name: str) -> str:
    return name.rsplit("-s", 1)[0] if name.rsplit("-s", 1)[-1].isdigit() else name


def mean_sd(xs: list[float], fmt="{:.3f}") -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# -----------------------------------------------------------------------------
# entropy flow

def flow_table(flows: dict) -> str:
    rows = []
    for name, f in flows.items():
        L, layers = f["num_layers"], f["layers"]
        H = [x["H_resid"] for x in layers]                 # H(pi^l), l = 1..L (layer L through the final norm)
        at = lambda frac: H[max(0, round(frac * L) - 1)]  # noqa: E731
        up = [x["layer"] for x in layers if x["dH_mlp"] > 0]
        rows.append([name, L, f["num_tokens"], f"{H[0]:.2f}", f"{at(.25):.2f}", f"{at(.5):.2f}", f"{at(.75):.2f}",
                     f"{f['H_policy']:.2f}", f"{len(up)} of {L}", f["boundary_layer"] or "none",
                     f"{f['internal_layer']} ({f['internal_layer_rule']})"])
    return table(["run", "L", "tokens", "H(π^1)", "H at L/4", "H at L/2", "H at 3L/4", "H(π_θ)",
                  "layers with ΔH_FFN > 0", "boundary", "auto layer"], rows)


def plot_flow(flows: dict, out: Path, plt):
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, f in flows.items():
        L = f["num_layers"]
        x = [x["layer"] / L for x in f["layers"]]
        line, = axes[0].plot(x, [v["H_resid"] for v in f["layers"]], marker=".", label=f"{f['model']} (L={L})")
        c = line.get_color()
        axes[1].plot(x, [v["dH_mlp"] for v in f["layers"]], marker=".", color=c, label=f"ΔH_FFN {f['model']}")
        axes[1].plot(x, [v["dH_attn"] for v in f["layers"]], ls=":", color=c, label=f"ΔH_ATTN {f['model']}")
    axes[0].set(xlabel="relative depth l / L", ylabel="H(π^l), nats", title="entropy of the layer policies")
    axes[1].set(xlabel="relative depth l / L", ylabel="nats", title="entropy change inside each layer (eq. 11-12)")
    axes[1].axhline(0, color="grey", lw=0.5)
    for ax in axes:
        ax.legend(fontsize=7)
    write_atomic(out / "flow.png", lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------
# training

ORDER = ["grpo", "bupo", "bupo-l15", "bupo-inter3", "bupo-inter10"]  # experiments/run.sh's, others after


def by_config(train: dict) -> dict:
    configs = {}
    for name, r in train.items():
        configs.setdefault(config_of(name), []).append(r)
    rank = lambda c: (ORDER.index(c) if c in ORDER else len(ORDER), c)  # noqa: E731
    return {c: configs[c] for c in sorted(configs, key=rank)}


def describe(run: dict) -> str:
    args = run["args"]
    if args["algo"] == "grpo":
        return "GRPO"
    layer = next(r["policy_layer"] for r in run["rows"] if r.get("phase") == "internal")
    return f"BuPO l={layer}{' (auto)' if args['internal_layer'] == 'auto' else ''}, s_inter={args['internal_steps']}"


def eval_table(configs: dict) -> str:
    rows = []
    for cfg, runs in configs.items():
        evals = [[r for r in run["rows"] if "eval/greedy_acc" in r] for run in runs]
        n = runs[0]["args"]["eval_samples"]
        cell = lambda i, k: mean_sd([e[i][k] for e in evals if len(e) > abs(i)])  # noqa: E731
        train = [[r for r in run["rows"] if "reward" in r] for run in runs]
        mean_reward = mean_sd([statistics.mean(r["reward"] for r in tr) for tr in train])
        to_09 = [next((r["step"] for r in tr if r["reward"] >= 0.9), None) for tr in train]
        reached = [s for s in to_09 if s is not None]
        to_09 = (mean_sd(reached, "{:.1f}") if reached else "never") + (f" ({len(reached)} of {len(train)})"
                                                                    if len(reached) < len(train) else "")
        rows.append([cfg, describe(runs[0]), len(runs), mean_reward, to_09,
                     cell(0, "eval/greedy_acc"), cell(-1, "eval/greedy_acc"), cell(0, f"eval/avg@{n}"),
                     cell(-1, f"eval/avg@{n}"), cell(0, f"eval/pass@{n}"), cell(-1, f"eval/pass@{n}")])
    return table(["config", "algorithm", "seeds", "train reward, mean over the steps", "first step with reward ≥ 0.9",
                  "greedy acc before", "greedy acc after", "avg@4 before", "avg@4 after", "pass@4 before",
                  "pass@4 after"], rows)


def seed_table(configs: dict, seed: int = 0) -> str:
    """The ablations have one seed: every configuration's run of that seed, side by side."""
    rows = []
    for cfg, runs in configs.items():
        for run in (r for r in runs if r["args"]["seed"] == seed):
            tr = [r for r in run["rows"] if "reward" in r]
            ev = [r for r in run["rows"] if "eval/greedy_acc" in r][-1]
            n = run["args"]["eval_samples"]
            rows.append([cfg, describe(run), f"{statistics.mean(r['reward'] for r in tr):.3f}",
                         next((r["step"] for r in tr if r["reward"] >= 0.9), "never"), f"{tr[-1]['reward']:.3f}",
                         f"{ev['eval/greedy_acc']:.3f}", f"{ev[f'eval/avg@{n}']:.3f}", f"{ev[f'eval/pass@{n}']:.3f}"])
    return table(["config", "algorithm", "train reward, mean", "first step ≥ 0.9", "last step's reward",
                  "greedy acc after", "avg@4 after", "pass@4 after"], rows)


def internal_table(configs: dict) -> str:
    rows = []
    for cfg, runs in configs.items():
        for run in (r for r in runs if r["args"]["algo"] == "bupo"):
            tr = [r for r in run["rows"] if "reward" in r]
            last = tr[-1]
            p1 = [r for r in tr if r["phase"] == "internal"]
            rows.append([f"{cfg} seed {run['args']['seed']}", describe(run), len(p1),
                         f"{sum(r['frac_reward_zero_std'] < 1 for r in p1)} of {len(p1)}" if p1 else "-",
                         f"{tr[0]['entropy']:.2f} → {last['entropy']:.2f}",
                         f"{tr[0]['internal/entropy']:.2f} → {last['internal/entropy']:.2f}" if "internal/entropy" in last else "-",
                         f"{tr[0]['internal/kl_to_policy']:.1f} → {last['internal/kl_to_policy']:.1f}" if "internal/kl_to_policy" in last else "-",
                         f"{tr[0]['completions/mean_length']:.1f} → {last['completions/mean_length']:.1f}"])
    return table(["run", "algorithm", "phase-1 steps", "phase-1 steps with a reward signal", "H(π_θ) first → last",
                  "H(π^l) first → last", "KL(π^l‖π_θ) first → last", "mean length first → last"], rows)


def cost_table(configs: dict) -> str:
    rows = []
    for cfg, runs in configs.items():
        tr = [r for run in runs for r in run["rows"] if "reward" in r]
        for phase in ("internal", "full"):
            rs = [r for r in tr if r["phase"] == phase]
            if rs:
                rows.append([cfg, phase, len(rs), mean_sd([r["step_time"] for r in rs], "{:.0f}"),
                             mean_sd([r["tokens_per_s"] for r in rs], "{:.1f}"),
                             f"{max(r['peak_memory_mb'] for r in rs):.0f}"])
    return table(["config", "phase", "steps", "s/step", "response tokens/s", "peak memory MiB"], rows)


def series(runs: list, key: str):
    """(steps, mean, min, max) over seeds of a per-step metric."""
    steps = sorted({r["step"] for run in runs for r in run["rows"] if key in r})
    vals = [[r[key] for run in runs for r in run["rows"] if r["step"] == s and key in r] for s in steps]
    return steps, [statistics.mean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_training(configs: dict, out: Path, plt):
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.8))
    width = 0.8 / len(configs)
    for i, (cfg, runs) in enumerate(configs.items()):
        steps, mu, lo, hi = series(runs, "reward")
        line, = axes[0].plot(steps, mu, marker=".", label=f"{cfg} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        c = line.get_color()
        if len(runs) > 1:
            axes[0].fill_between(steps, lo, hi, color=c, alpha=0.12)
        evals = [[r["eval/greedy_acc"] for r in run["rows"] if "eval/greedy_acc" in r] for run in runs]
        for j in (0, 1):                                   # before and after, mean and spread over seeds
            v = [e[0 if j == 0 else -1] for e in evals]
            axes[1].bar(j + (i - (len(configs) - 1) / 2) * width, statistics.mean(v), width, color=c,
                        yerr=statistics.stdev(v) if len(v) > 1 else 0, capsize=3, label=cfg if j else None)
        for key, ls in (("entropy", "-"), ("internal/entropy", "--")):
            steps, mu, _, _ = series(runs, key)
            if steps:
                axes[2].plot(steps, mu, ls=ls, color=c, label=f"{cfg}: {'H(π_θ)' if key == 'entropy' else 'H(π^l)'}")
    axes[0].set(xlabel="step", ylabel="train reward", title="train reward (mean, min-max over seeds)")
    axes[1].set(xticks=[0, 1], xticklabels=["before", "after"], ylabel="greedy accuracy",
                title="held-out greedy accuracy (mean ± std over seeds)")
    axes[2].set(xlabel="step", ylabel="nats", title="entropy of the policy and of π^l (mean over seeds)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.legend(fontsize=7)
    write_atomic(out / "training.png", lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/exp", help="the folder experiments/run.sh writes into")
    p.add_argument("--out", default="experiments/results", help="where the tables, plots and copies go")
    p.add_argument("--cost", default=None, help="a folder of experiments/cost.sh: write OUT/cost.md only")
    args = p.parse_args()
    if args.cost:
        runs = {k: [v] for k, v in read_runs(Path(args.cost)).items() if "rows" in v}
        text = "### Cost of one step, measured alone\n\n" + cost_table(runs) + "\n"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out) / "cost.md", lambda tmp: tmp.write_text(text))
        for name in runs:
            (Path(args.out) / "cost" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(args.cost) / name / "metrics.jsonl", Path(args.out) / "cost" / name / "metrics.jsonl")
        print(text)
        return
    root, out = Path(args.runs), Path(args.out)
    if not root.is_dir():
        sys.exit(f"error: {root} does not exist; run experiments/run.sh first")
    runs = read_runs(root)
    flows = {k: v["flow"] for k, v in runs.items() if "flow" in v}
    train = {k: v for k, v in runs.items() if "rows" in v and v["done"]}
    unfinished = sorted(k for k, v in runs.items() if "rows" in v and not v["done"])
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = []
    if flows:
        plot_flow(flows, out, plt)
        parts += ["### Entropy flow", flow_table(flows)]
    if train:
        configs = by_config(train)
        plot_training(configs, out, plt)
        parts += ["### Held-out accuracy before and after training", eval_table(configs),
                  "### Seed 0 of every configuration (the ablations have this seed only)", seed_table(configs),
                  "### The internal policy during training", internal_table(configs),
                  "### Cost", cost_table(configs)]
    if unfinished:
        parts.append(f"Not finished, left out: {', '.join(unfinished)}")
    text = "\n\n".join(parts) + "\n"
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(text))
    for name in list(flows) + list(train):
        (out / "runs" / name).mkdir(parents=True, exist_ok=True)
        for f in COPY:
            if (root / name / f).exists():
                shutil.copy(root / name / f, out / "runs" / name / f)
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'flow.png'}, {out / 'training.png'}, {out / 'runs'}/")


if __name__ == "__main__":
    main()
