"""Token-flip probe (cancellation paper Alg. 1, Sec. 1 and Fig. 1).

After the update of a rollout batch, the same rows go through one more forward
pass; d(i,t) = l_after(i,t) - l_before(i,t), both from the training forward (not
the sampler). A token is *boosted* if d > eps, *suppressed* if d < -eps, *stable*
otherwise (eps = 1e-6). Fractions and mean |d| are reported separately for rows
with A > 0, A < 0, and all rows. The probe reads the model; it never changes it.

Try it:
    stats = flip_stats(delta, advantage, mask, eps=1e-6)
    stats["flip_pos_boosted"], stats["flip_neg_boosted"]
"""

from __future__ import annotations

import torch


def flip_stats(delta: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> dict[str, float]:
    """Boosted / suppressed / stable fractions and mean |d|.

    Args:
        delta: [B, T] l_after - l_before per response token.
        advantage: [B] row advantage (its sign picks the subset).
        mask: [B, T] valid response tokens.
    Returns:
        {"flip_{pos,neg,all}_{boosted,suppressed,stable,mean_abs,tokens}": float}
        (fractions are NaN-free: a subset with no token reports 0 and tokens=0).
    """
    m = mask.bool()
    out: dict[str, float] = {}
    subsets = {
        "pos": (advantage > 0)[:, None] & m,
        "neg": (advantage < 0)[:, None] & m,
        "all": m,
    }
    for name, sel in subsets.items():
        d = delta[sel]
        n = d.numel()
        out[f"flip_{name}_tokens"] = float(n)
        if n == 0:
            for k in ("boosted", "suppressed", "stable", "mean_abs"):
                out[f"flip_{name}_{k}"] = 0.0
            continue
        out[f"flip_{name}_boosted"] = float((d > eps).float().mean())
        out[f"flip_{name}_suppressed"] = float((d < -eps).float().mean())
        out[f"flip_{name}_stable"] = float((d.abs() <= eps).float().mean())
        out[f"flip_{name}_mean_abs"] = float(d.abs().mean())
    return out


def flip_records(
    delta: torch.Tensor,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    token_ids: torch.Tensor,
    entropy: torch.Tensor | None,
    old_logprob: torch.Tensor,
    policy_version: int,
    group_id: torch.Tensor | None = None,
    prompt_index: torch.Tensor | None = None,
) -> dict[str, list]:
    """Per-token records (columns) for parquet: policy_version (of the policy after
    the update), row, position, token_id,
    delta, advantage, entropy, old_prob, and when given group_id / prompt_index
    ([B] per row: the row's group and the index of its prompt in the training
    data, which stays valid when the reward-balanced buffer mixes rollout steps).
    Only valid tokens."""
    rows, pos = mask.bool().nonzero(as_tuple=True)
    extra = {}
    if group_id is not None:
        extra["group_id"] = group_id[rows].tolist()
    if prompt_index is not None:
        extra["prompt_index"] = prompt_index[rows].tolist()
    return extra | {
        "policy_version": [policy_version] * int(rows.numel()),
        "row": rows.tolist(),
        "position": pos.tolist(),
        "token_id": token_ids[rows, pos].tolist(),
        "delta": delta[rows, pos].tolist(),
        "advantage": advantage[rows].tolist(),
        "entropy": entropy[rows, pos].tolist() if entropy is not None else [float("nan")] * int(rows.numel()),
        "old_prob": old_logprob[rows, pos].exp().tolist(),
    }
