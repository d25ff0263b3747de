"""Masking-effect probe (cancellation paper Table 1, Sec. 2) and the LM-head vs
full-parameter sign agreement (App. D.1, Fig. 10).

What it does
    One plain SGD ascent step (lr 0.1, no momentum; App. D.2) on the weighted
    token log-likelihood

        J(theta) = 1/N sum_k A_k log pi_theta(o_k | s_k)                  (Eq. 2)

    over the N response tokens of a rollout batch, theta' = theta + lr grad J
    (Eq. 3). For a candidate token c and a token set M(c), the *masked* update
    drops the terms k in M(c) from the sum, keeping the normaliser N (so masking
    only removes terms and the other tokens' weights are unchanged):

        theta'_M = theta + lr/N sum_{k not in M} A_k g_k = theta' - lr/N sum_{k in M} A_k g_k
        delta_M(c) = log pi_theta'(c | s_c) - log pi_theta'_M(c | s_c)    (Masking Effect)

    delta > 0: the removed tokens would have raised c's log-prob. Per mask set,
    Boost Rate = fraction of candidates with delta > 0 and Mean Boost = mean
    delta. Only tokens *in the loss* (A_k != 0; rows of all-equal-reward
    groups have A = 0, and removing a term that is 0 changes nothing) are
    masked. Candidates are response tokens (any A) with at least one other
    in-loss token of the same id; the four sets of Table 1 (rows: same
    token? x low confidence?):

        random               |S| tokens drawn uniformly from the in-loss tokens
                             with a different id
        same_token           S = every other in-loss token with c's id
        low_conf             min(|S|, #pool) tokens drawn uniformly from the
                             low-confidence in-loss tokens with a different id
        same_token&low_conf  S restricted to low-confidence tokens

    "Different id" for random and low_conf: issue 5's "other tokens" read so
    that rows 1 and 3 of Table 1 contain no same-token pair (the paper's
    batches are large enough that a random draw almost never hits one; in a
    small batch a frequent id would otherwise leak coupled tokens into the
    control rows).

    Low confidence (``low_confidence``): confidence="prob" (default): old
    prob pi_theta(o_k | s_k) < threshold (default 0.5); confidence="entropy":
    entropy H(pi_theta(. | s_k)) above the `threshold`-quantile of the batch's
    response-token entropies (default 0.5: the median). By default it is a
    property of the masked tokens only (the candidate's own confidence is
    recorded, not filtered on); pair=True is the paper's pair condition
    (Fig. 2: *both* tokens low confidence): the two low-confidence sets of a
    candidate that is not itself low confidence are empty, so those rows
    hold only low-confidence candidates. A candidate whose set is empty has
    delta = 0 exactly; it is left out of that set's statistics (every table
    row carries its n).

Readings (the paper does not state its protocol; all are reported)
    To first order delta_M(c) = lr/N sum_{k in M} A_k <g_c, g_k>, and for a
    same-token (low-confidence) copy <g_c, g_k> > 0: a masked copy with
    A_k > 0 pushes delta up, one with A_k < 0 pushes it down. So the sign of
    delta mostly follows the sign of the masked set's net weight sum_M A_k.

        all      M as drawn (every sign): Boost Rate = fraction of candidates
                 whose masked set is net positive, i.e. it measures the
                 batch's sign mix (~50% or less when negative rollouts carry
                 most |A|), not the coupling itself.
        pos      M restricted to its A_k > 0 tokens (a separate masked update;
                 coupled sets: Boost Rate near 100% expected; random sets:
                 weak coupling of either sign)
        neg      M restricted to its A_k < 0 tokens (coupled: near 0%)
        aligned  M as drawn, but a candidate counts as boosted when
                 sign(sum_{k in M} A_k) * delta > 0 and Mean Boost is the mean
                 of sign(sum_M A_k) * delta ("did the masked tokens push c in
                 the direction of their net advantage"); a set with
                 sum_M A_k = 0 counts as not boosted.

    pos / neg are separate masked updates (delta is not additive in M); they
    cost one more LM-head term per set, and on the full path one more
    backward per set (the all-signs gradient is their sum, g_M = g_M+ + g_M-,
    exact because every gradient is taken at theta).

Two update kinds
    lm_head  only the LM-head weight W moves; the decoder (hence the final
             hidden states h) is fixed. With tied embeddings this is the
             *untied* head: W is cloned into its own parameter (the input
             embedding stays at theta), which is what ``untie_lm_head`` builds
             for the brute-force reference. The head outputs u = W h + b are
             linear in W, so the update is exact in closed form (no Taylor
             step):
                 u'_c   = u_c + lr/N sum_k   A_k <h_k, h_c> rho_k   = u_c + lr/N G h_c
                 u^M_c  = u'_c - lr/N sum_{k in M} A_k <h_k, h_c> rho_k
             and log pi = log softmax(z), z = softcap(logit_scale u) /
             temperature, with rho_k = d log pi_k(o_k) / d u_k (rho_k = r_k =
             e_{o_k} - pi_k without scale, softcap and temperature) and G the
             LM-head gradient ``lm_head.lm_head_grad`` (Eq. 6-9 without the
             first-order approximation); cost O(N V d) once plus O(|M| V)
             per set.
    full     every trainable parameter (requires_grad) moves, tied weights as
             the model has them. theta' needs one backward over the batch; each
             (candidate, set) needs the gradient of the masked terms only
             (theta'_M = theta' - lr g_M, "full minus masked"): one forward
             over the rows that hold any of the candidate's four sets, each row
             cut after its last masked token (causal LM: later tokens cannot
             matter), one backward per set through that graph, then one
             forward of c's row (cut after c) per set. Cost per candidate:
             about 1 forward + 4 backward passes over the batch (~30-50 s for
             SmolLM2-135M and 32 short rows on 1 CPU thread; 8 backward with
             the sign readings pos / neg, see Readings): cap the candidates
             (``n_full``).

    Sign agreement (App. D.1): the fraction of all N tokens whose Delta log p
    has the same sign (torch.sign, so 0 is its own sign) under the full step
    and under the LM-head-only step, same lr, same batch.

Simplifications
    * The update is the plain Eq. 2 step: no ratio/clip (at the start of an
      update rho = 1, so the clipped surrogate has the same gradient; the
      steps run through ``tokencredit.update.optimizer_step`` with SGD), no
      token weights other than ``batch.token_weight`` if present, no KL.
    * Log-probs are at ``temperature`` (pass the run's rollout temperature;
      1.0 is the paper's setting), with the model's logit scale and softcap.
    * The caller's model is only read (gradients via torch.autograd.grad, no
      .grad is written); the full path updates a deepcopy.

Try it
    from tokencredit.probes.masking import masking_probe
    tables, summary = masking_probe(model, batch, n_candidates=64, n_full=8)
    summary["table"]            # Table 1 rows: one per (reading, set), each with its n
    summary["sign_agreement"]   # App. D.1
    tokencredit probe masking --run RUN_DIR --candidates 64 --full-candidates 8
    tokencredit probe masking --run RUN_DIR --confidence entropy --low-conf 0.8 --pair
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Sequence

import torch

from tokencredit.batch import RolloutBatch
from tokencredit.model.forward import forward_rows, forward_tokens, lm_head_inputs
from tokencredit.probes.lm_head import dense_scores, lm_head_grad, lm_head_of, score_rows
from tokencredit.update import LossSpec, micro_batches, optimizer_step

__all__ = [
    "SET_NAMES",
    "SET_CONDITIONS",
    "READINGS",
    "CONFIDENCE",
    "eq2_weights",
    "eq2_grads",
    "sgd_step",
    "untie_lm_head",
    "select_candidates",
    "low_confidence",
    "build_mask_sets",
    "split_by_sign",
    "lm_head_masking",
    "full_masking",
    "boost_stats",
    "sign_aligned",
    "sign_agreement",
    "masking_probe",
]

# Table 1 rows, in the paper's order: (same token?, low confidence?)
SET_NAMES = ("random", "same_token", "low_conf", "same_token&low_conf")
SET_CONDITIONS = {"random": (False, False), "same_token": (True, False), "low_conf": (False, True), "same_token&low_conf": (True, True)}
# readings of each set (module docstring): all signs, A>0 copies only, A<0 copies only, sign-aligned
READINGS = ("all", "pos", "neg", "aligned")
SIGN_PARTS = ("pos", "neg")  # restricted sets are named f"{set}:{part}"
CONFIDENCE = ("prob", "entropy")


# ----------------------------------------------------------------------------
# Eq. 2 objective, its gradient, one SGD step
# ----------------------------------------------------------------------------


def eq2_weights(batch: RolloutBatch, advantage: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] float32 per-token weight A_k of Eq. 2: the row advantage [B] or a
    per-token one [B, T], times ``batch.token_weight`` if set, 0 off the
    response mask. ``advantage`` defaults to ``batch.advantage``."""
    adv = batch.advantage if advantage is None else advantage
    if adv is None:
        raise ValueError("the batch has no advantage; pass advantage=")
    m = batch.response_mask.to(torch.float32)  # [B, T]
    a = adv.to(torch.float32)
    a = a[:, None].expand_as(m) if a.ndim == 1 else a  # [B] -> [B, T]
    if batch.token_weight is not None:
        a = a * batch.token_weight.to(torch.float32)
    return a * m


