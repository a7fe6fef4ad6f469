"""
The metrics of one RL step of train.py, one line of OUT/metrics.jsonl (TRL's names where TRL has
one):

    step, phase, policy_layer     the step (from 1); internal (BuPO's phase 1) or full; the layer
                                  whose policy the step optimises (L: the model's, pi_theta)
    reward, reward_std            the mean and std of the step's rewards (all ranks)
    frac_reward_zero_std          the fraction of groups whose G rewards are all equal (advantage 0)
    completions/mean_length       response tokens per response; clipped_ratio: the fraction that
                                  hit --max-new-tokens
    clip_ratio/low                the fraction of response tokens whose ratio the clip holds:
    clip_ratio/high               A < 0 and r < 1 - clip_low; A > 0 and r > 1 + clip_high; A < 0
    clip_ratio/dual               and the loss capped at -A * dual_clip (bupo.policy_loss)
    kl                            verl's ppo_kl: the mean -log ratio, new vs. old policy, over the
                                  updates
    kl_ref                        the KL estimate (--kl-type) to the frozen initial model
                                  (with --kl-coef)
    entropy                       H(pi_theta), the full policy's, always (bupo.diagnostics)
    loss, grad_norm               their means over the step's updates
    skipped_steps                 updates skipped for a loss or gradient norm that is not finite
    step_time, tokens_per_s       wall seconds of the step, response tokens per second
    peak_memory_mb                peak memory so far: torch's allocations on a GPU, the
                                  process's peak RSS on a CPU
    internal/entropy              BuPO: H(pi^l), KL(pi^l || pi_theta) and cos(h_l, h_L) at the
    internal/kl_to_policy         internal layer l, in both phases
    internal/cos_to_top
    eval/*                        held-out accuracy when evaluated (analyze.evaluate)
"""
import torch


def step_row(step, policy_layer, L, G, rewards, sums, grad_norms, skipped, n_mini, dt,
             device) -> dict:
    """One line of metrics.jsonl from the step's sums over all ranks' tokens and responses (means
    per token or per response; TRL's names where TRL has one)."""
    n_tok, n = sums["n_tok"], len(rewards)
    m = {"step": step, "phase": "internal" if policy_layer < L else "full",
         "policy_layer": policy_layer,
         "reward": rewards.mean().item(), "reward_std": rewards.std().item() if n > 1 else 0.0,
         "frac_reward_zero_std": (rewards.view(-1, G).std(1) == 0).float().mean().item() if G > 1
         else 1.0,
         "completions/mean_length": n_tok / n, "completions/clipped_ratio": sums["clipped"] / n,
         **{k: sums[k] / n_tok
            for k in ("clip_ratio/low", "clip_ratio/high", "clip_ratio/dual", "kl_ref")
            if k in sums},
         "kl": sums["ppo_kl"] / n_tok, "entropy": sums["stat/entropy"] / n_tok,
         "loss": sum(sums[f"loss/{k}"] for k in range(n_mini)) / n_mini,
         "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
         "skipped_steps": skipped,
         "step_time": dt, "tokens_per_s": n_tok / dt,
         "peak_memory_mb": peak_memory_mb(device)}
    if "stat/entropy_layer" in sums:
        m.update({"internal/entropy": sums["stat/entropy_layer"] / n_tok,
                  "internal/kl_to_policy": sums["stat/kl_layer"] / n_tok,
                  "internal/cos_to_top": sums["stat/cos_layer"] / n_tok})
    return m


def peak_memory_mb(device) -> float:
    """Peak memory so far, MiB: torch's CUDA allocations on a GPU, peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB

