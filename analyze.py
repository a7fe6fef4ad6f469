"""
Entropy flow of a model's internal policies on its own responses (paper section 2, Figs. 2
and 3).

    python analyze.py --out runs/analysis        # default model, 16 generated word problems
    python analyze.py --model DIR --out OUT --responses answers.jsonl
    python analyze.py --model DIR --out OUT --compare runs/analysis/entropy.json

1. The model answers N prompts of a task (chat template, T = 1, seeded), or responses are
   read from a JSONL file, one record per line: {"prompt_ids": [...], "response_ids":
   [...]} or {"prompt": "...", "response": "..."} (a text prompt is the user message,
   rendered with the model's chat template; the response is encoded as is).
2. One forward pass over each prompt + response records the residual stream; every tensor
   of it is projected with W_U (no norm, unless --norm final) at the positions that
   predict response tokens, and reduced to its entropy over the full vocabulary
   (bupo.entropy_flow).
3. Means pooled over all tokens of all responses, as the authors do, go to
   OUT/entropy.json; the plots flow.png (Fig. 2), dH.png (Fig. 3) and heatmap.png (one
   response, layers x positions, top-1 token per cell) go beside it, and a table is
   printed.
Each layer also gets KL_resid, the mean KL(pi^l || pi_theta) of its policy to the model's
(bupo.kl_flow). `boundary_layer` is the last layer with mean dH_mlp > 0 (null when none);
`internal_layer` is what `train.py --internal-layer auto` uses: the boundary layer when it
is below L, else the penultimate layer (bupo.choose_internal_layer).
"""
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch

import bupo
import tasks
from infra import cli, files, plots, runs, weights
from infra import distributed as dp
from infra.data import read_responses, read_result
from infra.errors import UserError
from model import Transformer
from rollout import generate, prefill
from tokenizer import Tokenizer


# -----------------------------------------------------------------------------
# the model, and its answers

def load(model_dir, dtype=torch.float32, device="cpu"):
    """(model, tokenizer) of an HF-layout folder; the default model is built on first
    use."""
    weights.ensure_if_default(model_dir)
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device)
    return model, Tokenizer(model_dir, model.config)


def sample_responses(model, tok, src, n: int, max_new_tokens: int, seed: int,
                     max_tokens: int | None = None):
    """The model's own answers to n problems of the source `src` (tasks.Source: a
    generated task's test split, or a seeded draw of a data file; T = 1, one answer each),
    each at most max_tokens long (prompt + response; the model's context by default)."""
    if src.train is None:
        problems = tasks.problems(src.task, n, seed, split="test")
    else:
        problems = [src.train[i] for i in tasks.epoch_draw(len(src.train), 1, n, seed)]
    prompts = [src.encode(tok, p) for p in problems]
    context = model.config.max_position_embeddings
    cli.fits_context(max(map(len, prompts)), max_new_tokens, max_tokens or context,
                     f"the longest {'file' if src.train else src.task} prompt",
                     "--max-tokens (at most the model's context)" if max_tokens
                     else "the model's context",
                     "--max-tokens" if max_tokens and max_tokens < context else None)
    ro = generate(model, prompts, 1, max_new_tokens, temperature=1.0, stop_ids=tok.stop_ids,
                  pad_id=tok.pad_id,
                  seed=seed, progress=True)
    return [(r["prompt_ids"], r["response_ids"]) for r in ro.records()]


# -----------------------------------------------------------------------------
# the analysis

@torch.no_grad()
def analyze(model, pairs, norm: bool = False, heatmap_tokens: int = 24):
    """Token-level entropies of all internal policies over all responses -> (flow, heatmap
    of response 0)."""
    from tqdm import tqdm
    device = model.embed_tokens.weight.device
    flows, heat = [], None
    for i, (p, r) in enumerate(tqdm(pairs, desc="entropy flow")):
        ids = torch.tensor([p + r], device=device)
        _, rec = model(ids, return_residuals=True)
        where = torch.zeros_like(ids, dtype=torch.bool)
        where[0, len(p) - 1:len(p) + len(r) - 1] = True   # position t-1 predicts response token t
        flows.append(bupo.entropy_flow(model, rec, where, norm))
        if i == 0:
            heat = heatmap(model, rec, where, p, r, norm, heatmap_tokens)
    flow = {k: torch.cat([f[k] for f in flows], dim=-1) for k in flows[0]}
    return flow, heat


