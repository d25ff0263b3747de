"""ResRL token weights: negative tokens reweighted by their projection residual on
a low-rank subspace of the same group's positive tokens.

Paper: "ResRL: Boosting LLM Reasoning via Negative Sample Projection Residual
Reinforcement Learning" (papers/resrl-summary.txt). Exact recipe: METHODS.md
section 4 (reference code 1229095296/ResRL, `_compute_svd_token_weights`, read to
learn only; nothing here is copied from it).

Idea: a negative token whose hidden state lies close to the subspace spanned by
the group's positive tokens shares their semantics, so its negative gradient is
damped (weight -> `min_w`); a token far from it gets the full negative gradient
(weight -> 1). Positive rows are scaled by `pos_scale` (0.1, as W-REINFORCE).

What this module decides on purpose (all documented in docs/token_weights.md):

- **Grouping.** The reference builds the subspace inside each training
  micro-batch, so a negative row with no same-group positive in its micro-batch
  keeps weight 1. We compute per *whole group over the rows we are given* (the
  trainer passes the update set); query-preserved batching makes the two agree.
- **Skipped groups** (no positive row, no negative row, fewer than 4 positive
  tokens, or no valid negative token) keep weight 1 on *all* their valid tokens, positive rows included.
  (The reference scales every positive row by 0.1 even when its group is
  skipped; under GRPO with binary rewards this only differs for groups with
  < 4 positive tokens.)
- **Degenerate spread.** If hi - lo < 1e-5 every negative token of the group gets
  (1 + min_w) / 2 = 0.55 (METHODS). The reference applies that fallback only
  when the group has >= 32 negative tokens; we apply it always.
- **Numerical rank guard.** Basis directions whose singular value is below
  `1e-5 * s_max` are dropped: they carry no positive-token variance and their
  orientation is set by rounding noise (e.g. duplicated positive responses, or
  k > true rank). For generic full-rank hidden states this changes nothing.
- **Subsampling** of positive tokens beyond `max_pos_tokens` is uniform without
  replacement from `generator` (latest reference); the older reference took
  evenly spaced tokens.
- `is_positive` is supplied by the caller (the dispatcher uses reward > 0.5; the
  reference uses score > 0, the same for {0, 1} rewards).

Try it::

    w, stats = resrl_weights(hidden, mask, group_id, rewards > 0.5)
    token_weight = w   # multiplies the (GRPO) advantage per token
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

__all__ = ["resrl_weights", "positive_subspace"]

# exact SVD when the centred positive matrix is this small along its short side
_EXACT_SVD_MAX_DIM = 256
# directions with singular value below this fraction of the largest are dropped
_REL_RANK_TOL = 1e-5
_LN_EPS = 1e-5


def positive_subspace(
    centred: torch.Tensor,
    rank: int,
    *,
    niter: int = 4,
    svd: str = "auto",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Orthonormal basis of the top principal directions of centred positives.

    centred: [M, H] float32, rows already centred (mean 0 over M).
    Returns V_k: (H, k') with k' <= k = min(rank, M - 1, H); k' < k only when the
    numerical rank guard drops directions with singular value < 1e-5 * s_max.

    svd: "exact" (torch.linalg.svd), "lowrank" (torch.svd_lowrank, randomized
    PCA with `niter` power iterations, seeded from `generator` without touching
    the global RNG state) or "auto" (exact when min(M, H) <= 256).
    """
    if svd not in ("auto", "exact", "lowrank"):
        raise ValueError(f"svd must be 'auto', 'exact' or 'lowrank', got {svd!r}")
    M, H = centred.shape
    k = min(int(rank), M - 1, H)
    if k < 1:
        return centred.new_zeros((H, 0))
    use_exact = svd == "exact" or (svd == "auto" and min(M, H) <= _EXACT_SVD_MAX_DIM)
    if use_exact:
        # centred = U diag(S) Vh; rows of Vh are right singular vectors, S descending
        _, S, Vh = torch.linalg.svd(centred, full_matrices=False)
        S, V = S[:k], Vh[:k].T  # (k,), (H, k)
    else:
        seed = None
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        devices = [centred.device] if centred.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            # randomized PCA: centred ~= U diag(S) V^T, V: (H, k)
            _, S, V = torch.svd_lowrank(centred, q=k, niter=niter)
    if S.numel() == 0 or float(S[0]) <= 0.0:
        return centred.new_zeros((H, 0))
    keep = S > _REL_RANK_TOL * S[0]  # numerical rank guard
    return V[:, keep]