def _rows_upto(batch: RolloutBatch, rows: Sequence[int] | torch.Tensor, last: Sequence[int] | torch.Tensor) -> RolloutBatch:
    """Rows `rows` of `batch`, row i cut after response position last[i].

    Response columns keep their positions (column t is still token t); the
    mask is 0 after `last` (and was already 0 on padding). Because the mask is
    also the attention mask of the response part and the LM is causal, every
    kept token's log-prob is the same as in the full row.
    """
    rows = torch.as_tensor(rows, dtype=torch.long).view(-1)
    last = torch.as_tensor(last, dtype=torch.long).view(-1)
    sub = batch.select(rows)
    T = int(last.max()) + 1
    mask = sub.response_mask[:, :T].clone()  # [b, T]
    mask[torch.arange(T)[None, :] > last[:, None]] = 0
    return RolloutBatch(
        prompt_ids=sub.prompt_ids, prompt_mask=sub.prompt_mask, response_ids=sub.response_ids[:, :T],
        response_mask=mask, group_id=sub.group_id, pad_id=sub.pad_id,
    )


@contextlib.contextmanager
def _grad_only(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
    """Inside: exactly `params` require grad (no other parameter of `model`
    accumulates a .grad); every requires_grad flag is restored afterwards."""
    keep = {id(p) for p in params}
    saved = {id(p): (p, p.requires_grad) for p in list(model.parameters()) + list(params)}
    try:
        for p, _ in saved.values():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, r in saved.values():
            p.requires_grad_(r)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Run in eval mode (no dropout), restore the caller's mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _trainable(model) -> tuple[list[str], list[torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameter (requires_grad)")
    return [n for n, _ in named], [p for _, p in named]


def eq2_grads(
    model,
    batch: RolloutBatch,
    weights: Sequence[torch.Tensor],
    norm: float,
    params: Sequence[torch.nn.Parameter] | None = None,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    micro_rows: int = 8,
) -> list[list[torch.Tensor]]:
    """grad_theta (1/norm) sum_{b,t} w[b,t] log pi(o_{b,t} | s_{b,t}) for each w in
    `weights` (K tensors [B, T]; 0 = term not in the sum)   (Eq. 2, Eq. 3).

    One forward per row micro-batch serves all K sums (one backward each, the
    graph retained between them). Only rows with a nonzero weight in some w
    are run, each cut after its last nonzero weight (``_rows_upto``).
    params: default every trainable parameter. Uses torch.autograd.grad, so
    the model's .grad fields are not touched. Returns K lists with one tensor
    per parameter (zeros where a w has no nonzero term). Memory: K gradients.
    """
    if params is None:
        _, params = _trainable(model)
    K = len(weights)
    grads = [[torch.zeros_like(p) for p in params] for _ in range(K)]
    if K == 0:
        return grads
    m = batch.response_mask.to(torch.float32)
    w = torch.stack([x.to(torch.float32) * m for x in weights])  # [K, B, T]
    nz = w != 0
    any_nz = nz.any(0)  # [B, T]
    rows = any_nz.any(1).nonzero().view(-1)  # rows with a term
    if rows.numel() == 0:
        return grads
    T = w.shape[2]
    last = torch.where(any_nz, torch.arange(T)[None, :], -1).amax(1)  # [B] last term per row
    dev = params[0].device
    with _eval_mode(model), torch.enable_grad():
        for s in range(0, rows.numel(), micro_rows):
            r = rows[s : s + micro_rows]
            active = [k for k in range(K) if bool(nz[k, r].any())]
            sub = _rows_upto(batch, r, last[r])
            lp = forward_tokens(model, sub, temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=False)["logprob"]
            for j, k in enumerate(active):
                J = (lp * w[k, r, : lp.shape[1]].to(dev)).sum() / norm  # Eq. 2 restricted to these rows
                gs = torch.autograd.grad(J, params, retain_graph=j < len(active) - 1, allow_unused=True)
                for acc, g in zip(grads[k], gs):
                    if g is not None:
                        acc.add_(g)
    return grads


def sgd_step(
    model,
    batch: RolloutBatch,
    weights: torch.Tensor,
    lr: float,
    *,
    norm: float | None = None,
    params: str | Sequence[torch.nn.Parameter] = "trainable",
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    micro_rows: int = 8,
) -> None:
    """In place: theta <- theta + lr * grad J (Eq. 3; plain SGD ascent, no momentum).

    One ``tokencredit.update.optimizer_step`` with ``torch.optim.SGD(params, lr)``
    on the clipped surrogate with A_k = `weights` [B, T] (passed as token
    weights of rows with advantage 1) and old log-probs = the model's own
    (rho = 1, where the surrogate's gradient is Eq. 2's), normaliser `norm`
    (denominator "all"), no grad clip. Only rows with a nonzero weight
    run, each cut after its last one (``_rows_upto``; N is unchanged).
    norm: Eq. 2's N, default the number of response tokens of `batch`.
    params: "trainable" (every requires_grad parameter), "lm_head" (the output
    embedding weight only; refuses a head tied to the input embedding, see
    ``untie_lm_head``) or an explicit list; no other parameter gets a .grad.
    Pass a copy if the model must survive. The model's train/eval mode is kept.
    """
    if params == "trainable":
        _, plist = _trainable(model)
    elif params == "lm_head":
        W = model.get_output_embeddings().weight
        emb = model.get_input_embeddings().weight
        if W is emb or W.data_ptr() == emb.data_ptr():
            raise ValueError("the LM head is tied to the input embedding; call untie_lm_head(model) first")
        plist = [W]
    else:
        plist = list(params)
    n = float(batch.response_mask.sum()) if norm is None else float(norm)
    w = weights.to(torch.float32) * batch.response_mask.to(torch.float32)  # [B, T]
    nz = w != 0
    rows = nz.any(1).nonzero().view(-1)  # rows with a term
    if rows.numel() == 0:
        return  # grad J = 0
    T = w.shape[1]
    last = torch.where(nz, torch.arange(T)[None, :], -1).amax(1)  # [B] last term per row
    sub = _rows_upto(batch, rows, last[rows])
    # A_k as token_weight [b, T'] with row advantage 1 (a [B, T] token field, trimmed with the micro-batches)
    sub.advantage = torch.ones(rows.numel())  # [b]
    sub.token_weight = w[rows, : sub.response_ids.shape[1]]  # [b, T'] Eq. 2's A_k, batch token weights folded in
    kw = dict(temperature=temperature, chunk_tokens=chunk_tokens)
    sub.old_logprob = forward_rows(model, sub, micro_rows=micro_rows, with_entropy=False, **kw)["logprob"]  # [b, T'], rho = 1
    opt = torch.optim.SGD(plist, lr=lr)
    with _eval_mode(model), _grad_only(model, plist):
        optimizer_step(model, opt, micro_batches(sub, micro_rows), LossSpec(), grad_clip=None, normaliser=n, **kw)
    opt.zero_grad(set_to_none=True)


def untie_lm_head(model) -> torch.nn.Module:
    """A deepcopy whose LM-head weight is its own Parameter (a clone), so an
    LM-head-only update leaves the input embedding (hence h) unchanged. Only
    the head is trainable in the copy. The original model is not touched."""
    m = copy.deepcopy(model)
    head = m.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    if getattr(m.config, "tie_word_embeddings", False):
        m.config.tie_word_embeddings = False  # keep transformers from re-tying it
    m.requires_grad_(False)
    head.weight.requires_grad_(True)
    return m


# ----------------------------------------------------------------------------
# candidates and mask sets
# ----------------------------------------------------------------------------


def select_candidates(
    ids: torch.Tensor, n: int, generator: torch.Generator | None = None, in_loss: torch.Tensor | None = None
) -> torch.Tensor:
    """[C] long: up to `n` flat token indices drawn uniformly without replacement
    among tokens that have at least one *other* token with the same id in the
    loss. ids [N]; in_loss [N] bool, default all (tokens with A_k != 0 are the
    ones Eq. 2 sums over). Random order, so a prefix is again a uniform sample."""
    il = torch.ones_like(ids, dtype=torch.bool) if in_loss is None else in_loss.bool()
    counts = torch.bincount(ids[il], minlength=int(ids.max()) + 1)  # in-loss tokens per id
    others = counts[ids] - il.long()  # other in-loss tokens with my id
    eligible = (others >= 1).nonzero().view(-1)
    perm = torch.randperm(eligible.numel(), generator=generator)
    return eligible[perm[:n]]


def low_confidence(
    old_prob: torch.Tensor, entropy: torch.Tensor | None = None, confidence: str = "prob", threshold: float = 0.5
) -> tuple[torch.Tensor, float]:
    """(low [N] bool, cut): which response tokens count as low confidence.

    old_prob [N] pi(o_k | s_k), entropy [N] H(pi(. | s_k)), both over the
    batch's response tokens (flat, padding already dropped).
        confidence="prob"     low = old_prob < threshold; cut = threshold
                              (a probability in (0, 1])
        confidence="entropy"  low = entropy > cut, cut = the `threshold`-
                              quantile (in [0, 1), linear interpolation) of
                              the entropies: threshold 0.8 = the top ~20%
    """
    if confidence not in CONFIDENCE:
        raise ValueError(f"confidence must be one of {CONFIDENCE}, got {confidence!r}")
    if confidence == "prob":
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"a probability threshold must be in (0, 1], got {threshold}")
        return old_prob < threshold, float(threshold)
    if entropy is None:
        raise ValueError('confidence="entropy" needs the entropies [N]')
    if entropy.shape != old_prob.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and old_prob {tuple(old_prob.shape)} differ in shape")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"an entropy quantile must be in [0, 1), got {threshold}")
    if entropy.numel() == 0:
        return torch.zeros(0, dtype=torch.bool), float("nan")
    cut = float(torch.quantile(entropy.double(), threshold))
    return entropy > cut, cut


