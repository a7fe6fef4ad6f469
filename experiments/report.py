"""
Tables and plots of the experiments, from the runs that experiments/run.sh writes under runs/exp/:

    python experiments/report.py                     # runs/exp -> experiments/results/
    python experiments/report.py --runs DIR --out DIR
    python experiments/report.py --cost runs/cost    # the step costs experiments/cost.sh measures

Writes OUT/results.md (the tables of docs/experiments.md), OUT/flow.png (the entropy flow and the KL
of each layer policy to the model's), OUT/training.png, layers.png and inter.png (train reward and
held-out accuracy of the main arms, the layer sweep and the s_inter sweep), OUT/dynamics.png (the
entropies and the KL across the switch, the paper's Fig. 7), and a copy of every run's small outputs
(metrics.jsonl, args.json, entropy.json) under OUT/runs/, so that each number in the tables can be
traced to the run that produced it. A run named NAME-sK is seed K of the configuration NAME; every ±
is a standard error over seeds (sample std / sqrt(n)), and every paired interval a 95% t interval
over the seeds both configurations have.
"""
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layer_rule import closest_layer  # noqa: E402
import bupo  # noqa: E402
from infra import cli  # noqa: E402
from infra.errors import UserError, first_line  # noqa: E402
from infra.files import check_writable_dir, write_atomic  # noqa: E402
from infra.runs import read_metrics  # noqa: E402

COPY = ("metrics.jsonl", "args.json", "entropy.json", "changes.json")


NUM = (int, float)
# the fields of each record the report reads: {field: type}, and "layers": those of each layer
FIELDS = {
    "args.json": {"algo": str, "seed": int, "internal_steps": int},
    "entropy.json": {"num_layers": int, "num_tokens": int, "H_policy": NUM,
                     "boundary_layer": (int, type(None)),
                     "layers": {"layer": int, "H_resid": NUM, "dH_mlp": NUM}},
    "changes.json": {"num_layers": int, "run": dict, "unembedding": NUM,
                     "layers": {"layer": int, "kl": NUM, "dH": NUM, "dcos": NUM, "attn": NUM,
                                "mlp": NUM}},
}


FIX = "restore it, or move its folder out of --runs"


def read_json(file: Path) -> dict:
    """A run's JSON record (args.json, entropy.json, changes.json), or one line naming it."""
    try:
        d = json.loads(file.read_bytes())
    except (OSError, ValueError) as e:       # unreadable, not UTF-8, not JSON
        raise UserError(f"{file}: not a readable JSON record ({first_line(e, None)}); {FIX}") \
            from None
    if not isinstance(d, dict):
        raise UserError(f"{file}: holds a JSON {type(d).__name__}, not the record of a run; {FIX}")
    return d


def lacks(rec, fields: dict, where: str = "") -> list[str]:
    """The FIELDS a record lacks or holds with another type (the first bad layer only)."""
    if not isinstance(rec, dict):
        return [f"{where} (a JSON {type(rec).__name__})"]
    bad = []
    for k, kind in fields.items():
        if isinstance(kind, dict):
            layers = rec.get(k)
            bad += ([f"{k} (a list)"] if not isinstance(layers, list) or not layers else
                    [x for i, r in enumerate(layers) for x in lacks(r, kind, f"{k}[{i}]")][:1])
        elif k not in rec or not isinstance(rec[k], kind) or isinstance(rec[k], bool):
            bad.append(f"{where}.{k}" if where else k)
    return bad


def checked(file: Path, rec: dict) -> dict:
    """rec, with the fields the report reads, or one line naming the file and what it lacks."""
    bad = lacks(rec, FIELDS[file.name])
    if bad:
        raise UserError(f"{file}: lacks {', '.join(bad)}, or holds another type there; {FIX}")
    return rec


def read_runs(root: Path) -> dict:
    """{name: {"rows": metrics rows, "args": args.json} or {"flow": entropy.json}} of the finished
    runs."""
    runs = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and ".old-" not in p.name):
        # not the moved-aside
        if (d / "changes.json").exists():   # analyze.py --against: what a run changed
            runs[d.name] = {"changes": checked(d / "changes.json", read_json(d / "changes.json"))}
        elif (d / "entropy.json").exists():
            runs[d.name] = {"flow": checked(d / "entropy.json", read_json(d / "entropy.json"))}
        elif (d / "metrics.jsonl").exists():
            if not (d / "args.json").exists():
                # started too briefly to have written its arguments
                continue
            # skips the half-written last line of a run still going
            rows = read_metrics(d)
            args = read_json(d / "args.json")
            # finished: run.sh's marker, or (in the copies under experiments/results/runs) every
            # step logged
            done = ((d / ".done").exists()
                    or bool(rows and args.get("steps") and rows[-1]["step"] >= args["steps"]))
            if done:        # what the tables read (an unfinished run is only named)
                checked(d / "args.json", args)
            runs[d.name] = {"rows": rows, "args": args, "done": done}
    return runs


def config_of(name: str) -> str:
    return name.rsplit("-s", 1)[0] if name.rsplit("-s", 1)[-1].isdigit() else name


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


# -----------------------------------------------------------------------------
# entropy flow

def flow_table(flows: dict) -> str:
    rows = []
    for name, f in flows.items():
        L, layers = f["num_layers"], f["layers"]
        # H(pi^l), l = 1..L (layer L through the final norm)
        H = [x["H_resid"] for x in layers]
        at = lambda frac: H[max(0, round(frac * L) - 1)]  # noqa: E731
        up = [x["layer"] for x in layers if x["dH_mlp"] > 0]
        kl = [x.get("KL_resid") for x in layers]
        has_kl = None not in kl[:-1] and L > 1
        least = closest_layer(kl, tolerance=0.0) if has_kl else None
        # the layers the current code picks from these means (the file keeps the picks of the code
        # that wrote it)
        auto = bupo.choose_internal_layer([x["dH_mlp"] for x in layers])
        rows.append([name, L, f["num_tokens"], f"{H[0]:.2f}", f"{at(.25):.2f}", f"{at(.5):.2f}",
                     f"{at(.75):.2f}", f"{f['H_policy']:.2f}", f"{len(up)} of {L}",
                     f["boundary_layer"] or "none",
                     f"{kl[least - 1]:.1f} at l = {least}" if least else "-",
                     f"{kl[L - 2]:.1f}" if least else "-",
                     closest_layer(kl) if has_kl else "-", f"{auto[0]} ({auto[1]})"])
    return table(["run", "L", "tokens", "H(π^1)", "H at L/4", "H at L/2", "H at 3L/4", "H(π_θ)",
                  "layers with ΔH_FFN > 0", "boundary", "least KL(π^l‖π_θ), l < L", "KL at L-1",
                  "closest layer (KL rule, not used)", "auto layer"], rows)


