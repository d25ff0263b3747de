"""Polarity comparison (cancellation paper Alg. 2, App. E.1, Fig. 1(d), Fig. 4).

What it does
    From one saved state theta_0 and one rollout batch B, apply the update
    twice, each time from theta_0:

        GRPO (joint)    with the batch's advantages A_i
        positive-only   with A+_i = A_i * 1[A_i > 0]

    and measure Delta log p(i,t) = log pi_new(o_it) - log pi_theta_0(o_it) on the
    *full* batch B for both (Alg. 2 lines 9 and 12), both from the training
    forward. The summary is Fig. 1(d): the boosted / suppressed / stable
    fractions (``flip_stats``, eps 1e-6) for rows with A > 0, A < 0 and all
    rows, per variant; the per-token table feeds Fig. 4's category masses
    (``tokencredit.probes.categories.category_mass``).

    Positive-only: the paper writes A+ = A * 1[r = 1]. With binary rewards and
    group-normalised advantages that is the same set of rows (a group whose
    rewards are all equal has A = 0 either way); A > 0 is used here so that
    non-binary rewards also work.

Updates (``update=``), both one ``tokencredit.update.optimizer_step``
    "sgd"    one plain SGD ascent step on Eq. 2, J = 1/N sum A_k log pi(o_k),
             lr default 0.1 as in App. D.2 (``masking.sgd_step``: torch SGD on
             the clipped surrogate at rho = 1, whose gradient is Eq. 2's; N =
             all response tokens, no grad clip).
    "adamw"  one AdamW step on the clipped surrogate (``policy_loss``, rho = 1
             at theta_0 so clipping is inactive) over the whole batch, global
             grad-norm clip, the run's lr / betas / weight decay and, if given,
             the optimizer state saved in the checkpoint: the next training
             step's optimizer, minus its mini-batch split.
    a callable  update(model, batch, advantage [B]) -> None, in place.

    micro_rows (rows per forward / backward) only bounds memory: every forward
    and backward of the probe runs in micro-batches of that many rows.

Simplifications
    * One optimizer step on the whole batch (the trainer may split a rollout
      batch into several mini-batch steps; KL is not applied, and token
      weights only by "sgd", through Eq. 2's weights ``masking.eq2_weights``).
    * Both updates run on deepcopies: the caller's model (and the optimizer
      state passed in) are never modified.

Try it
    from tokencredit.probes.polarity import polarity_probe
    table, summary = polarity_probe(model, batch, update="sgd", lr=0.1)
    summary["grpo"]["flip_pos_boosted"], summary["positive_only"]["flip_neg_suppressed"]
    tokencredit probe polarity --run RUN_DIR            # AdamW with the checkpoint's optimizer state
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch

from tokencredit.batch import RolloutBatch
from tokencredit.model.forward import forward_rows
from tokencredit.probes.flip import flip_stats
from tokencredit.probes.masking import _eval_mode, eq2_weights, sgd_step
from tokencredit.update import LossSpec, micro_batches, optimizer_step

__all__ = ["positive_only", "sgd_update", "adamw_update", "polarity_probe", "VARIANTS"]

VARIANTS = ("grpo", "positive_only")
UpdateFn = Callable[[torch.nn.Module, RolloutBatch, torch.Tensor], None]


def positive_only(advantage: torch.Tensor) -> torch.Tensor:
    """A+ = A * 1[A > 0] (Alg. 2 line 7). Same shape as `advantage` ([B] or [B, T])."""
    return torch.where(advantage > 0, advantage, torch.zeros_like(advantage))


def sgd_update(lr: float = 0.1, *, temperature: float = 1.0, chunk_tokens: int = 1024, micro_rows: int = 8) -> UpdateFn:
    """One plain SGD ascent step on Eq. 2 (N = all response tokens), every trainable
    parameter: ``masking.sgd_step``, i.e. ``optimizer_step`` with torch SGD(lr)."""

    def update(model, batch, advantage):
        sgd_step(model, batch, eq2_weights(batch, advantage), lr, temperature=temperature, chunk_tokens=chunk_tokens, micro_rows=micro_rows)

    return update


def adamw_update(
    lr: float | None = None,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    spec: LossSpec | None = None,
    optimizer_state: dict | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    micro_rows: int = 8,
) -> UpdateFn:
    """One AdamW step on ``policy_loss`` over the whole batch (old log-probs =
    the model's own at the start, so rho = 1): ``tokencredit.update.optimizer_step``
    in micro-batches of `micro_rows` rows, token-mean normaliser over the whole
    batch, every token counted (the batch's token weights are not applied).

    spec: the loss (default LossSpec(): clip 0.2 / 0.28, token-mean; a run's is
    ``LossSpec.from_config(cfg, with_kl=False)``).
    optimizer_state: a ``torch.optim.AdamW.state_dict()`` over the model's
    trainable parameters in ``model.parameters()`` order (the trainer's
    checkpoint holds one); it is deep-copied, never modified. lr: None = the
    state's lr (error if there is no state), else overrides it.
    """
    if lr is None and optimizer_state is None:
        raise ValueError("adamw_update needs lr or optimizer_state")

    spec = spec or LossSpec()

    def update(model, batch, advantage):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr if lr is not None else 0.0, betas=betas, weight_decay=weight_decay)
        if optimizer_state is not None:
            opt.load_state_dict(copy.deepcopy(optimizer_state))
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = lr
        kw = dict(temperature=temperature, chunk_tokens=chunk_tokens)
        rows = dataclasses.replace(batch, advantage=advantage, token_weight=None, ratio_weight=None)
        rows.old_logprob = forward_rows(model, rows, micro_rows=micro_rows, with_entropy=False, **kw)["logprob"]  # [B, T]: rho = 1
        with _eval_mode(model):
            optimizer_step(model, opt, micro_batches(rows, micro_rows), spec, grad_clip=grad_clip, **kw)
        opt.zero_grad(set_to_none=True)

    return update


def polarity_probe(
    model,
    batch: RolloutBatch,
    *,
    advantage: torch.Tensor | None = None,
    update: str | UpdateFn = "sgd",
    lr: float | None = 0.1,
    eps: float = 1e-6,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    micro_rows: int = 8,
    **update_kw: Any,
) -> tuple[dict[str, list], dict[str, Any]]:
    """Alg. 2: the GRPO and the positive-only update from the same state, Delta
    log p of both on the full batch. The caller's model is not modified.

    advantage: [B] per row (default ``batch.advantage``); rows are split into
    A > 0 / A < 0 by these for both variants. update: "sgd" | "adamw" |
    callable (see module docstring); extra keyword arguments go to
    ``adamw_update``.
    Returns (table, summary):
        table    columns, one entry per response token: row, position,
                 token_id, advantage, advantage_pos, reward (NaN if absent),
                 old_logprob, delta_grpo, delta_positive_only
        summary  {"grpo": flip_stats, "positive_only": flip_stats,
                  "sign_agreement": fraction of tokens whose two deltas share
                  a sign, "rows_pos", "rows_neg", "rows_zero", "tokens",
                  "update", "lr", "eps"}
    """
    adv = batch.advantage if advantage is None else advantage
    if adv is None:
        raise ValueError("the batch has no advantage; pass advantage=")
    if adv.ndim != 1:
        raise ValueError(f"polarity_probe expects per-row advantages [B], got {tuple(adv.shape)}")
    kw = dict(temperature=temperature, chunk_tokens=chunk_tokens, micro_rows=micro_rows)
    if update == "sgd":
        fn = sgd_update(0.1 if lr is None else lr, **kw)
    elif update == "adamw":
        fn = adamw_update(lr, **kw, **update_kw)
    elif callable(update):
        fn = update
    else:
        raise ValueError(f"unknown update {update!r}; valid: sgd, adamw or a callable")

    def logprob(m):  # [B, T] no-grad log-probs of the whole batch
        return forward_rows(m, batch, with_entropy=False, **kw)["logprob"]

    before = logprob(model)  # [B, T]  Alg. 2 line 5
    deltas: dict[str, torch.Tensor] = {}
    for name, a in (("grpo", adv), ("positive_only", positive_only(adv))):
        m = copy.deepcopy(model)  # theta_0 for each variant (Alg. 2 lines 6, 10)
        fn(m, batch, a.clone())
        deltas[name] = logprob(m) - before  # measured on the full batch
        del m

    mask = batch.response_mask > 0
    rows, pos = mask.nonzero(as_tuple=True)
    nan = float("nan")
    table = {
        "row": rows.tolist(),
        "position": pos.tolist(),
        "token_id": batch.response_ids[rows, pos].tolist(),
        "advantage": adv[rows].tolist(),
        "advantage_pos": positive_only(adv)[rows].tolist(),
        "reward": batch.reward[rows].tolist() if batch.reward is not None else [nan] * rows.numel(),
        "old_logprob": before[rows, pos].tolist(),
        "delta_grpo": deltas["grpo"][rows, pos].tolist(),
        "delta_positive_only": deltas["positive_only"][rows, pos].tolist(),
    }
    dg, dp = deltas["grpo"][rows, pos], deltas["positive_only"][rows, pos]
    summary: dict[str, Any] = {
        "grpo": flip_stats(deltas["grpo"], adv, batch.response_mask, eps),
        "positive_only": flip_stats(deltas["positive_only"], adv, batch.response_mask, eps),
        "sign_agreement": float((torch.sign(dg) == torch.sign(dp)).double().mean()) if dg.numel() else nan,
        "rows_pos": int((adv > 0).sum()),
        "rows_neg": int((adv < 0).sum()),
        "rows_zero": int((adv == 0).sum()),
        "tokens": int(rows.numel()),
        "update": update if isinstance(update, str) else getattr(update, "__name__", "callable"),
        "lr": lr,
        "eps": eps,
    }
    return table, summary
