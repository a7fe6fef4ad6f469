"""
The plots of the tools' outputs: curves.png of a training run (train.py, from its metrics.jsonl)
and flow.png, dH.png and heatmap.png of an entropy-flow analysis (analyze.py; the paper's Figs. 2
and 3). matplotlib is imported only when a plot is drawn; every file is written atomically.
"""
from pathlib import Path

import torch

from infra.files import write_atomic


def pyplot():
    """matplotlib.pyplot without a display (the Agg backend), imported on the first plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curves(rows: list[dict], path: Path, title: str):
    """curves.png (path) from the rows of a run's metrics.jsonl: reward and held-out accuracy,
    entropies, response length, and (BuPO) how far pi^l is from the policy; one panel per quantity,
    each with its own labelled axis, phase 1 shaded."""
    plt = pyplot()
    train = [r for r in rows if "reward" in r]
    # one line per benchmark: eval/avg@n of the task, eval/<name>/avg@n of each --eval-data file
    accuracy = sorted({k for r in rows for k in r if k.startswith("eval/")
                       and (k.split("/")[-1].startswith("avg@") or k.endswith("/greedy_acc"))})
    panels = [("reward / accuracy (fraction)",
               ["reward", "eval/greedy_acc"] + [k for k in accuracy if k != "eval/greedy_acc"]),
              ("entropy (nats)", ["entropy", "internal/entropy"]),
              ("response length (tokens)", ["completions/mean_length"]),
              ("KL(pi^l || pi_theta) (nats)", ["internal/kl_to_policy"]),
              ("cos(h_l, h_L)", ["internal/cos_to_top"])]
    panels = [(label, keys) for label, keys in panels if any(k in r for r in rows for k in keys)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    internal = [r["step"] for r in train if r.get("phase") == "internal"]
    for ax, (label, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=k)
        if internal:
            ax.axvspan(min(internal) - 0.5, max(internal) + 0.5, color="orange", alpha=0.15,
                       label="phase 1 (pi^l)")
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def flow(result: dict, heat: dict | None, out: Path, tokenizer, other: dict | None = None):
    """OUT/flow.png (Fig. 2: the entropy of each internal policy along the depth), dH.png (Fig. 3:
    the mean entropy change of each attention and FFN module) and heatmap.png (the layers x
    positions of one response) of an analysis `result` (entropy.json), `other` overlaid."""
    import warnings
    plt = pyplot()
    # tokens in scripts the font lacks
    warnings.filterwarnings("ignore", message="Glyph .* missing from")
    runs = [result] + ([other] if other else [])
    # align depths of different models
    relative = other is not None and other["num_layers"] != result["num_layers"]

    def xs(run, offset=0.0):
        L = run["num_layers"]
        return [(r["layer"] - 1 + offset) / (L if relative else 1) for r in run["layers"]]

    def save(fig, name):
        write_atomic(out / name,
                           lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
        plt.close(fig)

    # Fig. 2: the entropy of each internal policy along the depth, one line per kind of policy
    fig, ax = plt.subplots(figsize=(11, 4.5))
    policies = (("H_attn", 1 / 3, "s", "attention write a_l"),
                ("H_mlp", 2 / 3, "^", "FFN write f_l"),
                ("H_resid", 1.0, "o", "layer output h_l"))
    for i, run in enumerate(runs):
        for j, (key, offset, marker, name) in enumerate(policies):
            # one colour per policy, or per model
            color = f"C{j}" if len(runs) == 1 else ("C0", "C3")[i]
            ax.plot(xs(run, offset), [r[key] for r in run["layers"]], marker=marker, ms=4,
                    color=color,
                    lw=1.8 if key == "H_resid" else 0.8, ls="-" if key == "H_resid" else ":",
                    label=f"{name} ({run['model']})")
    ax.set_xlabel("relative depth" if relative
                  else "layer l (attention, then FFN, then the layer's output)")
    ax.set_ylabel("entropy of softmax(W_U x) (nats)")
    ax.set_title(f"Entropy flow of the internal policies (norm={result['norm']}; layer L is the "
                 f"model's policy)")
    ax.legend(fontsize=7, ncol=len(runs))
    save(fig, "flow.png")

    # Fig. 3: mean entropy change of attention (eq. 12) and FFN (eq. 13) per layer
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        for ax, key, name in ((axes[0], "dH_attn", "attention"), (axes[1], "dH_mlp", "FFN")):
            x = [v + (i - (len(runs) - 1) / 2) * width / (run["num_layers"] if relative else 1)
                 for v in xs(run, 1)]
            ax.bar(x, [r[key] for r in run["layers"]],
                   width=width / (run["num_layers"] if relative else 1),
                   label=run["model"])
            ax.axhline(0, color="k", lw=0.5)
            ax.set_ylabel(f"dH {name} (nats)")
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("relative depth" if relative else "layer l")
    fig.suptitle("Mean entropy change per layer: > 0 widens the distribution, < 0 sharpens it")
    save(fig, "dH.png")

    if heat:  # layers x positions of one response, with the top-1 token of each cell
        def show(ids):
            return tokenizer.decode(ids, skip_special_tokens=False).strip().replace("\n", "\\n")
        H = torch.tensor(heat["entropy"])
        fig, ax = plt.subplots(figsize=(max(8, 0.62 * H.shape[1]), max(5, 0.27 * H.shape[0])))
        im = ax.imshow(H, aspect="auto", origin="lower", cmap="viridis")
        for l, row in enumerate(heat["top1"]):
            for t, tok_id in enumerate(row):
                ax.text(t, l, show([tok_id])[:5], ha="center", va="center", fontsize=6.5,
                        color="w" if H[l, t] < H.max() * 0.6 else "k")
        ax.set_xticks(range(len(heat["targets"])))
        ax.set_xticklabels([show([t])[:8] for t in heat["targets"]], rotation=90, fontsize=8)
        ax.set_xlabel("the response token each position predicts (cell text: the layer's top-1 "
                      "token)")
        ax.set_ylabel("layer l (h_l; the top row is the model's policy)")
        # the end of the user turn
        question = " ".join(tokenizer.decode(heat.get("prompt", [])).split())[-90:]
        ax.set_title(f"Entropy of softmax(W_U h_l) on response 0, first {H.shape[1]} "
                     f"tokens\nprompt: '...{question}'",
                     fontsize=9)
        fig.colorbar(im, label="entropy (nats)")
        save(fig, "heatmap.png")


def changes(result: dict, path: Path):
    """changes.png: what training changed, layer by layer (analyze.py --against), on one figure:
    the layer policies' KL to their base, their entropy and distance to the policy, the feature
    alignment cos(h_l, h_L), and the blocks' relative weight change; BuPO's l dotted."""
    plt = pyplot()
    rows = result["layers"]
    x = [r["layer"] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    axes[0].plot(x, [r["kl"] for r in rows], "o-", ms=3)
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[0].set_ylabel("KL(pi^l base || trained)")
    axes[1].plot(x, [r["dH"] for r in rows], "o-", ms=3, label="change of H(pi^l)")
    axes[1].plot(x, [r["dKL_policy"] for r in rows], "s-", ms=3,
                 label="change of KL(pi^l || pi_theta)")
    axes[1].set_ylabel("nats")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [r["dcos"] for r in rows], "o-", ms=3)
    axes[2].set_ylabel("change of cos(h_l, h_L)")
    axes[3].plot(x, [r["attn"] for r in rows], "o-", ms=3, label="attention")
    axes[3].plot(x, [r["mlp"] for r in rows], "s-", ms=3, label="MLP")
    axes[3].set_ylabel("|dW| / |W|")
    axes[3].set_xlabel("layer l")
    axes[3].legend(fontsize=8)
    run = result.get("run") or {}
    if run.get("algo") == "bupo":
        for ax in axes:
            ax.axvline(run["internal_layer"], color="k", ls=":", lw=1)
    for ax in axes:
        ax.axhline(0, color="k", lw=0.5)
    fig.suptitle(f"What training changed: {result['base']} -> {Path(result['trained']).name} "
                 f"({result['num_tokens']} tokens of the base model's answers)"
                 + (f"; dotted: BuPO's l = {run['internal_layer']}" if run.get("algo") == "bupo"
                    else ""), fontsize=9)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