def plot_flow(flows: dict, out: Path, plt):
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.8))
    for name, f in flows.items():
        L = f["num_layers"]
        x = [x["layer"] / L for x in f["layers"]]
        line, = axes[0].plot(x, [v["H_resid"] for v in f["layers"]], marker=".",
                             label=f"{f['model']} (L={L})")
        c = line.get_color()
        axes[1].plot(x, [v["dH_mlp"] for v in f["layers"]], marker=".", color=c,
                     label=f"ΔH_FFN {f['model']}")
        axes[1].plot(x, [v["dH_attn"] for v in f["layers"]], ls=":", color=c,
                     label=f"ΔH_ATTN {f['model']}")
        if all("KL_resid" in v for v in f["layers"]):
            axes[2].plot(x[:-1], [v["KL_resid"] for v in f["layers"][:-1]], marker=".", color=c,
                         label=f["model"])
            axes[2].axvline(closest_layer([v["KL_resid"] for v in f["layers"]]) / L,
                            color=c, ls=":", lw=0.8)
    axes[0].set(xlabel="relative depth l / L", ylabel="H(π^l), nats",
                title="entropy of the layer policies")
    axes[1].set(xlabel="relative depth l / L", ylabel="nats",
                title="entropy change inside each layer (eq. 12-13)")
    axes[2].set(xlabel="relative depth l / L", ylabel="nats",
                title="KL(π^l ‖ π_θ), l < L (dotted: the project's closest layer)")
    axes[1].axhline(0, color="grey", lw=0.5)
    for ax in axes:
        ax.legend(fontsize=7)
    write_atomic(out / "flow.png",
                 lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------
# statistics over seeds

# t_{0.975, df}
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 11: 2.201, 12: 2.179, 13: 2.16, 14: 2.145, 15: 2.131, 16: 2.12, 17: 2.11,
       18: 2.101, 19: 2.093, 20: 2.086, 21: 2.08, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.06,
       26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}
# t_{0.95, df}: the two-sided 90% interval, two one-sided 5% tests
T90 = {1: 6.314, 2: 2.92, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.86, 9: 1.833,
       10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.74,
       18: 1.734, 19: 1.729, 20: 1.725, 21: 1.721, 22: 1.717, 23: 1.714, 24: 1.711, 25: 1.708,
       26: 1.706, 27: 1.703, 28: 1.701, 29: 1.699, 30: 1.697}


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with df degrees of freedom (1.96 past df 30)."""
    return T95.get(df, 1.96)


# experiments/PLAN.md: its endpoint, its seeds, its margin and its three possible verdicts; the
# steps after BuPO's phase 1 (s_inter = 4 of 40) for the train-reward endpoint
PLAN_SEEDS, PLAN_MARGIN, PLAN_AFTER_PHASE1 = list(range(20)), 0.05, range(5, 41)


def final_greedy(run: dict) -> float:
    """The primary endpoint: held-out greedy accuracy at the run's last evaluation."""
    return evals(run)[-1]["eval/greedy_acc"]


def plan_pairs(configs: dict) -> list[int]:
    """The planned seeds whose GRPO and BuPO arms have both finished."""
    return sorted(set(configs.get("grpo", {})) & set(configs.get("bupo", {})) & set(PLAN_SEEDS))


def plan_verdict(configs: dict) -> str:
    """experiments/PLAN.md's analysis of BuPO − GRPO (final held-out greedy accuracy, paired by
    seed): the 95% and 90% t intervals and, only once every planned pair is finished, the verdict
    decided in advance."""
    both = plan_pairs(configs)
    if len(both) < 2:
        return "Not enough finished pairs yet."
    d = [final_greedy(configs["bupo"][s]) - final_greedy(configs["grpo"][s]) for s in both]
    m, lo95, hi95 = t_interval(d)
    _, lo90, hi90 = t_interval(d, level=90)
    text = (f"{len(both)} of {len(PLAN_SEEDS)} pairs (seeds {', '.join(map(str, both))}): BuPO − "
            f"GRPO = {m:+.3f}, 95% interval [{lo95:+.3f}, {hi95:+.3f}], 90% interval [{lo90:+.3f}, "
            f"{hi90:+.3f}] (equivalence margin ±{PLAN_MARGIN}).")
    if len(both) < len(PLAN_SEEDS):
        return text + " Interim: no verdict until every planned pair is finished."
    if lo95 > 0 or hi95 < 0:
        verdict = (f"BuPO is {'better' if m > 0 else 'worse'} than GRPO by {m:+.3f} "
                   f"[{lo95:+.3f}, {hi95:+.3f}].")
    elif -PLAN_MARGIN < lo90 and hi90 < PLAN_MARGIN:
        verdict = (f"BuPO and GRPO are equivalent within {PLAN_MARGIN * 100:.0f} points at this "
                   "scale.")
    else:
        verdict = ("Inconclusive: neither a difference nor equivalence within "
                   f"{PLAN_MARGIN * 100:.0f} points is shown.")
    return text + " Verdict: " + verdict


def plan_pairs_table(configs: dict) -> str:
    """Every finished planned pair: its final held-out greedy accuracies, their difference, and the
    code each arm ran (args.json's `code`: commit, and `*` where the tree was not clean; "-" for
    runs from before the record existed)."""
    def code(run):
        c = run["args"].get("code") or {}
        return (c.get("commit") or "-")[:7] + ("" if c.get("clean", True) else "*")
    rows = []
    for s in plan_pairs(configs):
        g, b = (final_greedy(configs[a][s]) for a in ("grpo", "bupo"))
        rows.append([s, code(configs["grpo"][s]), code(configs["bupo"][s]), f"{g:.3f}", f"{b:.3f}",
                     f"{b - g:+.3f}"])
    return table(["seed", "GRPO's code", "BuPO's code", "GRPO, greedy after", "BuPO",
                  "BuPO − GRPO"], rows)