def heatmap(model, rec, where, prompt, response, norm, n_tokens):
    """H(W_U h_l) and the top-1 token id for l = 0..L at the first n_tokens positions of
    one response."""
    L = model.config.num_layers
    H, top = [], []
    for l in range(L + 1):
        logits = bupo.layer_logits(model, rec.resid[l][where][:n_tokens], l, norm)
        H.append(bupo.entropy(logits).tolist())
        top.append(logits.argmax(-1).tolist())
    return dict(entropy=H, top1=top, targets=response[:n_tokens], prompt=prompt)


def summarize(model_name, model, flow, n_responses, norm) -> dict:
    L = model.config.num_layers
    means = bupo.entropy_changes(flow)
    keys = list(bupo.FLOW_KEYS) + ["dH_attn", "dH_mlp", "dH_layer", "KL_resid"]
    boundary = bupo.boundary_layer(means["dH_mlp"])
    internal, rule = bupo.choose_internal_layer(means["dH_mlp"])
    return {"model": model_name, "num_layers": L, "vocab_size": model.config.vocab_size,
            "num_responses": n_responses, "num_tokens": int(flow["H_policy"].numel()),
            "layers": [{"layer": l + 1, **{k: means[k][l] for k in keys}} for l in range(L)],
            "H_policy": flow["H_policy"].mean().item(), "boundary_layer": boundary,
            "internal_layer": internal, "internal_layer_rule": rule,
            "norm": "final" if norm else "none"}


# -----------------------------------------------------------------------------
# the layer train.py trains in phase 1

def resolve_layer(value: str, model, tok, args, src=None) -> int:
    """train.py's --internal-layer: a paper (1-based) layer l, where pi^l = softmax(W_U
    h_l) (the authors' k = l - 1), or auto: bupo.choose_internal_layer on the dH_mlp of
    --analysis (the current rule, whatever the file's own internal_layer says), or on a
    quick analysis of 8 of the model's own answers."""
    L = model.config.num_layers
    if value != "auto":
        if not 1 <= int(value) <= L:
            raise UserError(f"--internal-layer {value}: this model has layers 1..{L} "
                            "(1-based, h_l)")
        return int(value)
    if args.analysis:
        result = read_result(args.analysis, "--analysis")
        if result.get("norm") == "final":
            raise UserError(f"--analysis {args.analysis}: made with --norm final, but phase 1 "
                            f"trains the un-normed pi^l; analyse again without --norm")
        if result["num_layers"] != L:
            raise UserError(f"--analysis {args.analysis}: made for a model of "
                            f"{result['num_layers']} layers, this one has {L}; analyse this model "
                            f"with analyze.py")
        dH_mlp = [r["dH_mlp"] for r in result["layers"]]
    else:
        print("--internal-layer auto: analysing 8 of the model's answers to choose the layer ...",
              file=sys.stderr)
        pairs = sample_responses(model, tok, src or tasks.source(args), 8,
                                 min(args.max_new_tokens, 64), args.seed)
        dH_mlp = bupo.entropy_changes(analyze(model, pairs)[0])["dH_mlp"]
    layer, rule = bupo.choose_internal_layer(dH_mlp)
    why = {"boundary": "the boundary layer (last layer with mean dH_mlp > 0)",
           "penultimate": "no boundary layer below L, so the penultimate layer (the project's "
                          "fallback: the layer the authors trained on their late-converging Llama "
                          "models; docs/method.md 5)"}[rule]
    print(f"internal layer: {layer} of {L}, {why}", file=sys.stderr)
    return layer


# -----------------------------------------------------------------------------
# accuracy on held-out problems, as train.py evaluates before training, every --eval-every
# steps and at the end: greedy accuracy, avg@n and the unbiased pass@k over n =
# --eval-samples samples at T, on the generated task's test split and on each --eval-data
# benchmark. A data-parallel rank answers every W-th problem; the sums are over all ranks.

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(model, tok, src, args, amp=contextlib.nullcontext) -> dict:
    """Held-out accuracy: the generated task's test split (eval/greedy_acc, eval/avg@n,
    eval/pass@k) and each --eval-data benchmark (eval/<name>/...); amp: the autocast
    region of this forward-only phase."""
    t0 = time.perf_counter()
    out = {}
    # a sharded model answers from a full copy in the compute dtype (infra/distributed.py)
    model = dp.sampling_model(model, args)
    with amp():
        for name, problems in src.eval_sets(args.eval_problems, args.seed).items():
            greedy = not name or args.eval_greedy
            prefix = f"eval/{name}/" if name else "eval/"
            out.update({prefix + k: v for k, v in
                        eval_set(model, tok, src, problems, args, greedy).items()})
    return {**out, "eval_time": time.perf_counter() - t0}