@torch.no_grad()
def resrl_weights(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    group_id: torch.Tensor,
    is_positive: torch.Tensor,
    rank: int = 64,
    max_pos_tokens: int = 8192,
    q_low: float = 0.2,
    q_high: float = 0.8,
    min_w: float = 0.1,
    pos_scale: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    niter: int = 4,
    svd: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """ResRL per-token weights (METHODS.md section 4).

    hidden:      [B, T, H] hidden states (second-to-last layer) at the positions
                 that predict each response token; detached, any float dtype.
    mask:        [B, T] response mask, > 0 = real sampled token.
    group_id:   [B] rows of one prompt share an id.
    is_positive: [B] bool, row counted as a positive (correct) response.

    Returns (weights, stats):
      weights: [B, T] float32 on hidden.device, to multiply the advantage per
        token. Negative rows of processed groups: w in [min_w, 1]; positive rows
        of processed groups: pos_scale; rows of skipped groups: 1; padding: 0.
      stats: resrl_groups (groups processed), resrl_groups_skipped,
        resrl_mean_w_neg (mean weight over valid tokens of negative rows of
        processed groups, nan if none), resrl_time_s.

    The subspace is built per *whole group over the rows given* (see module
    docstring for how this differs from the micro-batch scope of the reference).
    """
    t0 = time.perf_counter()
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    if mask.shape != (B, T):
        raise ValueError(f"mask must be (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    if group_id.shape != (B,) or is_positive.shape != (B,):
        raise ValueError("group_id and is_positive must be [B]")
    if not 0.0 <= q_low <= q_high <= 1.0:
        raise ValueError(f"need 0 <= q_low <= q_high <= 1, got {q_low}, {q_high}")

    device = hidden.device
    valid = mask.to(device) > 0  # [B, T] bool
    is_pos = is_positive.to(device=device, dtype=torch.bool)  # [B]
    gids = group_id.to(device)  # [B]
    weights = valid.to(torch.float32)  # [B, T]: 1 on valid tokens, 0 on padding

    n_done, n_skipped = 0, 0
    neg_w_sum, neg_w_cnt = 0.0, 0
    for g in torch.unique(gids):
        rows = gids == g  # [B]
        pos_rows, neg_rows = rows & is_pos, rows & ~is_pos  # [B], [B]
        if not pos_rows.any() or not neg_rows.any():
            n_skipped += 1
            continue
        # positive tokens of the group, row-major: (M0, H)
        P = hidden[pos_rows][valid[pos_rows]].to(torch.float32)
        M0 = P.shape[0]
        if M0 < 4:
            n_skipped += 1
            continue
        if M0 > max_pos_tokens:
            # uniform subsample without replacement
            gen_dev = generator.device if generator is not None else torch.device("cpu")
            idx = torch.randperm(M0, generator=generator, device=gen_dev)[:max_pos_tokens]
            P = P[idx.to(device)]  # [M, H]

        # LN without affine, then centre by the positive mean
        Pn = F.layer_norm(P, (H,), eps=_LN_EPS)  # [M, H] LN(h), no affine
        mu = Pn.mean(dim=0, keepdim=True)  # (1, H) positive mean
        V = positive_subspace(Pn - mu, rank, niter=niter, svd=svd, generator=generator)  # (H, k)

        # negative tokens: x = LN(h) - mu, e = x - V V^T x, d = ||e||^2 / H
        neg_valid = valid & neg_rows[:, None]  # [B, T]
        if not neg_valid.any():  # negative rows without a single valid token
            n_skipped += 1
            continue
        X = F.layer_norm(hidden[neg_valid].to(torch.float32), (H,), eps=_LN_EPS) - mu  # [N, H]
        E = X - (X @ V) @ V.T  # [N, H] residual off the positive subspace
        d = (E * E).sum(dim=-1) / H  # [N]

        # lo = quantile(d, q_low), hi = quantile(d, q_high), linear interpolation
        lo = torch.quantile(d, q_low)
        hi = torch.quantile(d, q_high)
        if float(hi - lo) < 1e-5:
            w = torch.full_like(d, (1.0 + min_w) / 2.0)  # degenerate spread: 0.55
        else:
            u = ((d - lo) / torch.clamp(hi - lo, min=1e-6)).clamp(0.0, 1.0)  # u = clamp((d-lo)/(hi-lo), 0, 1)
            w = (min_w + (1.0 - min_w) * u).clamp(min_w, 1.0)  # w = min_w + (1 - min_w) u
        weights[neg_valid] = w
        weights[valid & pos_rows[:, None]] = pos_scale  # positives: A x pos_scale
        n_done += 1
        neg_w_sum += float(w.sum())
        neg_w_cnt += int(w.numel())

    stats = {
        "resrl_groups": float(n_done),
        "resrl_groups_skipped": float(n_skipped),
        "resrl_mean_w_neg": neg_w_sum / neg_w_cnt if neg_w_cnt else float("nan"),
        "resrl_time_s": time.perf_counter() - t0,
    }
    return weights, stats