def plan_secondary(configs: dict) -> str:
    """experiments/PLAN.md's secondary endpoints, BuPO − GRPO paired by seed over the planned pairs
    finished, each with its 95% t interval and no verdict of its own."""
    both = plan_pairs(configs)

    def at(step, key):
        return lambda run: next((r[key] for r in evals(run) if r["step"] == step), None)

    def after_phase1(run):
        rewards = [r["reward"] for r in steps(run) if r["step"] in PLAN_AFTER_PHASE1]
        return statistics.mean(rewards) if rewards else None
    endpoints = [("held-out avg@2 at step 40", lambda run: evals(run)[-1].get(avg_key(run))),
                 ("held-out greedy accuracy at step 20", at(20, "eval/greedy_acc")),
                 (f"mean train reward, steps {PLAN_AFTER_PHASE1[0]}-{PLAN_AFTER_PHASE1[-1]}",
                  after_phase1)]
    rows = []
    for name, value in endpoints:
        pairs = [(value(configs["bupo"][s]), value(configs["grpo"][s])) for s in both]
        d = [b - g for b, g in pairs if b is not None and g is not None]
        rows.append([name, len(d), paired(d), f"{sum(x > 0 for x in d)} / {sum(x < 0 for x in d)}"])
    return table(["secondary endpoint", "pairs", "BuPO − GRPO, 95% interval",
                  "seeds better / worse"], rows)


# experiments/PLAN.md, "phase 1's dose": s_inter = 10 (and 20) against 4 at l = 29, on seeds 20-25
DOSE_SEEDS, DOSE20_SEEDS = list(range(20, 26)), [20, 21, 22]


def dose_verdict(configs: dict) -> str:
    """The dose plan's primary endpoint (final greedy accuracy, dose10 − dose4, paired by seed,
    95% t interval, df = n − 1) with the verdict decided in advance once all 6 pairs are in, and its
    secondaries: dose20 − dose4, avg@2 at the end, the train reward over steps 21-40, and how many
    runs of each arm end below their own step-0 accuracy."""
    arms = {s: configs.get(f"bupo-dose{s}", {}) for s in (4, 10, 20)}
    if not arms[4]:
        return "No dose run has finished yet."
    lines = []
    for s, seeds in ((10, DOSE_SEEDS), (20, DOSE20_SEEDS)):
        both = sorted(set(arms[s]) & set(arms[4]) & set(seeds))
        if not both:
            lines.append(f"dose{s} − dose4: no finished pair yet.")
            continue
        d = [final_greedy(arms[s][k]) - final_greedy(arms[4][k]) for k in both]
        a = [evals(arms[s][k])[-1]["eval/avg@2"] - evals(arms[4][k])[-1]["eval/avg@2"]
             for k in both]
        r = [x - y for x, y in zip(window_reward([arms[s][k] for k in both], 21, 40),
                                   window_reward([arms[4][k] for k in both], 21, 40))]
        text = (f"dose{s} − dose4 over seeds {', '.join(map(str, both))}: final greedy accuracy "
                f"{paired(d)} ({sum(x > 0 for x in d)} / {sum(x < 0 for x in d)} seeds better / "
                f"worse); avg@2 at the end {paired(a)}; train reward over steps 21-40 {paired(r)}.")
        if s == 10 and len(both) == len(DOSE_SEEDS):
            _, lo, hi = t_interval(d)
            text += (f" Verdict: a phase 1 of 10 steps ends {paired(d)} against one of 4."
                     if lo > 0 or hi < 0 else " Verdict: could not tell at 6 seeds.")
        elif s == 10:
            text += " Interim: no verdict until all 6 pairs are in."
        lines.append(text)
    fell = lambda runs: sum(final_greedy(r) < evals(r)[0]["eval/greedy_acc"]  # noqa: E731
                            for r in runs.values())
    below = [f"dose{s}: {fell(runs)} of {len(runs)}" for s, runs in arms.items() if runs]
    lines.append("Runs that end below their own step-0 greedy accuracy: " + ", ".join(below) + ".")
    return "\n\n".join(lines)


def mechanism_table(configs: dict) -> str:
    """What the logs say phase 1 did, per BuPO configuration over its seeds (mean ± SE): the train
    reward of the 10 steps after phase 1 against GRPO's first 10 (paired by seed: phase 1 as a pure
    delay shows as 0), the per-step change of cos(h_l, h_L) during phase 1 and over as many steps
    after it (the paper's Fig. 5 feature refinement), the rise of H(pi_theta) over phase 1, and its
    correlation across seeds with the final greedy accuracy."""
    rows = []
    for cfg, runs in configs.items():
        rs = {k: r for k, r in runs.items() if r["args"]["algo"] == "bupo"}
        if not rs:
            continue
        s = next(iter(rs.values()))["args"]["internal_steps"]
        seeds = sorted(set(rs) & set(configs.get("grpo", {})))
        delay = [a - b for a, b in zip(window_reward([rs[k] for k in seeds], s + 1, s + 10),
                                       window_reward([configs["grpo"][k] for k in seeds], 1, 10))]
        at = [{r["step"]: r for r in steps(run)} for run in rs.values()]
        last = min(len(a) for a in at)

        def per_step(key, first, end):      # the change of key from step first to end, per step
            if not first < end <= last:
                return []
            return [(a[end][key] - a[first][key]) / (end - first) for a in at]
        after = min(2 * s, last - 1)                           # as many steps after, if there are
        rise = [a[s]["entropy"] - a[1]["entropy"] for a in at] if s <= last else []
        final = [final_greedy(run) for run in rs.values()]
        corr = (f"{statistics.correlation(rise, final):+.2f}"
                if len(rise) >= 5 and len(set(rise)) > 1 else "-")
        rows.append([cfg, describe(next(iter(rs.values()))), len(rs),
                     paired(delay) if seeds else "-",
                     mean_se(per_step("internal/cos_to_top", 1, s), "{:+.5f}"),
                     mean_se(per_step("internal/cos_to_top", s + 1, after + 1), "{:+.5f}"),
                     mean_se(rise, "{:+.2f}"), corr])
    return table(["config", "algorithm", "seeds", "train reward, the 10 steps after phase 1 − "
                  "GRPO's first 10", "Δcos(h_l, h_L) per step, phase 1",
                  "Δcos per step, as many steps after", "H(π_θ) step s − step 1",
                  "corr(that rise, final greedy), 5 seeds or more"], rows)


