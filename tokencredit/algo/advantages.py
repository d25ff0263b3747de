"""Critic-free advantage estimators: one scalar per response, from its group.

METHODS.md section 1 (cancellation paper Eq. 15; GRPO, Dr.GRPO, RLOO):
    grpo    A_i = (r_i - mean_g r) / (std_g r + eps)   std = unbiased sample std (ddof 1),
                                                       as verl and TRL compute it
    drgrpo  A_i =  r_i - mean_g r                      (Liu et al. 2025: no std division)
    rloo    A_i =  r_i - mean_{j != i, j in g} r_j     = G/(G-1) (r_i - mean_g r)

Groups whose rewards are all equal get A = 0 on every row, and so does a group of
a single response (no baseline can be formed; verl would hand it A = r instead,
which is a gradient no other row of the prompt balances).

Try it:
    >>> group_advantages(torch.tensor([1., 0, 0, 1]), torch.tensor([0, 0, 0, 0]))
    tensor([ 0.8660, -0.8660, -0.8660,  0.8660])
"""

from __future__ import annotations

import torch

from tokencredit.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")


def _group_stats(rewards: torch.Tensor, group_id: torch.Tensor):
    """Per-row group size, mean and unbiased std. All [B] float64."""
    _, inv = torch.unique(group_id, return_inverse=True)  # [B] -> group index
    n_groups = int(inv.max().item()) + 1
    r = rewards.to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, r)
    mean = total / count
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inv, (r - mean[inv]) ** 2)
    var = sq / (count - 1).clamp(min=1)  # unbiased (ddof = 1)
    return count[inv], mean[inv], var.sqrt()[inv]


@ADVANTAGES.register("grpo")
def grpo(rewards: torch.Tensor, group_id: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B] rewards, [B] group ids -> [B] (r - mean_g) / (std_g + eps)."""
    n, mean, std = _group_stats(rewards, group_id)
    adv = (rewards.double() - mean) / (std + eps)
    return torch.where(n > 1, adv, torch.zeros_like(adv))


@ADVANTAGES.register("drgrpo")
def drgrpo(rewards: torch.Tensor, group_id: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B] -> [B] r - mean_g (Dr.GRPO drops the std division)."""
    n, mean, _ = _group_stats(rewards, group_id)
    adv = rewards.double() - mean
    return torch.where(n > 1, adv, torch.zeros_like(adv))


@ADVANTAGES.register("rloo")
def rloo(rewards: torch.Tensor, group_id: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[B] -> [B] r_i minus the mean of the other G-1 rewards of its group."""
    n, mean, _ = _group_stats(rewards, group_id)
    adv = (rewards.double() - mean) * n / (n - 1).clamp(min=1)
    return torch.where(n > 1, adv, torch.zeros_like(adv))


def group_advantages(
    rewards: torch.Tensor, group_id: torch.Tensor, mode: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: [B] float, one scalar reward per response.
        group_id: [B] long, responses of one prompt share an id (any order).
        mode: "grpo" | "drgrpo" | "rloo".
        eps: added to the std (grpo only).
    Returns:
        [B] float32 advantages (exact zeros for all-equal or single-row groups).
    """
    if rewards.ndim != 1 or group_id.shape != rewards.shape:
        raise ValueError(f"rewards and group_id must both be [B]; got {tuple(rewards.shape)} and {tuple(group_id.shape)}")
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.float32)
    return ADVANTAGES.get(mode)(rewards, group_id, eps=eps).to(torch.float32)
