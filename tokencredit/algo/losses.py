"""Clipped policy-gradient surrogate with clip-higher, dual-clip, per-token weights,
and the one function that owns the loss normaliser.

METHODS.md section 1 (cancellation paper Eq. 15; DAPO's clip-higher; dual-clip of
Ye et al. 2020 as verl implements it):
    rho(i,t)  = exp(l(i,t) - l_old(i,t))
    A'(i,t)   = A_i * w(i,t)                       token weights multiply A
    loss(i,t) = -min(rho A', clip(rho, 1 - eps_low, 1 + eps_high) A')
    dual-clip (A' < 0): loss = min(loss, -c A')    caps the penalty when rho >> 1

Aggregation (`agg`), all over the tokens that count (see below):
    token-mean            sum_{i,t} loss / #tokens                       (DAPO, default)
    seq-mean-token-mean   mean_i ( sum_t loss / #tokens_i )              (original GRPO)
    seq-mean-token-sum    mean_i ( sum_t loss )                          (Dr.GRPO-style)

Which tokens count (`denominator`, the config's `token_weights.denominator`):
`mask` always; a token whose weight is 0 is removed from the gradient, and
    "all"  (default) it still counts: the 80/20 paper's objective divides by all
           response tokens;
    "kept" it is removed from the count as well.

Gradient accumulation and data parallelism: pass `normaliser` = the count for the
whole mini-batch (tokens for token-mean, rows for seq-mean modes; `normaliser()`
of each micro-batch, summed, or all-reduced over ranks) so that the micro-batch
losses *sum* to the mini-batch loss; `aggregate` then divides by that instead of
the local count. Tests check the gradient is the same however a batch is cut.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
DENOMINATORS = ("all", "kept")


def loss_mask(mask: torch.Tensor, token_weight: torch.Tensor | None, denominator: str = "all") -> torch.Tensor:
    """[B, T] float: tokens that count in the normaliser. denominator "all": every
    response token; "kept": only those whose token weight is nonzero."""
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown denominator {denominator!r}; valid: {', '.join(DENOMINATORS)}")
    m = mask.to(torch.float32)
    if token_weight is not None and denominator == "kept":
        m = m * (token_weight != 0).to(m.dtype)
    return m


def normaliser(mask: torch.Tensor, agg: str) -> float:
    """The local normaliser of `aggregate` for this batch ([B, T] mask from `loss_mask`)."""
    if agg == "token-mean":
        return float(mask.sum().item())
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float((mask.sum(-1) > 0).sum().item())
    raise ValueError(f"unknown agg {agg!r}; valid: {', '.join(AGG_MODES)}")


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", normaliser: float | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar. The only place that normalises.

    `mask` [B, T] marks tokens that count. `normaliser` overrides the local count
    (tokens for token-mean, non-empty rows for seq-mean modes) for gradient
    accumulation across micro-batches / ranks.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; valid: {', '.join(AGG_MODES)}")
    d = _local_normaliser(mask, agg) if normaliser is None else float(normaliser)
    if d <= 0:
        return (loss_tok * 0.0).sum()  # keeps the graph, zero gradient
    masked = loss_tok * mask
    if agg == "token-mean":
        return masked.sum() / d
    seq = masked.sum(-1)  # [B]
    if agg == "seq-mean-token-mean":
        seq = seq / mask.sum(-1).clamp(min=1)
    return seq.sum() / d


def policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantage: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    token_weight: torch.Tensor | None = None,
    *,
    denominator: str = "all",
    normaliser: float | None = None,
    ratio_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate loss (to minimise).

    Args:
        logprob: [B, T] current log-probs of the sampled tokens (with grad).
        old_logprob: [B, T] log-probs at the start of the update (no grad).
        advantage: [B] per row or [B, T] per token.
        mask: [B, T] 1 for real response tokens.
        clip_low / clip_high: eps_low / eps_high of clip(rho, 1-eps_low, 1+eps_high).
        dual_clip: c > 1 caps the loss of A < 0 tokens at -c*A (None = off).
        agg: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum".
        token_weight: [B, T] multiplies A per token (forking masks, ResRL, ...).
        denominator: "all" counts weight-0 tokens in the normaliser (80/20 paper
            form), "kept" does not.
        normaliser: the count for the whole mini-batch (all ranks) when this is one
            micro-batch of it; None = this batch's own count.
        ratio_weight: [B, T] per-token factor on the clipped term, no gradient
            through it (e.g. a truncated sampler/trainer importance weight); None = 1.
    Returns:
        (loss scalar, stats dict of floats: clipfrac, clipfrac_low, clipfrac_high,
         dual_clipfrac, approx_kl, ratio_mean, ratio_max)
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    adv = advantage.to(logprob.dtype)
    if adv.ndim == 1:
        adv = adv[:, None].expand_as(logprob)  # [B] -> [B, T]
    if token_weight is not None:
        adv = adv * token_weight.to(adv.dtype)
    m = mask.to(logprob.dtype)
    log_ratio = (logprob - old_logprob).clamp(-20.0, 20.0)  # [B, T]; clamp guards exp overflow only
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(pg1, pg2)  # = -min(rho A, clip(rho) A)
    dual_active = torch.zeros_like(loss_tok, dtype=torch.bool)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_active = (adv < 0) & (loss_tok > pg3)
        loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, pg3), loss_tok)
    if ratio_weight is not None:
        loss_tok = loss_tok * ratio_weight.detach().to(loss_tok.dtype)

    lm = loss_mask(m, token_weight, denominator)
    loss = aggregate(loss_tok, lm, agg, normaliser)

    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = (pg2 > pg1) & (m > 0)
        low = clipped & (ratio < 1.0 - clip_low)
        high = clipped & (ratio > 1.0 + clip_high)
        stats = {
            "clipfrac": float(clipped.sum() / n),
            "clipfrac_low": float(low.sum() / n),
            "clipfrac_high": float(high.sum() / n),
            "dual_clipfrac": float((dual_active & (m > 0)).sum() / n),
            "approx_kl": float(((old_logprob - logprob) * m).sum() / n),  # k1 estimate of KL(old || new)
            "ratio_mean": float((ratio * m).sum() / n),
            "ratio_max": float(ratio.masked_fill(m == 0, 0).max()) if m.numel() else 0.0,
        }
    return loss, stats


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """[B, T] per-token estimate of KL(pi || pi_ref) from sampled tokens.

    k1: log pi - log pi_ref (unbiased, can be negative);
    k3: exp(ref - l) - (ref - l) - 1 (Schulman's non-negative, low-variance estimator).
    """
    d = ref_logprob - logprob
    if kind == "k1":
        return -d
    if kind == "k3":
        d = d.clamp(-20.0, 20.0)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


_local_normaliser = normaliser  # `aggregate` and `policy_loss` take an argument of that name