PHASE1_KEYS = ("grad_norm", "kl", "clip_ratio/low", "clip_ratio/high", "internal/entropy",
               "internal/kl_to_policy", "internal/cos_to_top", "entropy")


def phase1_table(configs: dict, names: list) -> str:
    """The dose plan's mechanism readouts: per configuration, each phase-1 metric averaged over the
    phase-1 steps of a run, then mean ± SE over its seeds (grad_norm: the norm before clipping)."""
    rows = []
    for cfg in names:
        rs = list(configs.get(cfg, {}).values())
        if not rs:
            continue
        s = rs[0]["args"]["internal_steps"]
        per_run = lambda key: [statistics.mean(r[key] for r in steps(run) if r["step"] <= s)  # noqa: E731
                               for run in rs]
        rows.append([cfg, len(rs), *(mean_se(per_run(k), "{:.3g}") for k in PHASE1_KEYS)])
    return table(["config", "seeds", *PHASE1_KEYS], rows)


def mean_se(xs: list[float], fmt="{:.3f}") -> str:
    """mean ± standard error over seeds (sample std / sqrt(n)); one seed: the value alone."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    se = statistics.stdev(xs) / len(xs) ** 0.5
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(se).lstrip('+')}"


def t_interval(xs: list[float], level: int = 95) -> tuple[float, float, float]:
    """The mean of 2 or more paired differences and its two-sided t interval at `level`% (95, or
    90: the two one-sided 5% tests of equivalence): (mean, low, high)."""
    t = t95(len(xs) - 1) if level == 95 else T90.get(len(xs) - 1, 1.645)
    m, h = statistics.mean(xs), t * statistics.stdev(xs) / len(xs) ** 0.5
    return m, m - h, m + h


def paired(xs: list[float], fmt="{:+.3f}") -> str:
    """The mean of paired differences and its 95% t interval."""
    if len(xs) < 2:
        return fmt.format(xs[0]) + " (one seed)" if xs else "-"
    m, lo, hi = t_interval(xs)
    return f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


# -----------------------------------------------------------------------------
# training

def by_config(train: dict) -> dict:
    """{config: {seed: run}}: GRPO, then the main BuPO arm, then the others by name (numbers in
    order)."""
    configs = {}
    for name, r in train.items():
        configs.setdefault(config_of(name), {})[r["args"]["seed"]] = r
    key = lambda c: ({"grpo": 0, "bupo": 1}.get(c, 2),  # noqa: E731
                     [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", c)])
    return {c: dict(sorted(configs[c].items())) for c in sorted(configs, key=key)}


def describe(run: dict) -> str:
    args = run["args"]
    if args["algo"] == "grpo":
        return "GRPO"
    layer = next((r["policy_layer"] for r in run["rows"] if r.get("phase") == "internal"),
                 args["internal_layer"])
    auto = " (auto)" if args["internal_layer"] == "auto" else ""
    return f"BuPO l={layer}{auto}, s_inter={args['internal_steps']}"


def evals(run: dict) -> list[dict]:
    return [r for r in run["rows"] if "eval/greedy_acc" in r]


def steps(run: dict) -> list[dict]:
    return [r for r in run["rows"] if "reward" in r]


# steps in a row at zero train reward: every group all wrong, so GRPO's advantages (and update) are
# 0
STALL = 3


def zero_stretch(run: dict) -> int:
    """The longest stretch of consecutive steps whose train reward is 0."""
    longest = current = 0
    for r in steps(run):
        current = current + 1 if r["reward"] == 0 else 0
        longest = max(longest, current)
    return longest


def avg_key(run: dict) -> str:
    return f"eval/avg@{run['args']['eval_samples']}"


def eval_table(configs: dict) -> str:
    rows = []
    for cfg, runs in configs.items():
        rs = list(runs.values())
        first, last = [evals(r)[0] for r in rs], [evals(r)[-1] for r in rs]
        k = avg_key(rs[0])
        wall = [wall_minutes(run) for run in rs]
        reward = [statistics.mean(r["reward"] for r in steps(run)) for run in rs]
        peak = max(r["peak_memory_mb"] for run in rs for r in steps(run)) / 1024
        rows.append([cfg, describe(rs[0]), len(rs), mean_se([e["eval/greedy_acc"] for e in first]),
                     mean_se([e["eval/greedy_acc"] for e in last]), mean_se([e[k] for e in first]),
                     mean_se([e[k] for e in last]), mean_se(reward),
                     sum(zero_stretch(run) >= STALL for run in rs),
                     mean_se(wall, "{:.0f}"), f"{peak:.1f}"])
    k = avg_key(next(iter(next(iter(configs.values())).values())))
    return table(["config", "algorithm", "seeds", "greedy before", "greedy after",
                  f"{k[5:]} before", f"{k[5:]} after", "train reward, mean over steps",
                  f"runs stalled ({STALL}+ steps at reward 0)", "minutes per run",
                  "peak memory GiB"], rows)


def wall_minutes(run: dict) -> float:
    """A run's wall time: its steps and its evaluations (what it cost, pauses and CPU sharing
    included)."""
    seconds = (sum(r["step_time"] for r in steps(run))
               + sum(e.get("eval_time", 0) for e in evals(run)))
    return seconds / 60


def runs_table(configs: dict) -> str:
    """Every run on its own line: held-out accuracy at each evaluation, wall time and peak
    memory."""
    rows = []
    for cfg, runs in configs.items():
        for seed, run in runs.items():
            ev, k = evals(run), avg_key(run)
            peak = max(r["peak_memory_mb"] for r in steps(run)) / 1024
            rows.append([f"{cfg}-s{seed}", describe(run), seed,
                         " / ".join(f"{e['eval/greedy_acc']:.3f}" for e in ev),
                         " / ".join(f"{e[k]:.3f}" for e in ev),
                         " / ".join(str(e["step"]) for e in ev),
                         f"{statistics.mean(r['reward'] for r in steps(run)):.3f}",
                         zero_stretch(run), f"{wall_minutes(run):.0f}", f"{peak:.1f}"])
    return table(["run", "algorithm", "seed", "greedy accuracy", "avg@n", "at steps",
                  "train reward, mean",
                  "longest stretch at reward 0 (steps)", "wall minutes", "peak memory GiB"], rows)


def paired_table(configs: dict, base: str, only: list | None = None) -> str:
    """Each configuration (or each of `only`) against `base` on the seeds both have: the difference
    of the final held-out accuracies (the same start and the same held-out problems within a seed,
    so it is also the difference of the gains)."""
    rows = []
    for cfg, runs in configs.items():
        seeds = sorted(set(runs) & set(configs.get(base, {})))
        if cfg == base or not seeds or (only is not None and cfg not in only):
            continue
        k = avg_key(runs[seeds[0]])
        d = {m: [evals(runs[s])[-1][m] - evals(configs[base][s])[-1][m] for s in seeds]
             for m in ("eval/greedy_acc", k)}
        wins = sum(x > 0 for x in d["eval/greedy_acc"]), sum(x < 0 for x in d["eval/greedy_acc"])
        rows.append([f"{cfg} − {base}", ", ".join(map(str, seeds)), paired(d["eval/greedy_acc"]),
                     paired(d[k]),
                     f"{wins[0]} / {wins[1]}"])
    return table(["difference", "seeds", "greedy accuracy after, 95% interval",
                  "avg@n after, 95% interval",
                  "seeds better / worse"], rows)


def window_reward(runs: list, first: int, last: int) -> list[float]:
    """Per run, the mean train reward of steps first..last."""
    return [statistics.mean(r["reward"] for r in steps(run) if first <= r["step"] <= last)
            for run in runs]


def internal_table(configs: dict) -> str:
    """Phase 1 of the BuPO configurations: the entropies and the KL of the last phase-1 step and the
    step after, and the train reward during phase 1 and over the 5 steps after the switch, next to
    GRPO's on the same steps and seeds (a phase 1 that harms the policy shows as a reward that falls
    behind GRPO's and stays behind)."""
    rows = []
    for cfg, runs in configs.items():
        rs = [r for r in runs.values() if r["args"]["algo"] == "bupo"]
        if not rs:
            continue
        s = rs[0]["args"]["internal_steps"]
        at = lambda step, key: mean_se([r[key] for run in rs for r in steps(run)
                                        if r["step"] == step], "{:.2f}")  # noqa: E731
        grpo = [configs["grpo"][seed] for seed in runs if seed in configs.get("grpo", {})]

        def reward(first, last):
            # the runs with steps there: a run all of whose steps are phase 1 has none after it
            have = lambda runs: [run for run in runs  # noqa: E731
                                 if any(first <= r["step"] <= last for r in steps(run))]
            mine, theirs = have(rs), have(grpo)
            if not mine:
                return "-"
            text = mean_se(window_reward(mine, first, last), "{:.2f}")
            return text + (f" (GRPO {statistics.mean(window_reward(theirs, first, last)):.2f})"
                           if theirs else "")
        rows.append([cfg, describe(rs[0]), len(rs), at(1, "entropy"), at(s, "entropy"),
                     at(s + 1, "entropy"), at(1, "internal/entropy"), at(s, "internal/entropy"),
                     at(1, "internal/kl_to_policy"), at(s, "internal/kl_to_policy"),
                     at(s + 1, "internal/kl_to_policy"), reward(1, s), reward(s + 1, s + 5)])
    return table(["config", "algorithm", "seeds", "H(π_θ) step 1", "H(π_θ) step s_inter",
                  "H(π_θ) step s_inter+1", "H(π^l) step 1", "H(π^l) step s_inter",
                  "KL(π^l‖π_θ) step 1", "KL step s_inter", "KL step s_inter+1",
                  "train reward, phase 1", "train reward, 5 steps after"], rows)