def build_mask_sets(
    ids: torch.Tensor,
    low: torch.Tensor,
    candidates: torch.Tensor,
    generator: torch.Generator | None = None,
    in_loss: torch.Tensor | None = None,
    *,
    pair: bool = False,
) -> dict[str, list[torch.Tensor]]:
    """The four Table 1 sets for each candidate c, drawn from the tokens in the loss.

    same_token           S = in-loss tokens k != c with o_k = o_c
    same_token&low_conf  S restricted to low-confidence tokens
    random               |S| tokens drawn uniformly from the in-loss tokens with
                         a different id (so rows 1 and 3 of Table 1 hold no
                         same-token pair and are disjoint from rows 2 and 4)
    low_conf             min(|S|, #pool) tokens drawn uniformly from the in-loss
                         tokens with a different id and low confidence
    pair=True: the two low-confidence sets are empty unless c itself is low
    confidence (the paper's "both tokens" condition).

    ids [N] token ids, low [N] bool (``low_confidence``), candidates [C]
    flat indices, in_loss [N] bool (default all). Returns {set name: [C
    sorted index tensors]}.
    """
    if low.dtype != torch.bool or low.shape != ids.shape:
        raise ValueError(f"low must be a bool tensor shaped like ids {tuple(ids.shape)} (see low_confidence), "
                         f"got {low.dtype} {tuple(low.shape)}")
    il = torch.ones_like(ids, dtype=torch.bool) if in_loss is None else in_loss.bool()
    ar = torch.arange(ids.numel())
    none = torch.empty(0, dtype=torch.long)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in SET_NAMES}
    for c in candidates.tolist():
        is_same = ids == ids[c]
        same = (is_same & il & (ar != c)).nonzero().view(-1)
        k = same.numel()
        pool = (il & ~is_same).nonzero().view(-1)
        rnd = pool[torch.randperm(pool.numel(), generator=generator)[:k]]
        lpool = (il & ~is_same & low).nonzero().view(-1)
        lc = lpool[torch.randperm(lpool.numel(), generator=generator)[: min(k, lpool.numel())]]  # drawn even if unused: same RNG stream
        c_ok = bool(low[c]) or not pair  # pair condition: the candidate must be low confidence too
        out["random"].append(rnd.sort().values)
        out["same_token"].append(same)
        out["low_conf"].append(lc.sort().values if c_ok else none)
        out["same_token&low_conf"].append(same[low[same]] if c_ok else none)
    return out


