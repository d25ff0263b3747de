"""Sampler/trainer mismatch: how far the rollout engine's log-probs are from the
trainer's, and the truncated importance-sampling (TIS) weight that corrects for it.

When rollouts come from another engine (vLLM) its kernels give slightly different
probabilities than the trainer's forward for the same weights, so the samples
are drawn from pi_sampler, not from pi_old = the trainer at the sampling policy
version. Yao et al. (2025, "Your efficient RL framework secretly brings you
off-policy RL training") correct the policy gradient with the capped ratio

    w(i,t) = min(pi_old(i,t) / pi_sampler(i,t), C)                 token level
    w(i)   = min(prod_t pi_old(i,t) / pi_sampler(i,t), C)          sequence level

multiplied onto each token's clipped term (`policy_loss(ratio_weight=w)`).

Pure functions; all tensors [B, T] response-aligned, `mask` 1 on sampled tokens.
"""

from __future__ import annotations

import torch

TIS_LEVELS = ("none", "token", "sequence")


def tis_weights(old_logprob: torch.Tensor, sample_logprob: torch.Tensor, mask: torch.Tensor, level: str = "token",
                cap: float = 2.0) -> torch.Tensor | None:
    """[B, T] float32 truncated importance weights (0 on padding), or None for level "none".

    old_logprob: the trainer's log pi_old of the sampled tokens; sample_logprob:
    the sampler's log-probs of the same tokens; cap >= 1.
    """
    if level not in TIS_LEVELS:
        raise ValueError(f"unknown TIS level {level!r}; valid: {', '.join(TIS_LEVELS)}")
    if cap < 1.0:
        raise ValueError(f"TIS cap must be >= 1, got {cap}")
    if level == "none":
        return None
    m = mask.to(torch.float32)
    log_r = (old_logprob.float() - sample_logprob.float()) * m  # [B, T]
    if level == "token":
        w = torch.exp(log_r.clamp(max=20.0)).clamp(max=cap)  # [B, T]
    else:
        w = torch.exp(log_r.sum(-1, keepdim=True).clamp(max=20.0)).clamp(max=cap).expand_as(log_r)  # [B, 1] -> [B, T]
    return w * m


def sampler_gap(old_logprob: torch.Tensor, sample_logprob: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Trainer vs sampler log-probs of the sampled tokens:

        rollout_logprob_abs_diff_mean / _max   mean / max |log pi_old - log pi_sampler|
        rollout_kl                              k3 estimate of KL(pi_sampler || pi_old) from the
                                                sampler's own samples: mean of r - 1 - log r,
                                                r = pi_old / pi_sampler (>= 0, 0 iff equal)
    NaN when no token is valid."""
    valid = mask > 0  # [B, T]
    if not valid.any():
        nan = float("nan")
        return {"rollout_logprob_abs_diff_mean": nan, "rollout_logprob_abs_diff_max": nan, "rollout_kl": nan}
    d = (old_logprob.float() - sample_logprob.float())[valid]  # [N] log r
    return {
        "rollout_logprob_abs_diff_mean": float(d.abs().mean()),
        "rollout_logprob_abs_diff_max": float(d.abs().max()),
        "rollout_kl": float((torch.exp(d.clamp(-20.0, 20.0)) - 1.0 - d).mean()),
    }