def cost_table(configs: dict) -> str:
    rows = []
    for cfg, runs in configs.items():
        tr = [r for run in runs.values() for r in steps(run)]
        for phase in ("internal", "full"):
            rs = [r for r in tr if r["phase"] == phase]
            if rs:
                rows.append([cfg, phase, len(rs), mean_se([r["step_time"] for r in rs], "{:.0f}"),
                             mean_se([r["tokens_per_s"] for r in rs], "{:.1f}"),
                             f"{max(r['peak_memory_mb'] for r in rs):.0f}"])
    return table(["config", "phase", "steps", "s/step", "response tokens/s", "peak memory MiB"],
                 rows)


def series(runs: dict, key: str):
    """(steps, mean, standard error) over seeds of a per-step metric."""
    at = {}
    for run in runs.values():
        for r in run["rows"]:
            if key in r:
                at.setdefault(r["step"], []).append(r[key])
    xs = sorted(at)
    se = [statistics.stdev(at[x]) / len(at[x]) ** 0.5 if len(at[x]) > 1 else 0.0 for x in xs]
    return xs, [statistics.mean(at[x]) for x in xs], se


def band(ax, runs, key, label, **kw):
    """A mean line with a ±1 standard-error band over seeds."""
    xs, mu, se = series(runs, key)
    if not xs:
        return None
    line, = ax.plot(xs, mu, label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})", **kw)
    ax.fill_between(xs, [m - e for m, e in zip(mu, se)], [m + e for m, e in zip(mu, se)],
                    color=line.get_color(),
                    alpha=0.15, lw=0)
    return line