def eval_set(model, tok, src, problems, args, greedy: bool) -> dict:
    """greedy_acc (when asked), avg@n and the unbiased pass@k for k = 1, 2, 4, ..., n over
    n = --eval-samples samples at T, of one set of problems."""
    mine = dp.my_share(len(problems))         # a data-parallel rank answers every W-th problem
    prompts = [src.encode(tok, problems[g]) for g in mine]
    common = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, tokenizer=tok, progress=dp.rank() == 0,
                  compile=args.compile)
    n, size = args.eval_samples, args.eval_batch or len(prompts)
    greedy_right, c = 0, []                   # c: right samples per problem, of n
    for i in range(0, len(prompts), size):    # a chunk of problems at a time (--eval-batch)
        mine_i = mine[i:i + size]
        part = prefill(model, prompts[i:i + size], tok.pad_id)   # one prefill for both calls
        if greedy:
            ro = generate(model, part, 1, args.max_new_tokens, temperature=0.0, **common)
            greedy_right += sum(tasks.reward(t, problems[g].answer)
                                for t, g in zip(ro.text, mine_i))
        part.release = True                   # the last use: freed before decoding
        # a seed per problem: any chunking samples the same
        ro = generate(model, part, n, args.max_new_tokens, temperature=args.temperature,
                      seed=[12345 + g for g in mine_i], **common)
        right = [0] * len(mine_i)
        for t, g in zip(ro.text, ro.group.tolist()):
            right[g] += int(tasks.reward(t, problems[mine_i[g]].answer))
        c += right
    ks = sorted({2**j for j in range(n.bit_length()) if 2**j <= n} | {n})
    sums = dp.all_sum({"greedy": greedy_right, "correct": sum(c),
                       **{f"pass@{k}": sum(pass_at_k(n, ci, k) for ci in c) for k in ks}},
                      next(model.parameters()).device)
    P = len(problems)
    return {**({"greedy_acc": sums["greedy"] / P} if greedy else {}),
            f"avg@{n}": sums["correct"] / (P * n),
            **{f"pass@{k}": sums[f"pass@{k}"] / P for k in ks}}


# -----------------------------------------------------------------------------
# what training changed, layer by layer (analyze.py --against CHECKPOINT)

@torch.no_grad()
def layer_changes(base, trained, pairs) -> list:
    """Per layer l = 1..L, on the same tokens (the base model's answers), means over all tokens:
      kl          KL(pi^l_base || pi^l_trained): how far training moved the layer's policy
      dH          H(pi^l_trained) - H(pi^l_base)
      dKL_policy  the change of KL(pi^l || pi_theta), each model against its own policy
      dcos        the change of cos(h_l, h_L), the paper's feature refinement (Fig. 5)
      attn, mlp   ||W_trained - W_base|| / ||W_base|| of the layer's attention and MLP weights
    Layer L is each model's own policy (through the final norm)."""
    L, device = base.config.num_layers, base.embed_tokens.weight.device
    sums, n = torch.zeros(5, L, dtype=torch.float64), 0
    for p, r in pairs:
        ids = torch.tensor([p + r], device=device)
        where = torch.zeros_like(ids, dtype=torch.bool)
        where[0, len(p) - 1:len(p) + len(r) - 1] = True   # position t-1 predicts token t
        hb = base(ids, return_residuals=True)[1].resid
        ht = trained(ids, return_residuals=True)[1].resid
        top_b = bupo.layer_logits(base, hb[L][where], L)
        top_t = bupo.layer_logits(trained, ht[L][where], L)
        for l in range(1, L + 1):
            zb = bupo.layer_logits(base, hb[l][where], l)
            zt = bupo.layer_logits(trained, ht[l][where], l)
            cos_b = torch.cosine_similarity(hb[l][where].float(), hb[L][where].float(), dim=-1)
            cos_t = torch.cosine_similarity(ht[l][where].float(), ht[L][where].float(), dim=-1)
            terms = (bupo.kl_divergence(zb, zt), bupo.entropy(zt) - bupo.entropy(zb),
                     bupo.kl_divergence(zt, top_t) - bupo.kl_divergence(zb, top_b), cos_t - cos_b)
            for k, term in enumerate(terms):
                sums[k, l - 1] += term.double().sum().cpu()
        n += int(where.sum())
    keys = ("kl", "dH", "dKL_policy", "dcos")
    rows = [{"layer": l, **{k: (sums[i, l - 1] / max(n, 1)).item() for i, k in enumerate(keys)}}
            for l in range(1, L + 1)]
    for row, b, t in zip(rows, base.layers, trained.layers):
        row.update(attn=relative_change(b.self_attn, t.self_attn),
                   mlp=relative_change(b.mlp, t.mlp))
    return rows


