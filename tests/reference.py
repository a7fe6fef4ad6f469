"""Slow, plain implementations that the tests hold bupo.py's to (oracles): one position or one
row at a time, no shared prompt pass, no chunking, no fused diagnostics."""
import torch
import torch.nn.functional as F

import bupo


def token_logprobs(model, h, tokens, layer: int, norm: bool = False, temperature: float = 1.0):
    """log pi^layer(token | position) for states h [N, d] (the position before each token)."""
    logits = bupo.layer_logits(model, h, layer, norm) / temperature
    return logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]


@torch.no_grad()
def policy_stats(model, batch, layer: int, temperature: float = 1.0) -> dict:
    """bupo.diagnostics of every response token [N] (rows in order), from one plain forward per
    row over its real tokens: H(pi_theta), and below L H(pi^l), KL(pi^l || pi_theta) and
    cos(h_l, h_L)."""
    L, out = model.config.num_layers, []
    for i in range(len(batch.ids)):
        real = batch.mask[i].bool()
        prompt, n = int(real[:batch.Tp].sum()), int(batch.response_mask[i].sum())
        _, rec = model(batch.ids[i:i + 1, real], return_residuals=True)
        at = slice(prompt - 1, prompt - 1 + n)       # position Tp-1+t predicts token t
        h_L, h_l = rec.resid[L][0, at], rec.resid[layer][0, at]
        top = bupo.layer_logits(model, h_L, L) / temperature
        row = {"entropy": bupo.entropy(top)}
        if layer < L:
            low = bupo.layer_logits(model, h_l, layer) / temperature
            row.update(entropy_layer=bupo.entropy(low), kl_layer=bupo.kl_divergence(low, top),
                       cos_layer=F.cosine_similarity(h_l.float(), h_L.float(), dim=-1))
        out.append(row)
    return {k: torch.cat([row[k] for row in out]) for k in out[0]}