def on_shared_seeds(configs: dict, names: list) -> tuple[dict, str]:
    """The named configurations, each cut to the seeds they all have, so that their curves average
    the same prompts and held-out draws (paired), and a note of those seeds; when they share none,
    each keeps its own."""
    shown = [c for c in names if c in configs]
    common = set.intersection(*(set(configs[c]) for c in shown)) if shown else set()
    if not common:
        return {c: configs[c] for c in shown}, "each one's own seeds (unpaired; n in the legend)"
    return ({c: {k: v for k, v in configs[c].items() if k in common} for c in shown},
            f"{len(common)} seed{'s' * (len(common) > 1)} ({seed_ranges(common)})")


def seed_ranges(seeds) -> str:
    """Seeds as runs of consecutive numbers: {0, 1, 2, 3, 5} -> '0-3, 5'."""
    out, run = [], []
    for s in sorted(seeds):
        if run and s != run[-1] + 1:
            out.append(run)
            run = []
        run.append(s)
    out += [run] if run else []
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in out)


def plot_training(configs: dict, names: list, out: Path, plt, file: str):
    """Train reward and held-out greedy accuracy of the named configurations, mean ± standard error
    over the seeds they all have (on_shared_seeds)."""
    shown, seeds = on_shared_seeds(configs, names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for cfg, runs in shown.items():
        label = f"{cfg}: {describe(next(iter(runs.values())))}"
        line = band(axes[0], runs, "reward", label, lw=1)
        band(axes[1], runs, "eval/greedy_acc", label, marker="o", color=line.get_color())
    axes[0].set(xlabel="RL step", ylabel="train reward (fraction correct, T = 1)",
                title=f"train reward: mean, band ±1 SE over {seeds}")
    axes[1].set(xlabel="RL step", ylabel="held-out greedy accuracy",
                title=f"held-out greedy accuracy: mean, band ±1 SE over {seeds}")
    for ax in axes:
        ax.legend(fontsize=7)
    write_atomic(out / file,
                 lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_dynamics(configs: dict, names: list, out: Path, plt):
    """Paper Fig. 7: H(pi_theta), H(pi^l) and KL(pi^l || pi_theta) per step, across the switch at
    s_inter."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.8))
    for cfg in (c for c in names if c in configs):
        run0 = next(iter(configs[cfg].values()))
        line = band(axes[0], configs[cfg], "entropy", f"{cfg}: {describe(run0)}")
        if run0["args"]["algo"] == "bupo":
            c = line.get_color()
            band(axes[1], configs[cfg], "internal/entropy", cfg, color=c)
            band(axes[2], configs[cfg], "internal/kl_to_policy", cfg, color=c)
            for ax in axes:     # the switch from pi^l to pi_theta, after step s_inter
                ax.axvline(run0["args"]["internal_steps"] + 0.5, color=c, ls=":", lw=0.8)
    axes[0].set(xlabel="RL step", ylabel="nats",
                title="H(π_θ), the policy's entropy on its samples")
    axes[1].set(xlabel="RL step", ylabel="nats", title="H(π^l), the internal policy's entropy")
    axes[2].set(xlabel="RL step", ylabel="nats", title="KL(π^l ‖ π_θ)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.text(0.5, -0.06, "Lines: the mean over each configuration's own seeds (n in the legend: "
             "the arms differ in n); bands: ±1 standard error over those n seeds; dotted lines, "
             "in each BuPO configuration's colour: its switch from π^l to π_θ after step s_inter.",
             ha="center", fontsize=8)
    write_atomic(out / "dynamics.png",
                 lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


# -----------------------------------------------------------------------------
# what a run changed, layer by layer (analyze.py --against; run.sh's dose-changes and qwen groups)

def changes_groups(changes: dict) -> dict:
    """{(configuration, step): [changes.json of each seed]}: the run is the checkpoint's
    OUT/checkpoints/step_N, its configuration the run's name without its seed."""
    groups = {}
    for c in changes.values():
        run = Path(c["trained"]).parts[-3]
        groups.setdefault((config_of(run), c["run"].get("step")), []).append(c)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)))


def changes_table(groups: dict) -> str:
    """Per configuration and checkpoint, means ± SE over seeds: at the trained layer l,
    KL(pi^l_base || pi^l_trained), the change of H(pi^l) and of cos(h_l, h_L), and that of cos(h_k,
    h_L) averaged over the layers k below l (the paper's feature refinement); the policy's KL to
    the base's (layer L); the mean relative weight change of the blocks up to l and above it
    (phase 1 touches nothing above l: 0 there), and of the unembedding."""
    rows = []
    for (cfg, step), cs in groups.items():
        L, run = cs[0]["num_layers"], cs[0]["run"]
        l = run.get("internal_layer") or L
        at = lambda key, layer: mean_se([c["layers"][layer - 1][key] for c in cs], "{:.3g}")  # noqa: E731

        def blocks(keep):
            return mean_se([statistics.mean(r["attn"] + r["mlp"] for r in c["layers"]
                                            if keep(r["layer"])) / 2 for c in cs], "{:.2e}")
        below = mean_se([statistics.mean(r["dcos"] for r in c["layers"] if r["layer"] < l)
                         for c in cs], "{:.3g}")
        rows.append([cfg, step, len(cs), l, at("kl", l), at("dH", l), at("dcos", l), below,
                     at("kl", L),
                     blocks(lambda x: x <= l),
                     blocks(lambda x: x > l) if l < L else "-",
                     mean_se([c["unembedding"] for c in cs], "{:.2e}")])
    return table(["config", "checkpoint step", "seeds", "l", "KL(π^l_base‖π^l) at l",
                  "ΔH(π^l) at l", "Δcos(h_l, h_L) at l", "Δcos(h_k, h_L), mean of k < l",
                  "KL(π_base‖π_θ)",
                  "‖ΔW‖/‖W‖, blocks ≤ l", "blocks > l", "unembedding"], rows)