def split_by_sign(sets: dict[str, list[torch.Tensor]], adv: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Readings "pos" / "neg": for each set S (name -> C index tensors) the
    sets f"{name}:pos" = {k in S: A_k > 0} and f"{name}:neg" = {k in S: A_k < 0}.
    adv [N] Eq. 2 weight A_k of every flat token. Returns only the new sets."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, lst in sets.items():
        out[f"{name}:pos"] = [m[adv[m] > 0] for m in lst]
        out[f"{name}:neg"] = [m[adv[m] < 0] for m in lst]
    return out


def _flat(batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N], pos [N]): the response tokens, row-major (forward_tokens' order)."""
    return (batch.response_mask > 0).nonzero(as_tuple=True)


# ----------------------------------------------------------------------------
# LM-head-only: exact closed form
# ----------------------------------------------------------------------------


def _lsm_at(z: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """log_softmax(z)[o] in float64. z [c, V], o [c] -> [c]"""
    z = z.double()
    return z.gather(1, o[:, None]).squeeze(1) - torch.logsumexp(z, 1)


@torch.no_grad()
def lm_head_masking(
    model,
    batch: RolloutBatch,
    weights: torch.Tensor,
    candidates: torch.Tensor,
    sets: dict[str, list[torch.Tensor]],
    lr: float = 0.1,
    *,
    norm: float | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    micro_rows: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Masking effects under the LM-head-only (untied) SGD step, exact closed form.

    weights [B, T] (Eq. 2's A_k), candidates [C] flat token indices, sets from
    ``build_mask_sets``. The logits are the model's (logit scale, softcap,
    `temperature`; ``lm_head.LogitTransform``). chunk_tokens: rows per
    [chunk_tokens, V] block; micro_rows: rows per decoder pass for the final
    hidden states. Returns dict:
        delta       {set: [C] float64}  log pi_W'(c) - log pi_W'_M(c)
        logp_full   [C] float64  log pi_W'(c)
        delta_all   [N] float64  head-only Delta log p of every token (Eq. 1)
    Memory: G [V, d] plus the score rows rho_k [V] of every token in some set.
    """
    rows, pos = _flat(batch)
    N = rows.numel()
    n = float(N) if norm is None else float(norm)
    W, bias, tf = lm_head_of(model, temperature)  # [V, d], [V] or None: float32 CPU copies
    with _eval_mode(model):
        H = lm_head_inputs(model, batch, micro_rows=micro_rows)[rows, pos].cpu().float()  # [N, d] final hidden states
    o = batch.response_ids[rows, pos]  # [N]
    A = weights.to(torch.float32)[rows, pos]  # [N]

    def head_out(hc):  # [c, d] -> [c, V]: u = W h + b, before the logit transform
        u = hc @ W.T
        return u if bias is None else u + bias

    def logp_at(u, oc):  # [c, V] head outputs, [c] ids -> [c] float64 log pi(oc)
        return _lsm_at(tf(u.double()), oc)

    # G = sum_k A_k rho_k h_k^T [V, d] = N grad_W J   (Eq. 2, 6): W' = W + lr G / N
    G = lm_head_grad(H, W, o, A, bias=bias, transform=tf, chunk_tokens=chunk_tokens)
    c = lr / n  # u' = u + c * G h

    delta_all = torch.empty(N, dtype=torch.float64)
    for a in range(0, N, chunk_tokens):
        idx = torch.arange(a, min(a + chunk_tokens, N))
        u = head_out(H[idx])  # [c, V]
        delta_all[idx] = logp_at(u + c * (H[idx] @ G.T), o[idx]) - logp_at(u, o[idx])

    # score rows rho_k of every token that some set masks, computed once
    union = torch.unique(torch.cat([t for lst in sets.values() for t in lst] + [torch.empty(0, dtype=torch.long)]))
    pos_in_u = torch.full((N,), -1, dtype=torch.long)
    pos_in_u[union] = torch.arange(union.numel())
    R_u = torch.empty(union.numel(), W.shape[0])  # [|union|, V]
    for a in range(0, union.numel(), chunk_tokens):
        ix = union[a : a + chunk_tokens]
        R_u[a : a + chunk_tokens] = dense_scores(*score_rows(H[ix], W, o[ix], bias, tf)[:2], o[ix])

    C = candidates.numel()
    delta = {k: torch.zeros(C, dtype=torch.float64) for k in sets}
    logp_full = torch.empty(C, dtype=torch.float64)
    it = enumerate(candidates.tolist())
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc="masking lm_head", dynamic_ncols=True)
    for i, cand in it:
        hc = H[cand]  # [d]
        u1 = (head_out(hc[None]) + c * (G @ hc)[None]).double()  # [1, V] u'_c
        oc = o[cand : cand + 1]
        logp_full[i] = logp_at(u1, oc)[0]
        for k, lst in sets.items():
            M = lst[i]
            if M.numel() == 0:
                continue  # theta'_M = theta': delta = 0 exactly
            coef = A[M] * (H[M] @ hc)  # [m] A_k <h_k, h_c>
            um = coef @ R_u[pos_in_u[M]]  # [V] sum_{k in M} A_k <h_k,h_c> rho_k
            delta[k][i] = logp_full[i] - logp_at(u1 - c * um.double()[None], oc)[0]
    return {"delta": delta, "logp_full": logp_full, "delta_all": delta_all}


# ----------------------------------------------------------------------------
# full-parameter: one masked backward per (candidate, set)
# ----------------------------------------------------------------------------


def full_masking(
    model,
    batch: RolloutBatch,
    weights: torch.Tensor,
    candidates: torch.Tensor,
    sets: dict[str, list[torch.Tensor]],
    lr: float = 0.1,
    *,
    norm: float | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    micro_rows: int = 8,
    progress: bool = False,
    compose: dict[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Masking effects under the full-parameter SGD step (every trainable parameter).

    Same arguments and return keys as ``lm_head_masking`` (delta_all: the full
    step's Delta log p of every token). theta' = theta + lr grad J is built
    once in a deepcopy; per (candidate, set) the masked terms' gradient g_M
    (``eq2_grad`` over the rows that hold them) gives theta'_M = theta' -
    lr g_M, and c's row (cut after c) is run at theta' and at theta'_M with
    the same shapes, so an empty set gives delta = 0 exactly and float noise
    is the same for both terms.

    compose: {set: (part sets)} where, for every candidate, the parts are a
    partition of the set (checked); its g_M is then the sum of the parts'
    gradients instead of one more backward (g_M is linear in M: every
    gradient is taken at theta). Used for M = M+ u M- (readings pos / neg).
    """
    rows, pos = _flat(batch)
    N = rows.numel()
    n = float(N) if norm is None else float(norm)
    names, params = _trainable(model)
    kw = dict(temperature=temperature, chunk_tokens=chunk_tokens, micro_rows=micro_rows)
    m1 = copy.deepcopy(model).eval()
    p1 = [dict(m1.named_parameters())[k] for k in names]
    sgd_step(m1, batch, weights, lr, norm=n, params=p1, **kw)  # theta' = theta + lr grad J   (Eq. 3)
    theta1 = [p.detach().clone() for p in p1]
    before = forward_rows(model, batch, with_entropy=False, **kw)["logprob"]  # [B, T]
    after = forward_rows(m1, batch, with_entropy=False, **kw)["logprob"]
    delta_all = (after - before)[rows, pos].double()

    def cand_logp(b: int, t: int) -> float:
        sub = _rows_upto(batch, [b], [t])
        with torch.no_grad():
            lp = forward_tokens(m1, sub, temperature=temperature, chunk_tokens=chunk_tokens, with_entropy=False)["logprob"]
        return float(lp[0, t])

    C = candidates.numel()
    delta = {k: torch.zeros(C, dtype=torch.float64) for k in sets}
    logp_full = torch.empty(C, dtype=torch.float64)
    it: Iterable = enumerate(candidates.tolist())
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc="masking full", dynamic_ncols=True)
    compose = dict(compose or {})
    for k, parts in compose.items():
        if k not in sets or any(q not in sets or q in compose for q in parts):
            raise ValueError(f"compose[{k!r}] = {tuple(parts)}: every name must be a set, and parts must not be composed themselves")
    for i, cand in it:
        b, t = int(rows[cand]), int(pos[cand])
        logp_full[i] = cand_logp(b, t)
        todo = [k for k, lst in sets.items() if lst[i].numel() > 0]  # empty set: theta'_M = theta', delta = 0 exactly
        direct = [k for k in todo if k not in compose]
        wMs = []
        for k in direct:
            M = sets[k][i]
            wM = torch.zeros_like(weights, dtype=torch.float32)
            wM[rows[M], pos[M]] = weights.to(torch.float32)[rows[M], pos[M]]
            wMs.append(wM)
        grads = dict(zip(direct, eq2_grads(model, batch, wMs, n, params, **kw)))  # one forward, one backward per set
        for k in todo:
            if k in compose:  # g_M = sum of the parts' g (a partition of M)
                parts = [sets[q][i] for q in compose[k]]
                if not torch.equal(torch.cat(parts).sort().values, sets[k][i].sort().values):
                    raise ValueError(f"compose[{k!r}]: the parts are not a partition of the set of candidate {i}")
                grads[k] = [sum(gs) for gs in zip(*(grads[q] for q in compose[k] if q in grads))]
        for k in todo:
            gM = grads[k]
            with torch.no_grad():
                for p, th, gg in zip(p1, theta1, gM):
                    p.copy_(th).sub_(gg, alpha=lr)  # theta'_M = theta' - lr/N sum_{k in M} A_k g_k
            delta[k][i] = logp_full[i] - cand_logp(b, t)
            with torch.no_grad():
                for p, th in zip(p1, theta1):
                    p.copy_(th)
    return {"delta": delta, "logp_full": logp_full, "delta_all": delta_all}


# ----------------------------------------------------------------------------
# statistics and the whole probe
# ----------------------------------------------------------------------------


def boost_stats(delta: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Boost Rate = mean 1{delta > 0}, Mean Boost = mean delta (Sec. 2), over the
    candidates where `valid` (default all). delta [C]. NaN if none."""
    d = delta if valid is None else delta[valid]
    if d.numel() == 0:
        return {"n": 0, "boost_rate": float("nan"), "mean_boost": float("nan")}
    return {"n": int(d.numel()), "boost_rate": float((d > 0).double().mean()), "mean_boost": float(d.double().mean())}


def sign_aligned(delta: torch.Tensor, net_adv: torch.Tensor) -> torch.Tensor:
    """Reading "aligned": sign(sum_{k in M} A_k) * delta, [C] float64 from delta
    [C] and the masked sets' net weights net_adv [C]. > 0: the masked tokens
    pushed c the way their net advantage points; 0 when the net weight is 0."""
    if delta.shape != net_adv.shape:
        raise ValueError(f"delta {tuple(delta.shape)} and net_adv {tuple(net_adv.shape)} differ in shape")
    return torch.sign(net_adv.double()) * delta.double()


def sign_agreement(delta_a: torch.Tensor, delta_b: torch.Tensor) -> float:
    """Fraction of tokens with sign(delta_a) == sign(delta_b) (App. D.1). [N], [N]."""
    if delta_a.numel() == 0:
        return float("nan")
    return float((torch.sign(delta_a) == torch.sign(delta_b)).double().mean())


def _reading_delta(res: dict[str, Any], name: str, reading: str, net: torch.Tensor) -> torch.Tensor:
    """[C] the per-candidate statistic of set `name` under `reading`."""
    if reading == "aligned":
        return sign_aligned(res["delta"][name], net[: res["delta"][name].numel()])
    return res["delta"][name if reading == "all" else f"{name}:{reading}"]


def masking_probe(
    model,
    batch: RolloutBatch,
    *,
    advantage: torch.Tensor | None = None,
    n_candidates: int = 64,
    n_full: int | None = None,
    threshold: float = 0.5,
    confidence: str = "prob",
    pair: bool = False,
    sign_split: bool = True,
    lr: float = 0.1,
    seed: int = 0,
    modes: Sequence[str] = ("lm_head", "full"),
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    micro_rows: int = 8,
    progress: bool = False,
) -> tuple[dict[str, dict[str, list]], dict[str, Any]]:
    """Table 1 and App. D.1 on one batch. The model is only read.

    n_full: how many of the candidates (a prefix of the random sample, same
    mask sets) also get the full-parameter update; None = all.
    threshold / confidence: low confidence (``low_confidence``): old prob <
    threshold ("prob") or entropy above the threshold-quantile of the batch
    ("entropy"). pair: the paper's pair condition (candidate low confidence
    too). sign_split: also the readings "pos" / "neg" (separate masked
    updates; off: only "all" and "aligned"). Returns (tables, summary):
        tables["candidates"]  one row per (candidate, set): candidate, row,
            position, token_id, advantage, old_prob, entropy,
            candidate_low_conf, set, same_token, low_conf, set_size,
            set_adv_sum (sum of A_k over the set), set_tokens (flat indices
            into tables["tokens"]), delta_lm_head, delta_full (NaN where not
            run), in_full, and with sign_split set_size_{pos,neg},
            delta_{lm_head,full}_{pos,neg}
        tables["tokens"]      one row per response token: row, position,
            token_id, advantage, old_prob, entropy, low_conf, delta_lm_head,
            delta_full
        summary: "table" (one dict per (reading, set), readings in READINGS
            order: n / boost_rate / mean_boost for lm_head, full, and lm_head
            on the full subset ("_paired"); "all" rows also split by the sign
            of the set's net weight sum_{k in M} A_k ("_netpos" / "_netneg")),
            "sign_agreement", settings and sizes.
    """
    for m in modes:
        if m not in ("lm_head", "full"):
            raise ValueError(f"unknown mode {m!r}; valid: lm_head, full")
    if confidence not in CONFIDENCE:
        raise ValueError(f"confidence must be one of {CONFIDENCE}, got {confidence!r}")
    if batch.num_tokens < 2:
        raise ValueError("the batch needs at least two response tokens")
    gen = torch.Generator().manual_seed(seed)
    weights = eq2_weights(batch, advantage)  # [B, T]
    rows, pos = _flat(batch)
    N = rows.numel()
    ids = batch.response_ids[rows, pos]
    st = forward_rows(model, batch, micro_rows=micro_rows, temperature=temperature, chunk_tokens=chunk_tokens,
                      with_entropy=confidence == "entropy")
    old_prob = st["logprob"][rows, pos].exp()  # [N]
    entropy = st["entropy"][rows, pos] if "entropy" in st else None  # [N]
    low, cut = low_confidence(old_prob, entropy, confidence, threshold)
    A_tok = weights[rows, pos]  # [N]
    in_loss = A_tok != 0  # tokens with A_k = 0 are not in Eq. 2's sum
    cands = select_candidates(ids, n_candidates, gen, in_loss)
    base = build_mask_sets(ids, low, cands, gen, in_loss, pair=pair)
    sets = base | (split_by_sign(base, A_tok) if sign_split else {})
    readings = READINGS if sign_split else ("all", "aligned")
    C = cands.numel()
    n_f = C if n_full is None else min(int(n_full), C)
    res: dict[str, dict[str, Any]] = {}
    if "lm_head" in modes:
        res["lm_head"] = lm_head_masking(model, batch, weights, cands, sets, lr, norm=N, temperature=temperature,
                                           chunk_tokens=chunk_tokens, micro_rows=micro_rows, progress=progress)
    if "full" in modes:
        sub_sets = {k: v[:n_f] for k, v in sets.items()}
        compose = {k: tuple(f"{k}:{q}" for q in SIGN_PARTS) for k in base} if sign_split else None
        res["full"] = full_masking(model, batch, weights, cands[:n_f], sub_sets, lr, norm=N, temperature=temperature,
                                   chunk_tokens=chunk_tokens, micro_rows=micro_rows, progress=progress, compose=compose)

    nan = float("nan")
    ent = entropy if entropy is not None else torch.full((N,), nan)
    cols: dict[str, list] = {}
    for i, c in enumerate(cands.tolist()):
        for k in SET_NAMES:
            row = {"candidate": c, "row": int(rows[c]), "position": int(pos[c]), "token_id": int(ids[c]), "advantage": float(A_tok[c]),
                   "old_prob": float(old_prob[c]), "entropy": float(ent[c]), "candidate_low_conf": bool(low[c]), "set": k,
                   "same_token": SET_CONDITIONS[k][0], "low_conf": SET_CONDITIONS[k][1], "set_size": int(sets[k][i].numel()),
                   "set_adv_sum": float(A_tok[sets[k][i]].double().sum()),  # sum_{k in M} A_k
                   "set_tokens": sets[k][i].tolist(), "in_full": i < n_f and "full" in res}  # flat indices (tables["tokens"] order)
            for part in ("",) + (tuple(f":{q}" for q in SIGN_PARTS) if sign_split else ()):
                tag = part.replace(":", "_")
                if part:
                    row[f"set_size{tag}"] = int(sets[k + part][i].numel())
                row[f"delta_lm_head{tag}"] = float(res["lm_head"]["delta"][k + part][i]) if "lm_head" in res else nan
                row[f"delta_full{tag}"] = float(res["full"]["delta"][k + part][i]) if "full" in res and i < n_f else nan
            for key, v in row.items():
                cols.setdefault(key, []).append(v)
    tok_cols = {
        "row": rows.tolist(), "position": pos.tolist(), "token_id": ids.tolist(), "advantage": A_tok.tolist(),
        "old_prob": old_prob.tolist(), "entropy": ent.tolist(), "low_conf": low.tolist(),
        "delta_lm_head": res["lm_head"]["delta_all"].tolist() if "lm_head" in res else [nan] * N,
        "delta_full": res["full"]["delta_all"].tolist() if "full" in res else [nan] * N,
    }

    # [C] per set: sum_{k in M} A_k of the all-signs set (reading "aligned", net split of "all")
    net_adv = {k: torch.stack([A_tok[t].double().sum() for t in base[k]]) if C else torch.zeros(0, dtype=torch.float64) for k in SET_NAMES}
    table = []
    for reading in readings:
        for k in SET_NAMES:
            name = k if reading in ("all", "aligned") else f"{k}:{reading}"
            sizes = torch.tensor([t.numel() for t in sets[name]], dtype=torch.long)
            valid = sizes > 0  # [C] an empty set gives delta = 0 exactly: not a measurement
            row: dict[str, Any] = {"reading": reading, "set": k, "same_token": SET_CONDITIONS[k][0], "low_conf": SET_CONDITIONS[k][1],
                                   "mean_set_size": float(sizes[valid].double().mean()) if valid.any() else 0.0}
            for mode in ("lm_head", "full"):
                if mode not in res:
                    row.update({f"n_{mode}": 0, f"boost_rate_{mode}": nan, f"mean_boost_{mode}": nan})
                    continue
                d = _reading_delta(res[mode], k, reading, net_adv[k])
                v = valid[: d.numel()]
                s_ = boost_stats(d, v)
                row.update({f"n_{mode}": s_["n"], f"boost_rate_{mode}": s_["boost_rate"], f"mean_boost_{mode}": s_["mean_boost"]})
                if reading == "all":  # candidates split by the sign of sum_{k in M} A_k
                    net = net_adv[k][: d.numel()]
                    for tag, sel in (("netpos", net > 0), ("netneg", net < 0)):
                        s_ = boost_stats(d, v & sel)
                        row.update({f"n_{mode}_{tag}": s_["n"], f"boost_rate_{mode}_{tag}": s_["boost_rate"],
                                    f"mean_boost_{mode}_{tag}": s_["mean_boost"]})
            if "lm_head" in res and "full" in res:  # paired: the head path on the full path's candidates
                s_ = boost_stats(_reading_delta(res["lm_head"], k, reading, net_adv[k])[:n_f], valid[:n_f])
                row.update({"n_lm_head_paired": s_["n"], "boost_rate_lm_head_paired": s_["boost_rate"],
                            "mean_boost_lm_head_paired": s_["mean_boost"]})
            table.append(row)
    summary: dict[str, Any] = {
        "table": table,
        "readings": list(readings),
        "sign_agreement": sign_agreement(res["full"]["delta_all"], res["lm_head"]["delta_all"]) if len(res) == 2 else nan,
        "mean_abs_delta_lm_head": float(res["lm_head"]["delta_all"].abs().mean()) if "lm_head" in res else nan,
        "mean_abs_delta_full": float(res["full"]["delta_all"].abs().mean()) if "full" in res else nan,
        "tokens": N,
        "rows": len(batch),
        "candidates": C,
        "full_candidates": n_f if "full" in res else 0,
        "tokens_in_loss": int(in_loss.sum()),
        "eligible_tokens": int((torch.bincount(ids[in_loss], minlength=int(ids.max()) + 1)[ids] - in_loss.long() >= 1).sum()),
        "low_conf_tokens": int(low.sum()),
        "low_conf_candidates": int(low[cands].sum()) if C else 0,
        "confidence": confidence,
        "threshold": threshold,
        "low_conf_cut": cut,
        "low_conf_rule": (f"old prob < {cut:g}" if confidence == "prob" else f"entropy > {cut:.4g} (batch {threshold:g}-quantile)")
        + (", candidate and masked token (pair)" if pair else ", masked token"),
        "pair": pair,
        "lr": lr,
        "temperature": temperature,
        "seed": seed,
        "normaliser": "N = all response tokens of the batch, also for masked updates",
    }
    return {"candidates": cols, "tokens": tok_cols}, summary
