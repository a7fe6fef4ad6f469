"""
Bottom-up Policy Optimization, the method: internal policies of a decoder and their entropy.

Index convention: layers are 1..L as in the paper. `layer` arguments here are paper indices: layer l means
h_l = resid[l] (resid[0] = h_0, the embeddings), and the authors' code index k is l - 1 (their k = 5 is l = 6).

Internal policies (paper section 2, eqs. 5 and 6), all at temperature 1 unless a caller divides:
    pi^l_Layer = softmax(W_U h_l)       l = 0 .. L-1, with NO normalisation of h_l (the authors' definition)
    pi^L_Layer = softmax(W_U RMSNorm_final(h_L)) = the model's own policy
    pi^l_ATTN  = softmax(W_U a_l),  pi^l_FFN = softmax(W_U f_l)
The logit-lens variant (norm=True) applies the final RMSNorm, its statistics recomputed for each tensor, to
whatever it projects; it is an option, never the default (the paper's Table 5 finds it worse inside BuPO).

Departures from the authors' analysis code, on purpose:
  1. Layer L is the model's policy, through the final norm (their plot script meant to do this, but an
     off-by-one left h_L un-normed; BUPO.md 5.2).
  2. Entropies are taken at the positions that predict the response tokens (the last prompt position through
     the position before the last response token). The authors' script is shifted by one (it drops the
     distribution of the first response token and keeps the one after the last token; BUPO.md 2.2).
"""
import torch
import torch.nn.functional as F

from model import Residuals, Transformer

LOGITS_BUDGET = 256 * 2**20  # bytes of fp32 logits held at once; positions are processed in chunks to stay below


def chunk_rows(model: Transformer, budget: int = LOGITS_BUDGET) -> int:
    """How many positions' [V] logits fit in `budget` bytes of fp32 (with the softmax beside them)."""
    return max(1, budget // (2 * 4 * model.config.vocab_size))


# -----------------------------------------------------------------------------
# internal policies

def unembed(model: Transformer, x: torch.Tensor, norm: bool = False) -> torch.Tensor:
    """Logits W_U x of any residual-stream tensor x [..., d] (paper eqs. 5, 6); fp32 out.
    norm=True: the logit lens, W_U RMSNorm_final(x)."""
    if norm:
        x = model.norm(x)
    return F.linear(x.to(model.W_U.dtype), model.W_U).float()


def layer_logits(model: Transformer, h: torch.Tensor, layer: int, norm: bool = False) -> torch.Tensor:
    """Logits of the internal layer policy pi^layer from h = resid[layer]. At layer L, the model's policy."""
    return unembed(model, h, norm=norm or layer == model.config.num_layers)


# -----------------------------------------------------------------------------
# entropy (eq. 7) and log-probs, chunked over positions

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum p log p = logsumexp(z) - sum softmax(z) z, in nats, over the last dim, in fp32 (eq. 7)."""
    z = logits.float()
    return torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)


def policy_entropy(model: Transformer, x: torch.Tensor, norm: bool = False, chunk: int | None = None) -> torch.Tensor:
    """H(softmax(W_U x)) for every row of x [N, d] -> [N], never holding more than `chunk` rows of logits.
    norm=True: through the final RMSNorm (the logit lens; for h_L, the model's own policy)."""
    chunk = chunk or chunk_rows(model)
    return torch.cat([entropy(unembed(model, xs, norm)) for xs in x.split(chunk)]) if len(x) else x.new_zeros(0)


def token_logprobs(model: Transformer, h: torch.Tensor, tokens: torch.Tensor, layer: int, norm: bool = False,
                   temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """log pi^layer(token | position) for h [N, d] and tokens [N] -> [N] (fp32, differentiable).
    h must be the position *before* each token (position t-1 predicts token t)."""
    chunk = chunk or chunk_rows(model)
    out = []
    for hs, ts in zip(h.split(chunk), tokens.split(chunk)):
        logp = (layer_logits(model, hs, layer, norm) / temperature).log_softmax(-1)
        out.append(logp.gather(-1, ts[:, None])[:, 0])
    return torch.cat(out)


# -----------------------------------------------------------------------------
# the entropy flow through the residual stream (eqs. 11-13)

FLOW_KEYS = ("H_resid_in", "H_attn_in", "H_attn", "H_mlp_in", "H_mlp", "H_resid")


@torch.no_grad()
def entropy_flow(model: Transformer, rec: Residuals, where: torch.Tensor, norm: bool = False,
                 chunk: int | None = None) -> dict:
    """Token-level entropies of every internal policy at the positions `where` ([B, T] bool) of a record.

    Returns {key: [L, N] tensor} for the FLOW_KEYS (row l-1 is layer l) and "H_policy": [N]. Per layer l:
      H_resid_in = H(W_U h_{l-1}),  H_attn_in = H(W_U RMSNorm_in_l(h_{l-1})),  H_attn = H(W_U a_l),
      H_mlp_in = H(W_U RMSNorm_post_l(m_l)),  H_mlp = H(W_U f_l),  H_resid = H(W_U h_l)
    where the layer-L output is the model's policy (final norm). The entropy changes are differences of these:
      dH_attn = H_attn - H_attn_in (eq. 12), dH_mlp = H_mlp - H_mlp_in (eq. 13), dH_layer = H_resid - H_resid_in (eq. 11).
    """
    L = model.config.num_layers
    # every tensor below h_L goes through the same projection: stack them for a few large matmuls
    groups = (rec.resid[:L], rec.attn_in, rec.attn_out, rec.mlp_in, rec.mlp_out)
    x = torch.cat([t[where] for group in groups for t in group])                  # [5 L N, d]
    H = policy_entropy(model, x, norm, chunk).view(5, L, -1)                      # [5, L, N]
    H_policy = policy_entropy(model, rec.resid[L][where], norm=True, chunk=chunk)  # pi^L: the model's policy
    return dict(H_resid_in=H[0], H_resid=torch.cat([H[0, 1:], H_policy[None]]), H_policy=H_policy,
                H_attn_in=H[1], H_attn=H[2], H_mlp_in=H[3], H_mlp=H[4])


def entropy_changes(flow: dict) -> dict:
    """Mean entropies per layer, pooled over all tokens, and their changes (eqs. 11-13). Lists of L floats."""
    mean = {k: flow[k].mean(-1) for k in FLOW_KEYS}
    out = {k: v.tolist() for k, v in mean.items()}
    out["dH_attn"] = (mean["H_attn"] - mean["H_attn_in"]).tolist()        # eq. 12
    out["dH_mlp"] = (mean["H_mlp"] - mean["H_mlp_in"]).tolist()           # eq. 13
    out["dH_layer"] = (mean["H_resid"] - mean["H_resid_in"]).tolist()     # eq. 11
    return out


def boundary_layer(dH_mlp: list) -> int | None:
    """The paper's boundary layer: the last layer (1-based) whose mean FFN entropy change is positive."""
    positive = [l for l, d in enumerate(dH_mlp, start=1) if d > 0]
    return positive[-1] if positive else None