def plot_changes(groups: dict, out: Path, plt, file: str):
    """The per-layer report of each group, mean over seeds: KL(pi^l_base || pi^l_trained), the
    change of cos(h_l, h_L), and the relative weight change of each block (attention + MLP, half
    each); a dotted line at each BuPO configuration's l."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.8))
    for (cfg, step), cs in groups.items():
        L, run = cs[0]["num_layers"], cs[0]["run"]
        xs = list(range(1, L + 1))
        mean = lambda f: [statistics.mean(f(c["layers"][i]) for c in cs) for i in range(L)]  # noqa: E731
        line, = axes[0].plot(xs, mean(lambda r: r["kl"]), label=f"{cfg}, step {step} (n={len(cs)})")
        axes[1].plot(xs, mean(lambda r: r["dcos"]), color=line.get_color())
        axes[2].plot(xs, mean(lambda r: (r["attn"] + r["mlp"]) / 2), color=line.get_color())
        if run.get("algo") == "bupo" and (run.get("internal_layer") or L) < L:
            for ax in axes:
                ax.axvline(run["internal_layer"], color=line.get_color(), ls=":", lw=0.8)
    axes[0].set(xlabel="layer l", ylabel="nats", title="KL(π^l_base ‖ π^l_trained)")
    axes[1].set(xlabel="layer l", title="Δcos(h_l, h_L), trained − base")
    axes[2].set(xlabel="layer l", title="‖ΔW‖ / ‖W‖ of block l")
    axes[0].set_yscale("symlog", linthresh=1e-3)     # 0 above l stays on the axis
    axes[2].set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.text(0.5, -0.06, "On the base model's own answers; lines: means over seeds; dotted: each "
             "BuPO configuration's l (phase 1 changes nothing above it).", ha="center", fontsize=8)
    write_atomic(out / file, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight",
                                                      format="png"))
    plt.close(fig)


# experiments/PLAN.md (a): phase 1 in the paper's regime, Qwen2.5-Coder-0.5B; its arms and the
# rules decided before its runs
QWEN_ARMS, QWEN_SEEDS = ("qwen-grpo", "qwen-auto", "qwen-l12"), (30, 31)
QWEN_KEYS = ("grad_norm", "kl", "clip_ratio/low", "clip_ratio/high", "internal/entropy",
             "internal/kl_to_policy", "internal/cos_to_top", "entropy", "reward")


def qwen_steps_table(configs: dict) -> str:
    """Per arm and step, each readout of the plan: the mean over seeds, then each seed's value."""
    rows = []
    for arm in QWEN_ARMS:
        for step in range(1, 9):
            vals = {k: [r[k] for run in configs.get(arm, {}).values() for r in steps(run)
                        if r["step"] == step and k in r] for k in QWEN_KEYS}
            if vals["reward"]:
                rows.append([arm, step, *(f"{statistics.mean(v):.3g} ("
                                          + ", ".join(f"{x:.3g}" for x in v) + ")"
                                          if v else "-" for v in vals.values())])
    return table(["arm", "step", *QWEN_KEYS], rows)


def qwen_verdicts(configs: dict, changes: dict) -> str:
    """experiments/PLAN.md (a)'s rules: the clip bounds pi^l's change when, in both BuPO arms, the
    median over steps 2-8 (all seeds) of ppo-kl is at most 3x GRPO's and of the pre-clip grad norm
    at most 10x; phase 1 refines the features at l when Δcos(h_l, h_L) at l (the per-layer
    report) is larger in the BuPO arm than in GRPO's, on every seed; a BuPO arm's block above l
    that changed is a bug. Accuracy is reported, not judged."""
    if not all(configs.get(a) for a in QWEN_ARMS):
        return "Not all three arms have a finished run yet."

    def median(arm, key):
        return statistics.median(r[key] for run in configs[arm].values() for r in steps(run)
                                 if 2 <= r["step"] <= 8)
    def times(x, base):      # ppo-kl is an estimate and can be 0 or negative: no ratio then
        return f"{x / base:.2g}x" if base > 0 and x > 0 else "no ratio to"
    # the rules judge both seeds of every arm; before that the numbers are shown, not judged
    complete = all(set(QWEN_SEEDS) <= set(configs[a]) for a in QWEN_ARMS)

    def verdict(text, ready=True):
        return (text if complete and ready else "interim, no verdict until both seeds of every "
                "arm have run and have their per-layer reports")
    by_run = {Path(c["trained"]).parts[-3]: c for c in changes.values()}
    lines = []
    kl_g, gn_g = median("qwen-grpo", "kl"), median("qwen-grpo", "grad_norm")
    for arm in QWEN_ARMS[1:]:
        kl, gn = median(arm, "kl"), median(arm, "grad_norm")
        # "at most 3x GRPO's", compared as written: with GRPO's median at or below 0, a
        # positive median is outside (a ratio would flip its sign)
        lines.append(f"{arm}: median ppo-kl over steps 2-8 {kl:.3g} ({times(kl, kl_g)} GRPO's "
                     f"{kl_g:.3g}), median pre-clip grad norm {gn:.3g} ({times(gn, gn_g)} GRPO's "
                     f"{gn_g:.3g}): "
                     + verdict(("within" if kl <= 3 * kl_g and gn <= 10 * gn_g else "outside")
                               + " the plan's bounds (3x, 10x)") + ".")
        dcos, above = [], []
        for seed in sorted(configs[arm]):
            b, g = by_run.get(f"{arm}-s{seed}"), by_run.get(f"qwen-grpo-s{seed}")
            if b is None or g is None:
                continue
            l = b["run"]["internal_layer"]
            dcos.append((seed, l, b["layers"][l - 1]["dcos"], g["layers"][l - 1]["dcos"]))
            above += [r["layer"] for r in b["layers"] if r["layer"] > l and r["attn"] + r["mlp"]]
        if dcos:
            ready = len(dcos) == len(configs[arm])       # every seed's pair of reports
            refines = all(x > y for _, _, x, y in dcos)
            lines.append(f"{arm}: Δcos(h_l, h_L) at l, BuPO against GRPO: "
                         + "; ".join(f"seed {s} (l = {l}) {x:+.4f} against {y:+.4f}"
                                     for s, l, x, y in dcos)
                         + ". " + verdict("Phase 1 refines the features at l: larger on every "
                                          "seed" if refines else "Not seen at these seeds",
                                          ready) + ".")
            lines.append(f"{arm}: blocks above l that changed: "
                         + (", ".join(map(str, sorted(set(above)))) + " (a bug)" if above
                            else "none"))
    acc = [f"{arm} " + ", ".join(f"seed {s}: " + " -> ".join(
        f"{r['eval/greedy_acc']:.3f}" for r in evals(run)) for s, run in configs[arm].items())
        for arm in QWEN_ARMS]
    lines.append("Held-out greedy accuracy, steps 0 -> 8 (reported, not judged): "
                 + "; ".join(acc) + ".")
    return "\n\n".join(lines)


