"""
Bottom-up Policy Optimization, the method: internal policies of a decoder and their
entropy.

Index convention: layers are 1..L as in the paper. `layer` arguments here are paper
indices: layer l means h_l = resid[l] (resid[0] = h_0, the embeddings), and the authors'
code index k is l - 1 (their k = 5 is l = 6).

Internal policies (paper section 2, eqs. 5 and 6), all at temperature 1 unless a caller
divides:
    pi^l_Layer = softmax(W_U h_l)       l = 0 .. L-1, h_l NOT normalised (the authors' definition)
    pi^L_Layer = softmax(W_U RMSNorm_final(h_L)) = the model's own policy
    pi^l_ATTN  = softmax(W_U a_l),  pi^l_FFN = softmax(W_U f_l)
The logit-lens variant (norm=True) applies the final RMSNorm, its statistics recomputed
for each tensor, to whatever it projects; it is an option, never the default (the paper's
Table 5 finds it worse inside BuPO).

Departures from the authors' analysis code, on purpose:
  1. Layer L is the model's policy, through the final norm (their plot script meant to do
     this, but an off-by-one left h_L un-normed; docs/method.md section 8).
  2. Entropies are taken at the positions that predict the response tokens (the last
     prompt position through the position before the last response token). The authors'
     script is shifted by one (it drops the distribution of the first response token and
     keeps the one after the last token; docs/method.md 8).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infra.memory import LOGITS_BUDGET   # bytes of fp32 logits a pass unembeds at once
from model import Residuals, SharedPromptCache, Transformer


def chunk_rows(model: Transformer, budget: int = LOGITS_BUDGET) -> int:
    """How many positions' fp32 logits (and softmax) fit in `budget` bytes."""
    return max(1, budget // (2 * 4 * model.config.vocab_size))


# -----------------------------------------------------------------------------
# internal policies

def unembed(model: Transformer, x: torch.Tensor, norm: bool = False,
            W: torch.Tensor | None = None) -> torch.Tensor:
    """Logits W_U x of any residual-stream tensor x [..., d] (paper eqs. 5, 6); fp32 out.
    norm=True: the logit lens, W_U RMSNorm_final(x). W: W_U in fp32, cast once by the caller."""
    if norm:    # normed logits are O(10): the compute dtype, as the model's own lm_head
        return F.linear(model.norm(x).to(model.W_U.dtype), model.W_U).float()
    with torch.autocast(x.device.type, enabled=False):    # W_U h_l reaches the hundreds: fp32
        return F.linear(x.float(), model.W_U.float() if W is None else W)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T; at T = 1 the same numbers without a pass over [N, V] (and its backward)."""
    return logits if temperature == 1.0 else logits / temperature


def layer_logits(model: Transformer, h: torch.Tensor, layer: int, norm: bool = False,
                 W: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of pi^layer from h = resid[layer]; at layer L, the model's policy."""
    return unembed(model, h, norm=norm or layer == model.config.num_layers, W=W)


# -----------------------------------------------------------------------------
# entropy (eq. 7) and log-probs, chunked over positions

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum p log p = logsumexp(z) - sum softmax(z) z (eq. 7), in nats, in fp32."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)


def policy_entropy(model: Transformer, x: torch.Tensor, norm: bool = False,
                   chunk: int | None = None) -> torch.Tensor:
    """H(softmax(W_U x)) for every row of x [N, d] -> [N], never holding more than `chunk`
    rows of logits. norm=True: through the final RMSNorm (the logit lens; for h_L, the
    model's own policy)."""
    chunk = chunk or chunk_rows(model)
    if not len(x):
        return x.new_zeros(0)
    return torch.cat([entropy(unembed(model, xs, norm)) for xs in x.split(chunk)])


# -----------------------------------------------------------------------------
# the entropy flow through the residual stream (eqs. 11-13)

FLOW_KEYS = ("H_resid_in", "H_attn_in", "H_attn", "H_mlp_in", "H_mlp", "H_resid")


@torch.no_grad()
def entropy_flow(model: Transformer, rec: Residuals, where: torch.Tensor, norm: bool = False,
                 chunk: int | None = None) -> dict:
    """Token-level entropies of every internal policy at the positions `where` [B, T].

    Returns {key: [L, N]} for the FLOW_KEYS (row l-1 is layer l), with "KL_resid" =
    KL(pi^l || pi_theta) [L, N] (kl_flow) and "H_policy" [N]. Per layer l:
      H_resid_in = H(W_U h_{l-1})       H_attn_in = H(W_U RMSNorm_in_l(h_{l-1}))
      H_attn     = H(W_U a_l)           H_mlp_in  = H(W_U RMSNorm_post_l(m_l))
      H_mlp      = H(W_U f_l)           H_resid   = H(W_U h_l)
    The layer-L output is the model's policy (final norm). The entropy changes:
      dH_attn  = H_attn - H_attn_in     (eq. 12)
      dH_mlp   = H_mlp - H_mlp_in       (eq. 13)
      dH_layer = H_resid - H_resid_in   (eq. 11)
    """
    L = model.config.num_layers
    # every tensor below h_L goes through the same projection: stack them for a few large
    # matmuls
    groups = (rec.resid[:L], rec.attn_in, rec.attn_out, rec.mlp_in, rec.mlp_out)
    x = torch.cat([t[where] for group in groups for t in group])                  # [5 L N, d]
    H = policy_entropy(model, x, norm, chunk).view(5, L, -1)                      # [5, L, N]
    # pi^L: the model's policy
    H_policy = policy_entropy(model, rec.resid[L][where], norm=True, chunk=chunk)
    return dict(H_resid_in=H[0], H_resid=torch.cat([H[0, 1:], H_policy[None]]), H_policy=H_policy,
                H_attn_in=H[1], H_attn=H[2], H_mlp_in=H[3], H_mlp=H[4],
                KL_resid=kl_flow(model, rec, where, norm, chunk))


@torch.no_grad()
def kl_flow(model: Transformer, rec: Residuals, where: torch.Tensor, norm: bool = False,
            chunk: int | None = None) -> torch.Tensor:
    """KL(pi^l || pi_theta) at the positions `where` of a record -> [L, N], row l-1 is
    layer l (row L-1, the policy itself, is 0): how far each layer policy is from the
    model's policy on the same states (analyze.py's closest_layer reads its mean per
    layer; docs/method.md 5)."""
    chunk = chunk or max(1, chunk_rows(model) // 2)   # the policy's and one layer's logits at once
    L = model.config.num_layers
    top, hs = rec.resid[L][where], [rec.resid[l][where] for l in range(1, L)]
    out = torch.zeros(L, len(top), device=top.device)
    for i in range(0, len(top), chunk):
        policy = layer_logits(model, top[i:i + chunk], L)
        for l, h in enumerate(hs, start=1):
            out[l - 1, i:i + chunk] = kl_divergence(layer_logits(model, h[i:i + chunk], l, norm),
                                                    policy)
    return out


def entropy_changes(flow: dict) -> dict:
    """Mean entropies per layer, pooled over all tokens, and their changes (eqs. 11-13).
    Lists of L floats. With "KL_resid" in the flow (kl_flow), its mean per layer too."""
    mean = {k: flow[k].mean(-1) for k in FLOW_KEYS + ("KL_resid",) if k in flow}
    out = {k: v.tolist() for k, v in mean.items()}
    out["dH_attn"] = (mean["H_attn"] - mean["H_attn_in"]).tolist()        # eq. 12
    out["dH_mlp"] = (mean["H_mlp"] - mean["H_mlp_in"]).tolist()           # eq. 13
    out["dH_layer"] = (mean["H_resid"] - mean["H_resid_in"]).tolist()     # eq. 11
    return out


def boundary_layer(dH_mlp: list) -> int | None:
    """The paper's boundary layer (its Table 3): the last layer (1-based) whose mean FFN
    entropy change is positive."""
    positive = [l for l, d in enumerate(dH_mlp, start=1) if d > 0]
    return positive[-1] if positive else None


def choose_internal_layer(dH_mlp: list) -> tuple[int, str]:
    """The layer of --internal-layer auto, and which rule chose it: the paper's boundary
    layer when it lies below L; when it does not (no layer with dH_mlp > 0, or only the
    last one), the penultimate layer L-1, the authors' choice for their late-converging
    Llama runs and, on the project's layer sweep, as good as any layer tried
    (docs/method.md 5). max(1, .): a 1-layer model has only its own layer."""
    L, boundary = len(dH_mlp), boundary_layer(dH_mlp)
    if boundary is not None and boundary < L:
        return boundary, "boundary"
    return max(1, L - 1), "penultimate"


# -----------------------------------------------------------------------------
# the training objective: GRPO, and BuPO's bottom-up phase (paper section 3, eqs. 9-10;
# docs/method.md 6-7)
#
# BuPO is GRPO with one change: which policy the ratio is taken on.
#   - RL steps 1..internal_steps (counted from 1, as the authors' global_steps): the old
#     and the current log-probs both come from pi^l = softmax(W_U h_l), no norm (J_IPA).
#   - Later steps: both from the full policy (J_GRPO). The two are never mixed (eq. 10).
#   - Rollouts always come from the full policy.
#
# The ratio is exactly 1 on the first mini-batch of a step:
#   - the old log-probs use the weights of the start of the step, and so does mini-batch
#     1, on the same micro-batches (train.py);
#   - so nothing is clipped; the loss is -mean(A), its gradient A grad log pi is not 0;
#   - later mini-batches see weights already moved.
#
# What the phase-1 ratio means (eq. 9; docs/method.md 7):
#   - the tokens come from pi_theta, the ratio and the clip use pi^l: no importance weight;
#   - it is a trust region on the internal distribution: the update is A grad log
#     pi^l(o_t) while pi^l / pi^l_old stays inside [1 - clip_low, 1 + clip_high];
#   - only blocks 1..l and W_U (and the embedding) get gradient; the blocks above l and
#     the final norm get none (grad stays None).
#
# Loss aggregation, and the same choice in the two libraries people compare against:
#   ours                      TRL GRPOConfig.loss_type        verl actor.loss_agg_mode
#   token-mean (default)      "dapo" (or "bnpo" per device)   "token-mean" (the authors')
#   seq-mean-token-mean       "grpo"                          "seq-mean-token-mean"
#   seq-mean-token-sum-norm   "dr_grpo"                       "seq-mean-token-sum-norm"
# verl's seq-mean-token-sum-norm divides the batch's sum by max_len only.
# Each mode is exact over a mini-batch however it is cut into micro-batches:
# the caller passes the mini-batch's totals (sequences, tokens, max length).

ADVANTAGES = ("grpo", "drgrpo", "rloo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def group_advantages(rewards: torch.Tensor, group_size: int, mode: str = "grpo",
                     eps: float = 1e-6) -> torch.Tensor:
    """One advantage per response from the rewards of its group (rows g*G .. g*G+G-1):
    grpo:   (R - mean) / (std + eps), std unbiased (N-1) as torch.std; a group of 1: mean 0, std 1
    drgrpo: R - mean                   (Dr. GRPO: no division by the std)
    rloo:   R - mean of the other G-1  (leave-one-out baseline)"""
    r = rewards.float().view(-1, group_size)
    if mode == "grpo":
        if group_size == 1:
            return (r / (1.0 + eps)).view(-1)
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)
    if mode == "drgrpo":
        return (r - r.mean(1, keepdim=True)).view(-1)
    if mode == "rloo":
        if group_size < 2:
            raise ValueError("rloo advantages need a group size of at least 2")
        return ((r - (r.sum(1, keepdim=True) - r) / (group_size - 1))).view(-1)
    raise ValueError(f"unknown advantage mode {mode!r}; choose one of {', '.join(ADVANTAGES)}")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, num_seqs: int, num_tokens: int,
              max_len: int):
    """Per-token losses [n, T] of a micro-batch -> its share of the mini-batch loss."""
    mask = mask.float()
    if mode == "token-mean":
        return (loss * mask).sum() / max(num_tokens, 1)
    if mode == "seq-mean-token-mean":
        return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_seqs
    if mode == "seq-mean-token-sum-norm":
        return (loss * mask).sum() / (num_seqs * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: k1 = log pi - log
    pi_ref, k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased and >=
    0)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        d = (ref_logp - logp).clamp(-20, 20)
        return d.exp() - d - 1
    raise ValueError(f"unknown KL estimator {kind!r}; choose k1 or k3")


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=10.0):
    """The clipped surrogate per token (docs/method.md 6), and its diagnostics as masked
    sums. logp, old_logp, mask [n, T]; advantages [n]; dual_clip None or <= 1: off."""
    A = advantages[:, None]
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    l1 = -A * ratio
    l2 = -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)                                   # standard PPO clip
    loss = clipped
    if dual_clip is not None and dual_clip > 1:     # dual clip: bound the loss where A < 0
        loss = torch.where(A < 0, torch.minimum(clipped, -A * dual_clip), clipped)
    m = mask.float()
    stats = {"clip_ratio/low": (((ratio < 1 - clip_low) & (A < 0)).float() * m).sum(),
             "clip_ratio/high": (((ratio > 1 + clip_high) & (A > 0)).float() * m).sum(),
             "clip_ratio/dual": (((A < 0) & (clipped > -A * dual_clip)).float() * m).sum()
             if dual_clip else m.sum() * 0,
             "ppo_kl": (-log_ratio * m).sum()}
    return loss, {k: v.detach() for k, v in stats.items()}


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q), p and q the softmax of the logits; fp32."""
    logp, logq = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


# -----------------------------------------------------------------------------
# BuPO's phase switch (eq. 10), and the log-probs of the responses under the policy of the
# phase

@dataclass
class Batch:
    """Prompts (left-padded) and responses (right-padded) as one input [n, Tp + R]:
    position Tp-1+t predicts response token t."""
    ids: torch.Tensor
    mask: torch.Tensor
    Tp: int

    @classmethod
    def of(cls, ro) -> "Batch":
        """The batch of a rollout.Rollouts."""
        return cls(torch.cat([ro.prompt_ids, ro.response_ids], 1),
                   torch.cat([ro.prompt_mask, ro.response_mask], 1),
                   ro.prompt_ids.shape[1])

    def rows(self, rows) -> "Batch":
        """The rows of a micro-batch, without the columns that are all padding."""
        ids, mask = self.ids[rows], self.mask[rows]
        first = int(mask[:, :self.Tp].any(0).nonzero()[0])
        last = self.Tp + int(mask[:, self.Tp:].sum(1).max())
        return Batch(ids[:, first:last], mask[:, first:last], self.Tp - first)

    @property
    def response_mask(self) -> torch.Tensor:
        return self.mask[:, self.Tp:]


def phase_layer(algo: str, step: int, internal_steps: int, layer: int, num_layers: int) -> int:
    """BuPO's phase switch (eq. 10): the layer whose policy RL step `step` optimises.
    BuPO: pi^layer for steps 1..internal_steps (J_IPA), then pi^L = pi_theta (J_GRPO).
    GRPO: pi^L always. The old, new and reference log-probs of a step all use it."""
    return layer if algo == "bupo" and step <= internal_steps else num_layers


def response_states(model: Transformer, batch: Batch, layers) -> dict:
    """{l: h_l [n, R, d]} at the positions that predict the response tokens (Tp-1+t
    predicts token t), for each layer l in `layers`; the forward stops after max(layers).
    Each distinct prompt runs once; its keys and values serve the rows that answer it."""
    Tp, top, layers = batch.Tp, max(layers), tuple(layers)
    prompts, inverse = torch.unique(torch.cat([batch.ids[:, :Tp], batch.mask[:, :Tp]], 1), dim=0,
                                    return_inverse=True)
    cache = SharedPromptCache(len(prompts), batch.ids.shape[1], device=batch.ids.device)
    # only the h_l asked for are kept (a pass without gradients holds no other layer's)
    _, before = model(prompts[:, :Tp], attention_mask=prompts[:, Tp:], cache=cache,
                      upto_layer=top, keep_hidden=layers)
    # row i attends to its prompt's keys and values
    cache.keep(inverse)
    _, after = model(batch.ids[:, Tp:], attention_mask=batch.mask[:, Tp:], cache=cache,
                     upto_layer=top, keep_hidden=layers)
    # the last prompt position predicts response token 0, from the prompt's pass
    last = {l: before[l][:, -1:].index_select(0, inverse) for l in layers}
    return {l: torch.cat([last[l], after[l][:, :-1]], 1) for l in layers}


def policy_logprobs(model: Transformer, batch: Batch, layer: int, temperature: float = 1.0,
                    stats_layer: int | None = None) -> tuple[torch.Tensor, dict]:
    """(logp, stats): log pi^layer(o_t | prompt, o_<t) [n, R] of every response token
    (0 on padding; differentiable). The old, new and reference log-probs of a step alike:
      1. layer = L: the model's policy, through the final norm.
      2. layer < L: pi^l = softmax(W_U h_l / T), no norm (eq. 5). The forward stops after
         block l, so in phase 1 the blocks above l and the final norm get no gradient.
      3. stats_layer: also the diagnostics there, from the same forward; else stats = {}.
    Positions are unembedded in chunks (chunk_rows): no [N, V] logits are held whole."""
    L = model.config.num_layers
    layers = [layer] if stats_layer is None else sorted({layer, stats_layer, L})
    h = response_states(model, batch, layers)
    keep = batch.response_mask.bool()
    tokens, h = batch.ids[:, batch.Tp:][keep], {l: v[keep] for l, v in h.items()}  # [N], [N, d]
    chunk, logp, parts = chunk_rows(model), [], []
    # one fp32 W_U for all chunks: autograd keeps one copy, not one per chunk (a bf16 W_U)
    W = model.W_U.float() if min(layers) < L else None
    for s in (slice(i, i + chunk) for i in range(0, len(tokens), chunk)):
        z = tempered(layer_logits(model, h[layer][s], layer, W=W), temperature)
        logp.append(z.log_softmax(-1).gather(-1, tokens[s, None])[:, 0])
        if stats_layer is not None:
            with torch.no_grad():
                states = {l: v[s].detach() for l, v in h.items()}
                parts.append(diagnostics(model, states, stats_layer, temperature,
                                         given={layer: z.detach()}, W=W))
    out = torch.zeros(keep.shape, device=keep.device)
    if logp:
        out[keep] = torch.cat(logp)
    return out, {k: torch.cat([part[k] for part in parts]) for k in (parts[0] if parts else {})}


def diagnostics(model: Transformer, h: dict, layer: int, temperature: float = 1.0,
                given: dict | None = None, W: torch.Tensor | None = None) -> dict:
    """Per-token diagnostics [N] from states h = {l: h_l [N, d]} (layer and L among them):
    H(pi_theta) (eq. 7), and below L H(pi^l), KL(pi^l || pi_theta) and cos(h_l, h_L), the
    paper's "feature refinement" (Fig. 5). given: {l: logits / T}; W: W_U in fp32."""
    L = model.config.num_layers
    given = given or {}
    top = given[L] if L in given else tempered(layer_logits(model, h[L], L), temperature)
    out = {"entropy": entropy(top)}
    if layer < L:
        low = (given[layer] if layer in given
               else tempered(layer_logits(model, h[layer], layer, W=W), temperature))
        out.update(entropy_layer=entropy(low), kl_layer=kl_divergence(low, top),
                   cos_layer=F.cosine_similarity(h[layer].float(), h[L].float(), dim=-1))
    return out