def relative_change(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """||W_b - W_a|| / ||W_a|| over all the weights of a module (fp64)."""
    wa = torch.cat([p.detach().double().flatten() for p in a.parameters()])
    wb = torch.cat([p.detach().double().flatten() for p in b.parameters()])
    return ((wb - wa).norm() / wa.norm().clamp(min=1e-30)).item()


def run_of(ckpt: Path, L: int) -> dict:
    """The step, algorithm, internal layer and phase-1 length of the run that wrote checkpoint
    `ckpt`: from its trainer_state.pt, or, where that was removed to save disk, from the run
    folder's args.json and metrics.jsonl (OUT/checkpoints/step_N); {} for a bare model folder."""
    from infra.runs import CHECKPOINT_NAME, load_trainer_state, read_metrics, saved_args
    if (ckpt / "trainer_state.pt").is_file():
        state = load_trainer_state(ckpt)
        return {"step": state["step"], "algo": state["args"].get("algo"),
                "internal_layer": state["internal_layer"],
                "internal_steps": state["args"].get("internal_steps")}
    out, name = ckpt.parent.parent, CHECKPOINT_NAME.fullmatch(ckpt.name)
    args = saved_args(out) if name else {}      # {} where missing or damaged: names nothing
    if not args:
        return {}
    try:
        rows = read_metrics(out) if (out / "metrics.jsonl").is_file() else []
    except OSError:
        rows = []
    layer = next((r["policy_layer"] for r in rows if r.get("phase") == "internal"), L)
    return {"step": int(name.group(1)), "algo": args.get("algo"), "internal_layer": layer,
            "internal_steps": args.get("internal_steps")}


def changes(base, trained, pairs, base_name: str, trained_dir) -> dict:
    """changes.json: layer_changes, the relative change of the unembedding and of the final
    norm, and the step, internal layer and phase-1 length of the run that wrote the checkpoint."""
    unembed = [torch.nn.ParameterList([m.lm_head.weight]) for m in (base, trained)]
    return {"base": base_name, "trained": str(trained_dir), "num_layers": base.config.num_layers,
            "num_responses": len(pairs), "num_tokens": sum(len(r) for _, r in pairs),
            "run": run_of(Path(trained_dir), base.config.num_layers),
            "layers": layer_changes(base, trained, pairs),
            "unembedding": relative_change(*unembed),
            "final_norm": relative_change(base.norm, trained.norm)}


# -----------------------------------------------------------------------------
# output: JSON, table (the plots: infra/plots.py)

def print_table(result: dict):
    print(f"{result['model']}: {result['num_responses']} responses, {result['num_tokens']} tokens, "
          f"norm={result['norm']}")
    print(f"{'layer':>5} {'H(h_in)':>8} {'H(a_in)':>8} {'H(a)':>7} {'H(f_in)':>8} {'H(f)':>7} "
          f"{'H(h)':>7} {'dH_attn':>8} {'dH_mlp':>8} {'dH_layer':>8} {'KL(h||pi)':>9}")
    for r in result["layers"]:
        print(f"{r['layer']:>5} {r['H_resid_in']:8.3f} {r['H_attn_in']:8.3f} {r['H_attn']:7.3f} "
              f"{r['H_mlp_in']:8.3f} {r['H_mlp']:7.3f} {r['H_resid']:7.3f} {r['dH_attn']:8.3f} "
              f"{r['dH_mlp']:8.3f} {r['dH_layer']:8.3f} {r.get('KL_resid', float('nan')):9.3f}")
    print(f"H_policy {result['H_policy']:.3f} nats (max ln V = "
          f"{torch.log(torch.tensor(float(result['vocab_size']))):.2f}); boundary layer: "
          f"{result['boundary_layer']}; internal layer for BuPO: {result['internal_layer']} "
          f"({result['internal_layer_rule']})")


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.Parser(description="Entropy flow of a model's internal policies on its own responses.")
    cli.add_model_args(p)
    g = p.add_argument_group("responses")
    g.add_argument("--task", default="word", choices=sorted(tasks.TASKS), help=tasks.HELP)
    g.add_argument("--shots", type=int, default=0, choices=[0, 1],
                   help="worked examples before each question (a --task's own; for --data "
                   "see --example)")
    g.add_argument("-n", "--num-responses", type=int, default=16,
                   help="how many problems the model answers")
    g.add_argument("--max-new-tokens", type=int, default=128, help="longest response to sample")
    g.add_argument("--responses", default=None,
                   help="JSONL file of responses to analyse instead of sampling")
    g.add_argument("--max-tokens", type=int, default=4096,
                   help="longest prompt + response analysed (the residual "
                   "record of one sequence is held in memory); never more than the model's context")
    g.add_argument("--seed", type=int, default=0, help="seed of the problems and of the sampler")
    tasks.add_data_args(p, train=False)
    g = p.add_argument_group("analysis and output")
    g.add_argument("--norm", default="none", choices=["none", "final"], help="none: softmax(W_U "
                   "x), the paper's definition; final: the logit lens, W_U RMSNorm_final(x)")
    g.add_argument("--compare", default=None, help="another entropy.json to overlay on the plots")
    g.add_argument("--against", default=None, help="a checkpoint trained from --model (train.py's "
                   "checkpoints/step_N): also changes.json and changes.png, what training changed "
                   "layer by layer, on the same answers of --model")
    g.add_argument("--out", default="runs/analysis",
                   help="output folder for entropy.json and the plots")
    g.add_argument("--overwrite", action="store_true", help="if --out holds an analysis, move it "
                   "aside to OUT.old-<time>/ (never deleted)")
    return p.parse_args(argv)


def check_args(args):
    """Every argument, before the model is loaded; the output folder is checked first, so
    a bad --out costs seconds, not a whole analysis."""
    cli.positive(args, "--num-responses", "--max-new-tokens", "--max-tokens")
    cli.non_negative(args, "--seed")
    cli.check_device(args.device)
    if args.responses:
        cli.existing_file(args.responses, "--responses")
    if args.compare and (Path(args.compare) / "entropy.json").is_file():
        raise UserError(f"--compare {args.compare}: an analysis folder; pass its file, --compare "
                        f"{Path(args.compare) / 'entropy.json'}")
    other = read_result(cli.existing_file(args.compare, "--compare"),
                        "--compare") if args.compare else None
    run = files.holds(args.out, runs.MARKERS)
    if run:             # a training run's folder: report.py would read it as this analysis
        raise UserError(f"--out {args.out}: holds a training run ({', '.join(run)}); an analysis "
                        f"goes into a folder of its own: choose another --out")
    earlier = files.holds(args.out, runs.ANALYSIS)
    if earlier:
        if not args.overwrite:
            raise UserError(f"--out {args.out}: already holds an analysis ({', '.join(earlier)}); "
                            f"pass --overwrite to move it aside to {Path(args.out).name}"
                            f".old-<time>/, or choose another --out")
        files.check_movable(args.out)
    files.check_writable_dir(args.out)
    return other


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    other = check_args(args)
    # subnormal softmax tails of the un-normed policies are slow on CPUs (train.py)
    torch.set_flush_denormal(True)
    src = tasks.source(args)   # a --data file read and checked before the model loads
    model, tok = load(args.model, getattr(torch, args.dtype), args.device)
    trained = None
    if args.against:            # checked before any answer is sampled
        trained = Transformer.from_pretrained(args.against, getattr(torch, args.dtype),
                                              args.device)
        if trained.config != model.config:
            raise UserError(f"--against {args.against}: its config.json is not --model's; pass a "
                            f"checkpoint trained from {args.model}")
    max_tokens = min(args.max_tokens, model.config.max_position_embeddings)
    t0 = time.perf_counter()
    if args.responses:
        pairs = read_responses(args.responses, tok, model.config.vocab_size, max_tokens)
    else:
        pairs = sample_responses(model, tok, src, args.num_responses, args.max_new_tokens,
                                 args.seed, max_tokens)
    flow, heat = analyze(model, pairs, norm=args.norm == "final")
    result = summarize(Path(args.model).name, model, flow, len(pairs), args.norm == "final")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    changed = (changes(model, trained, pairs, Path(args.model).name, args.against)
               if trained is not None else None)
    out = Path(args.out)
    moved = files.claim_dir(out, runs.ANALYSIS, args.overwrite)
    if moved:
        print(f"--overwrite: the earlier analysis in {out} was moved to {moved}", file=sys.stderr)
    files.write_text(out / "entropy.json", json.dumps(result, indent=1) + "\n")
    plots.flow(result, heat, out, tok, other)
    print_table(result)
    print(f"wrote {out / 'entropy.json'}, flow.png, dH.png, heatmap.png")
    if changed:
        # which command and code made it: a reported number traces back to both
        changed.update(command=["analyze.py", *argv], code=runs.code_version())
        files.write_text(out / "changes.json", json.dumps(changed, indent=1) + "\n")
        plots.changes(changed, out / "changes.png")
        print(f"wrote {out / 'changes.json'}, changes.png")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