# -----------------------------------------------------------------------------

def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/exp", help="the folder experiments/run.sh writes into")
    p.add_argument("--out", default="experiments/results",
                   help="where the tables, plots and copies go")
    p.add_argument("--cost", default=None,
                   help="a folder of experiments/cost.sh: write OUT/cost.md only")
    args = p.parse_args(argv)
    if args.cost and not Path(args.cost).is_dir():
        raise UserError(f"--cost {args.cost}: no such folder; run bash experiments/cost.sh first, "
                        f"or pass its folder")
    if not args.cost and not Path(args.runs).is_dir():
        raise UserError(f"--runs {args.runs}: no such folder; run bash experiments/run.sh first, "
                        f"or pass its folder")
    check_writable_dir(args.out)
    if args.cost:
        runs = {k: {v["args"]["seed"]: v} for k, v in read_runs(Path(args.cost)).items()
                if "rows" in v}
        text = "### Cost of one step, measured alone\n\n" + cost_table(runs) + "\n"
        write_atomic(Path(args.out) / "cost.md", lambda tmp: tmp.write_text(text))
        for name in runs:
            (Path(args.out) / "cost" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(args.cost) / name / "metrics.jsonl",
                        Path(args.out) / "cost" / name / "metrics.jsonl")
        print(text)
        return
    root, out = Path(args.runs), Path(args.out)
    runs = read_runs(root)
    if not runs:
        raise UserError(f"--runs {args.runs}: holds no run or analysis of experiments/run.sh (no "
                        f"*/metrics.jsonl, */entropy.json or */changes.json); pass the folder it "
                        f"writes into")
    flows = {k: v["flow"] for k, v in runs.items() if "flow" in v}
    changed = {k: v["changes"] for k, v in runs.items() if "changes" in v}
    train = {k: v for k, v in runs.items() if "rows" in v and v["done"] and evals(v)}
    unfinished = sorted(k for k, v in runs.items() if "rows" in v and not v["done"])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = []
    if flows:
        plot_flow(flows, out, plt)
        parts += ["### Entropy flow", flow_table(flows)]
    if train:
        configs = by_config(train)
        main_arms = ["grpo", "bupo"]
        layers = sorted((c for c in configs if re.fullmatch(r"bupo-l\d+", c)),
                        key=lambda c: int(c[6:]))
        inter = [c for c in configs if "-inter" in c]
        # the s_inter sweep's own points 0 (GRPO) and 4 (the layer sweep's run at the same layer)
        inter_base = sorted({c.split("-inter")[0] for c in inter} & set(configs))
        plot_training(configs, main_arms, out, plt, "training.png")
        plot_training(configs, main_arms + layers, out, plt, "layers.png")
        plot_training(configs, ["grpo"] + inter_base + inter, out, plt, "inter.png")
        plot_dynamics(configs, main_arms + layers + inter, out, plt)
        parts += ["### Held-out accuracy before and after training (mean ± standard error over "
                  "seeds)",
                  eval_table(configs),
                  "### experiments/PLAN.md: BuPO − GRPO over 20 paired seeds",
                  plan_verdict(configs),
                  "Each pair (`*`: its args.json records `clean: false`; docs/experiments.md says "
                  "why):",
                  plan_pairs_table(configs),
                  "Secondary endpoints (the plan: reported with their intervals, no verdict):",
                  plan_secondary(configs),
                  "### Against GRPO, paired by seed (mean difference and its 95% t interval)",
                  paired_table(configs, "grpo"),
                  "### Against the main BuPO arm (the penultimate layer), paired by seed",
                  paired_table(configs, "bupo"),
                  *(part for b in inter_base for part in (
                      f"### A longer phase 1 against s_inter = 4 at the same layer ({b}), paired "
                      f"by seed",
                      paired_table(configs, b,
                                   only=[c for c in inter if c.startswith(b + "-inter")]))),
                  "### Phase 1 and the switch (paper Fig. 7), mean ± standard error",
                  internal_table(configs),
                  "### What phase 1 did, from the logs (mean ± standard error; paired 95% "
                  "intervals)",
                  mechanism_table(configs),
                  "### experiments/PLAN.md: phase 1's dose at l = 29", dose_verdict(configs),
                  "Phase 1 of each dose arm (each metric's mean over the phase-1 steps of a run; "
                  "mean ± standard error over seeds):",
                  phase1_table(configs, [f"bupo-dose{s}" for s in (4, 10, 20)]),
                  "### Cost (one thread per run, two runs at a time)", cost_table(configs),
                  "### Every run (wall time: its steps and evaluations, CPU sharing included; peak "
                  "memory: the process's peak RSS)", runs_table(configs)]
    if train and any(c in configs for c in QWEN_ARMS):
        parts += ["### experiments/PLAN.md (a): phase 1 on Qwen2.5-Coder-0.5B",
                  qwen_verdicts(configs, changed),
                  "Every readout per arm and step: the mean over seeds (each seed's value):",
                  qwen_steps_table(configs)]
    for prefix, file in (("bupo-dose", "changes-dose.png"), ("qwen", "changes-qwen.png")):
        groups = {k: v for k, v in changes_groups(changed).items() if k[0].startswith(prefix)}
        if groups:
            plot_changes(groups, out, plt, file)
            parts += [f"### What training changed, layer by layer ({file})", changes_table(groups)]
    if unfinished:
        parts.append(f"Not finished, left out: {', '.join(unfinished)}")
    text = "\n\n".join(parts) + "\n"
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(text))
    for name in list(flows) + list(train) + list(changed):
        (out / "runs" / name).mkdir(parents=True, exist_ok=True)
        for f in COPY:
            src, dst = root / name / f, out / "runs" / name / f
            if src.exists() and not (dst.exists() and src.samefile(dst)):
                # --runs may be OUT/runs itself
                shutil.copy(src, dst)
    print(text)
    print(f"wrote {out / 'results.md'}, the plots and {out / 'runs'}/")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
