"""One optimizer step on the policy loss: the only place that runs
zero_grad -> micro-batch forward/backward -> clip -> step.

The trainer, the polarity probe, the masking probe's SGD steps and the value
probe's repeated updates all call `optimizer_step`; they differ only in the
optimizer they pass and in the rows' `old_logprob` / `token_weight`.

    L = sum_micro  policy_loss(micro; normaliser = N)  [+ kl_coef * KL term]
    N = sum over micro-batches of normaliser(loss_mask(micro))   (one mini-batch)

N is computed once for the whole mini-batch, so the gradient is the same
however the rows are cut into micro-batches (tests/test_update.py). Under data
parallelism pass `normaliser=` the all-reduced N of every rank's rows.

Seams for the scale-out issues:
    normaliser      a count from outside (all ranks' tokens); None = these rows
    batch.ratio_weight  [B, T] per-token factor on the clipped term (a truncated
                    sampler/trainer importance weight, e.g. for vLLM rollouts)

Try it:
    spec = LossSpec.from_config(cfg)
    stats = optimizer_step(model, opt, micro_batches(batch, 8), spec, temperature=1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tokencredit.algo.losses import aggregate, kl_penalty, loss_mask, masked_mean, normaliser as local_normaliser, policy_loss
from tokencredit.batch import RolloutBatch
from tokencredit.model.forward import forward_tokens


@dataclass(frozen=True)
class LossSpec:
    """The policy-loss keywords of a run (cfg.algo + token_weights.denominator)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    agg: str = "token-mean"
    denominator: str = "all"  # "all" | "kept": do weight-0 tokens count in N
    kl_coef: float = 0.0
    kl_estimator: str = "k3"

    @classmethod
    def from_config(cls, cfg, with_kl: bool = True) -> "LossSpec":
        """The run's loss; with_kl=False drops the KL term (probes without a reference model)."""
        a = cfg.algo
        return cls(clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip, agg=a.loss_agg,
                   denominator=cfg.token_weights.denominator, kl_coef=a.kl_coef if with_kl else 0.0, kl_estimator=a.kl_estimator)


def micro_batches(batch: RolloutBatch, micro_rows: int) -> list[RolloutBatch]:
    """`batch` cut into consecutive row chunks of at most `micro_rows` rows."""
    if micro_rows < 1:
        raise ValueError(f"micro_rows must be >= 1, got {micro_rows}")
    B = len(batch)
    return [batch.select(list(range(s, min(B, s + micro_rows)))) for s in range(0, B, micro_rows)]


def loss_normaliser(micros: Sequence[RolloutBatch], spec: LossSpec) -> float:
    """N of the mini-batch formed by `micros`: tokens (token-mean) or non-empty rows
    (seq-mean modes) that count under spec.denominator."""
    return sum(local_normaliser(loss_mask(u.response_mask, u.token_weight, spec.denominator), spec.agg) for u in micros)


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micros: Sequence[RolloutBatch],
    spec: LossSpec,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 2048,
    grad_clip: float | None = 1.0,
    normaliser: float | None = None,
    ref_model: torch.nn.Module | None = None,
    train_mode: bool = False,
    grad_sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    zero_weight_micros: Sequence[RolloutBatch] = (),
) -> dict[str, list[float]]:
    """zero_grad, forward + backward of every micro-batch against one normaliser,
    clip, optimizer.step(). Rows need `old_logprob` [B, T] and `advantage` [B]
    (per-token factors go in `token_weight` [B, T]); `token_weight` and
    `ratio_weight` [B, T] are used when set.

    train_mode: the model's mode during the forwards (transformers checkpoints
    activations only in train mode); it is put back in eval mode afterwards.
    grad_sync: called with the parameters after the last backward, before the
    clip (data parallelism without FSDP2: `dist.average_gradients`).
    zero_weight_micros: extra micro-batches run forward and backward with their
    loss multiplied by 0, so that every rank runs the same number of passes per
    optimizer step (FSDP2's gathers and reductions are collectives inside them);
    they change neither the gradient nor the stats.
    Returns stats as lists (one entry per micro-batch; "grad_norm" one entry):
    policy_loss's stats, "pg_loss", "kl" (with ref_model).
    """
    if spec.kl_coef > 0 and ref_model is None:
        raise ValueError("LossSpec.kl_coef > 0 needs ref_model")
    n = loss_normaliser(micros, spec) if normaliser is None else float(normaliser)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    dev = params[0].device
    stats: dict[str, list[float]] = {}
    optimizer.zero_grad(set_to_none=True)
    model.train(train_mode)
    try:
        for i, u in enumerate([*micros, *zero_weight_micros]):
            live = i < len(micros)
            u = u.to(dev)
            lp = forward_tokens(model, u, temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=False)["logprob"]  # [b, t]
            t = lp.shape[1]
            loss, st = policy_loss(
                lp, u.old_logprob[:, :t], u.advantage, u.response_mask,
                clip_low=spec.clip_low, clip_high=spec.clip_high, dual_clip=spec.dual_clip, agg=spec.agg,
                token_weight=u.token_weight, denominator=spec.denominator, normaliser=n, ratio_weight=u.ratio_weight,
            )
            st["pg_loss"] = float(loss.detach())
            if spec.kl_coef > 0:
                with torch.no_grad():
                    ref = forward_tokens(ref_model, u, temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=False)["logprob"]
                kl = kl_penalty(lp, ref.to(dev), spec.kl_estimator)  # [b, t]
                lm = loss_mask(u.response_mask, u.token_weight, spec.denominator)
                loss = loss + spec.kl_coef * aggregate(kl, lm, spec.agg, n)
                st["kl"] = float(masked_mean(kl.detach(), u.response_mask))
            (loss if live else loss * 0.0).backward()
            if not live:
                continue
            for k, v in st.items():
                stats.setdefault(k, []).append(float(v))
    finally:
        model.eval()
    if grad_sync is not None:
        grad_sync(params)
    if grad_clip is not None:
        stats["grad_norm"] = [float(torch.nn.utils.clip_grad_norm_(params, grad_clip))]
    optimizer.step()
    return stats
