"""Counterfactual token value by Monte Carlo (cancellation paper App. E.2, Eq. 20; Fig. 5, Fig. 11).

What it does
    For a sampled response token o_t at state s_t = (q, o_<t), three branches
    of M continuations each:

        avg0    = mean reward from s_t + o_t                               ~ Q(s_t, o_t)
        avg1    = mean reward from s_t (first token a ~ pi(.|s_t))         ~ V(s_t)
        avg_alt = mean reward from s_t, first token a ~ pi(.|s_t, a != o_t) ~ Q_{-o_t}(s_t)

    The token's value is Q(s_t, o_t) - Q_{-o_t}(s_t), how much better taking
    o_t is than sampling an alternative token; since V = p Q + (1 - p) Q_{-o_t},
    three estimates come from the branches:

        value_direct = avg0 - avg_alt                       (default, --estimator direct)
        value_eq20   = (avg0 - avg1) / (1 - p(o_t | s_t))   (Eq. 20,  --estimator eq20)
        value_am     = avg0 - avg1                          (main text's A_M, --estimator am:
                                                             estimates (1 - p) times the value)

    Eq. 20 divides the Monte Carlo noise of avg0 - avg1 by 1 - p, so for a
    likely token (p = 0.9999) the noise is multiplied by 10^4; the direct
    estimate has variance (var0 + var_alt) / M with no 1 / (1 - p) factor.
    Each record carries all three with standard errors (``value_estimates``),
    and "value" is the one --estimator selects; the gap summaries use it, and
    the result also holds the gap of every estimator on the same tokens.
    Rewards come from the run's reward functions (reward.functions with
    reward.weights, math-verify by default), as the trainer scores, on the
    whole response (o_<t, o_t, continuation). `tokencredit probe value --run
    RUN_DIR --step N` samples equal numbers of boosted and suppressed tokens (Δ log p
    of the update of rollout step N, from probes/flip_step_N.parquet), half
    from rows with A > 0 and half from rows with A < 0, estimates their values
    and reports the value gap (mean boosted - mean suppressed) with a
    bootstrap CI (Fig. 5a), per top-k% entropy subset (Fig. 5b: cut-offs over
    all response tokens of the batch, ``entropy_cutoffs``) and, with
    `--repeat U`, after u = 1..U repeated updates on that batch (Fig. 11).

How the 3M continuations of one token share work
    One forward pass over s_t gives the prefix KV cache and the next-token
    distribution pi(.|s_t), hence p(o_t), the first tokens of the M rows of
    the s_t branch and those of the M rows of the alternative branch (drawn
    from pi with o_t's probability zeroed and the rest renormalised,
    ``exclude_token``; the other M rows start with o_t). All 3M rows now have
    the same length |s_t| + 1, so the cache is repeated across them
    (`DynamicCache.batch_repeat_interleave`) and ONE `generate` call
    continues all of them, computing only the new tokens: the prefix is
    encoded once instead of 3M times. `mode="batched"` (no cache sharing, one
    call) and `mode="sequential"` (one call per continuation) are the
    references the tests and bench/value_cache_bench.py compare against.

Simplifications
    * Model for step N: checkpoints/step_{N-1} (the policy before the update
      of step N, which is the policy that sampled the batch) when it exists;
      for N = 1 the run's initial model (model.name, loaded as the trainer
      does); otherwise the nearest other checkpoint, with a warning and
      "checkpoint_exact": false in every record; `--checkpoint` overrides.
    * Prompts are rebuilt from the run's config exactly as the trainer draws
      them (data/promptset.py: same data, same filter). Each flip record
      carries its row's "prompt_index" (index into that prompt set), written
      by the trainer, which is exact also when the reward-balanced buffer
      assembled the update set from several rollout steps; a flip file
      without it is refused (re-run training with probes.flip.save_tokens=true).
    * Run, config (+ key=value overrides), threads and device are resolved by
      probes/context.py, as for the other probes; log-probs use
      rollout.logprob_temperature, continuations the sampling temperature.
    * The continuation budget is rollout.max_new_tokens - t, so completed
      responses are no longer than the ones trained on.
    * Fig. 11's repeated updates: U AdamW steps (fresh optimizer, run's lr and
      clip settings, one tokencredit.update.optimizer_step per update on the
      whole batch), surrogate
      ratios against the pre-update log-probs; token values stay those of the
      pre-update policy, only the boosted / suppressed labels change.
    * p(o_t) is recomputed from the loaded model at the run's temperature
      (top-p truncated if top_p < 1) and stored beside the flip record's
      old_prob; a mismatch flags a wrong checkpoint or prompt.
    * The alternative branch's first token is drawn from the same (top-p
      truncated) distribution that gives p, with o_t removed and the rest
      renormalised; its continuation samples the policy as the other branches
      do. When nothing is left (p = 1: greedy, or top_p keeps o_t alone) the
      branch is empty, value_direct is NaN (null in the file) and
      "alt_reason" says why; Eq. 20 is NaN there too (1 - p < 1e-6), A_M is not.
    * Standard errors are per branch, sample std (ddof 1) / sqrt(M) (NaN for
      M = 1); the branches are independent draws, so the estimators' variances
      add; Eq. 20's treats p as exact (se_am / (1 - p)).

Try it
    tokencredit probe value --run runs/my-run --step 3 --tokens 32 --M 8     # -> runs/my-run/probes/value_step_3.jsonl
    tokencredit probe value --run runs/my-run --step 3 --tokens 32 --M 8 --repeat 4
    tokencredit probe value --run runs/my-run --step 3 --estimator eq20 --out runs/my-run/probes/value_step_3_eq20.jsonl
    tokencredit probe value --run runs/my-run --step 3 rollout.top_p=0.95    # config overrides, as for the other probes
    tokencredit report runs/my-run                                # draws Fig. 5a/5b/11 from it
    python bench/value_cache_bench.py                             # shared-prefix speed-up
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from tokencredit.model.precision import in_compute_dtype

log = logging.getLogger("tokencredit.value")

MODES = ("shared", "batched", "sequential")
ESTIMATORS = ("direct", "eq20", "am")  # value_direct, value_eq20, value_am of a record; --estimator picks "value"
ESTIMATOR_FORMULAS = {"direct": "avg0 - avg_alt", "eq20": "(avg0 - avg1) / (1 - p)", "am": "avg0 - avg1"}


# ----------------------------------------------------------------------------
# pure statistics (no model): the three estimators, bootstrap gap, entropy subsets
# ----------------------------------------------------------------------------


def counterfactual_value(avg0: float, avg1: float, p: float, min_denominator: float = 1e-6) -> float:
    """Eq. 20: value(o_t | s_t) = (avg0 - avg1) / (1 - p(o_t)).

    avg0: mean reward of M continuations from s_t + o_t (Q(s_t, o_t) estimate);
    avg1: mean reward of M continuations from s_t      (V(s_t) estimate);
    p:    pi(o_t | s_t) under the policy that samples the continuations.
    Since V = p Q + (1 - p) Q_{-o_t}, (Q - V) / (1 - p) = Q - Q_{-o_t}: the gain of
    taking o_t over a counterfactual alternative. NaN when 1 - p < min_denominator
    (a forced token has no alternative to compare with).
    """
    denom = 1.0 - float(p)
    if not denom >= min_denominator:  # also catches NaN
        return float("nan")
    return (float(avg0) - float(avg1)) / denom


def branch_mean_se(rewards: Sequence[float] | None) -> tuple[float, float]:
    """[M] rewards of one branch -> (mean, standard error of the mean).

    se = sample standard deviation (ddof 1) / sqrt(M): NaN for M = 1 (one draw
    says nothing about the spread); (NaN, NaN) for an empty or missing branch.
    """
    r = np.asarray(list(rewards) if rewards is not None else [], dtype=np.float64)  # [M]
    if r.size == 0:
        return math.nan, math.nan
    se = float(r.std(ddof=1) / math.sqrt(r.size)) if r.size > 1 else math.nan
    return float(r.mean()), se


def value_estimates(
    rewards0: Sequence[float],
    rewards1: Sequence[float],
    rewards_alt: Sequence[float] | None,
    p: float,
    min_denominator: float = 1e-6,
) -> dict[str, float]:
    """The three Monte Carlo estimates of Q(s_t, o_t) - Q_{-o_t}(s_t), with standard errors.

    rewards0    [M]     rewards of the continuations from s_t + o_t;
    rewards1    [M]     from s_t, first token a ~ pi(.|s_t);
    rewards_alt [M_alt] from s_t, first token a ~ pi(.|s_t) with o_t excluded
                        (renormalised); empty or None when that distribution
                        does not exist (p = 1);
    p           pi(o_t | s_t) of the sampling policy.
    Returns {avg0, avg1, avg_alt, se0, se1, se_alt (``branch_mean_se``),
      value_direct = avg0 - avg_alt,            se_direct = sqrt(se0^2 + se_alt^2),
      value_am     = avg0 - avg1,               se_am     = sqrt(se0^2 + se1^2),
      value_eq20   = (avg0 - avg1) / (1 - p),   se_eq20   = se_am / (1 - p)}
    (the branches are independent, so their variances add; Eq. 20's error
    treats p as exact). NaN where undefined: the direct pair without an
    alternative branch, the Eq. 20 pair when 1 - p < min_denominator.
    """
    avg0, se0 = branch_mean_se(rewards0)
    avg1, se1 = branch_mean_se(rewards1)
    avg_alt, se_alt = branch_mean_se(rewards_alt)
    value_eq20 = counterfactual_value(avg0, avg1, p, min_denominator)
    se_am = math.hypot(se0, se1)
    return {
        "avg0": avg0, "avg1": avg1, "avg_alt": avg_alt, "se0": se0, "se1": se1, "se_alt": se_alt,
        "value_direct": avg0 - avg_alt, "se_direct": math.hypot(se0, se_alt),
        "value_eq20": value_eq20, "se_eq20": se_am / (1.0 - float(p)) if math.isfinite(value_eq20) else math.nan,
        "value_am": avg0 - avg1, "se_am": se_am,
    }


def _clean(x: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(x), dtype=np.float64)
    return a[np.isfinite(a)]


def value_gap(
    values_boosted: Sequence[float],
    values_suppressed: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float, float]:
    """Value gap = mean(boosted values) - mean(suppressed values) (Fig. 5a) with a
    percentile bootstrap (1 - alpha) confidence interval.

    Each bootstrap replicate resamples the boosted values [n_b] and the suppressed
    values [n_s] independently with replacement. NaN values are dropped first.
    Returns (gap, lo, hi); all NaN when either side is empty; lo == hi == gap when
    n_boot == 0.
    """
    b, s = _clean(values_boosted), _clean(values_suppressed)
    if b.size == 0 or s.size == 0:
        return (float("nan"),) * 3
    gap = float(b.mean() - s.mean())
    if n_boot <= 0:
        return gap, gap, gap
    rng = np.random.default_rng(seed)
    bi = rng.integers(0, b.size, size=(n_boot, b.size))  # [n_boot, n_b]
    si = rng.integers(0, s.size, size=(n_boot, s.size))  # [n_boot, n_s]
    reps = b[bi].mean(1) - s[si].mean(1)  # [n_boot]
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return gap, float(lo), float(hi)


def split_gap(records: Sequence[dict], n_boot: int = 1000, seed: int = 0, kind_key: str = "kind") -> dict[str, float]:
    """Gap over value records (dicts with "value" and kind_key in {"boosted",
    "suppressed"}): {"gap", "lo", "hi", "n_boosted", "n_suppressed",
    "mean_boosted", "mean_suppressed"}."""
    vb = _clean(r["value"] for r in records if r.get(kind_key) == "boosted" and r.get("value") is not None)
    vs = _clean(r["value"] for r in records if r.get(kind_key) == "suppressed" and r.get("value") is not None)
    gap, lo, hi = value_gap(vb, vs, n_boot=n_boot, seed=seed)
    return {
        "gap": gap, "lo": lo, "hi": hi, "n_boosted": int(vb.size), "n_suppressed": int(vs.size),
        "mean_boosted": float(vb.mean()) if vb.size else math.nan,
        "mean_suppressed": float(vs.mean()) if vs.size else math.nan,
    }


def estimator_gaps(records: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The value gap of every estimator on the same tokens: records (dicts with
    "kind" and value_direct / value_eq20 / value_am, None or NaN where
    undefined) -> {"by_estimator": {name: split_gap on value_<name>} over the
    records where all three are finite, "n_common": their number,
    "undefined": {name: records where value_<name> is not finite}}."""
    vals = [{e: as_float(r.get(f"value_{e}")) for e in ESTIMATORS} for r in records]
    common = [(r, v) for r, v in zip(records, vals) if all(math.isfinite(x) for x in v.values())]
    return {
        "by_estimator": {e: split_gap([{"kind": r.get("kind"), "value": v[e]} for r, v in common], n_boot=n_boot, seed=seed)
                         for e in ESTIMATORS},
        "n_common": len(common),
        "undefined": {e: sum(not math.isfinite(v[e]) for v in vals) for e in ESTIMATORS},
    }


def _topk_count(n_tokens: int, k: float) -> int:
    """Size of the top-k% subset of n_tokens tokens: max(1, ceil(n k / 100))."""
    return max(1, int(math.ceil(n_tokens * k / 100.0 - 1e-9)))


def _batch_entropies(entropy, mask) -> np.ndarray:
    """[N] float64 finite entropies of the response tokens: entropy and mask of
    one shape, e.g. [B, T] with mask = response_mask (1 = response token)."""
    e = np.asarray(entropy.detach().cpu() if isinstance(entropy, torch.Tensor) else entropy, dtype=np.float64)
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64)
    if e.shape != m.shape:
        raise ValueError(f"entropy {e.shape} and mask {m.shape} differ in shape")
    e = e[m > 0]  # [N] response tokens only
    return e[np.isfinite(e)]


def entropy_cutoffs(entropy, mask, ks: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)) -> np.ndarray:
    """[K] Fig. 5b cut-offs from the whole batch: "sort all tokens by entropy".

    entropy and mask of one shape, e.g. [B, T] entropies and response_mask
    (1 = response token; padding and non-finite entropies are ignored), or
    [N] flip-record columns with a mask of ones. For each k (percent, in
    (0, 100]) the cut-off is the n_k-th largest of the batch's N response-
    token entropies, n_k = max(1, ceil(N k / 100)); the top-k% subset is every
    token with entropy >= cut-off (ties at the cut-off all go in).
    """
    e = _batch_entropies(entropy, mask)
    if e.size == 0:
        raise ValueError("entropy_cutoffs: the batch has no response token with a finite entropy")
    if not all(0.0 < float(k) <= 100.0 for k in ks):
        raise ValueError(f"entropy_cutoffs: every k must be a percentage in (0, 100], got {list(ks)}")
    desc = np.sort(e)[::-1]  # [N] highest first
    return np.array([desc[_topk_count(e.size, float(k)) - 1] for k in ks], dtype=np.float64)


def entropy_ranks(values: Sequence[float], entropy, mask) -> np.ndarray:
    """[n] int: 1 + the number of the batch's response tokens (entropy, mask as
    in ``entropy_cutoffs``) with a strictly higher entropy than each of
    `values`. A token is in the batch's top-k% subset iff its rank <= n_k
    (same subsets as ``entropy_cutoffs``, ties included); the value probe
    stores it per record so a reader without the batch can rebuild them."""
    desc = np.sort(_batch_entropies(entropy, mask))  # ascending
    v = np.asarray(values, dtype=np.float64)
    return 1 + desc.size - np.searchsorted(desc, v, side="right")


def entropy_topk_gaps(
    records: Sequence[dict],
    ks: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100),
    n_boot: int = 1000,
    seed: int = 0,
    *,
    cutoffs: Sequence[float] | None = None,
) -> list[dict[str, float]]:
    """Fig. 5b: value gap on the valued tokens that lie in the batch's top-k%
    highest-entropy subset, for each k in `ks` (percent). Records need
    "entropy", "value", "kind".

    cutoffs [K]: the batch-wide cut-offs of ``entropy_cutoffs`` (computed
    over all response tokens of the batch, as the paper does); a record is in
    the top-k% subset iff entropy >= cutoffs[i]. Without them, records that
    all carry "entropy_rank" and "entropy_tokens" (written by the probe) are
    selected by rank <= n_k, which is the same batch-wide subset; otherwise
    (older files) the valued tokens themselves are ranked, a different and
    biased subset ("scope": "valued", with a warning).
    Returns one split_gap dict per k, plus "k", "n" (records in the subset),
    "cutoff" (NaN unless given) and "scope" ("batch" or "valued").
    """
    rs = [r for r in records if r.get("value") is not None and np.isfinite(as_float(r.get("entropy"))) and np.isfinite(r["value"])]
    if cutoffs is not None and len(cutoffs) != len(ks):
        raise ValueError(f"entropy_topk_gaps: {len(cutoffs)} cutoffs for {len(ks)} values of k")
    ranked = cutoffs is None and bool(rs) and all(r.get("entropy_rank") is not None and r.get("entropy_tokens") for r in rs)
    if ranked and len({int(r["entropy_tokens"]) for r in rs}) != 1:
        raise ValueError("entropy_topk_gaps: records come from batches of different sizes (entropy_tokens); pass cutoffs")
    if cutoffs is None and not ranked and rs:
        log.warning("entropy_topk_gaps: no batch-wide entropy cut-offs; ranking the %d valued tokens themselves", len(rs))
    rs.sort(key=lambda r: -r["entropy"])
    out = []
    for i, k in enumerate(ks):
        if cutoffs is not None:
            sub, scope = [r for r in rs if r["entropy"] >= cutoffs[i]], "batch"
        elif ranked:
            nk = _topk_count(int(rs[0]["entropy_tokens"]), float(k))
            sub, scope = [r for r in rs if int(r["entropy_rank"]) <= nk], "batch"
        else:
            sub, scope = rs[: _topk_count(len(rs), float(k)) if rs else 0], "valued"
        d = split_gap(sub, n_boot=n_boot, seed=seed)
        d.update({"k": float(k), "n": len(sub), "cutoff": float(cutoffs[i]) if cutoffs is not None else math.nan, "scope": scope})
        out.append(d)
    return out


def as_float(v: Any) -> float:
    """float(v), NaN for None or anything not a number (JSON null in value records)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def repeat_gaps(records: Sequence[dict], eps: float = 1e-6, n_boot: int = 1000, seed: int = 0) -> list[dict[str, float]]:
    """Fig. 11: value gap after u = 1..U repeated updates on the same batch.

    Each record carries "delta_repeat" = [d_1, ..., d_U], the cumulative
    log-prob change of its token after u updates; the token counts as boosted
    after u updates if d_u > eps, suppressed if d_u < -eps. The values stay
    those estimated under the pre-update policy. Returns one split_gap dict per
    u with "update" = u. Empty if no record has "delta_repeat".
    """
    rs = [r for r in records if r.get("delta_repeat") and r.get("value") is not None]
    if not rs:
        return []
    U = min(len(r["delta_repeat"]) for r in rs)
    out = []
    for u in range(U):
        kinds = [
            dict(value=r["value"], kind="boosted" if r["delta_repeat"][u] > eps else "suppressed" if r["delta_repeat"][u] < -eps else "stable")
            for r in rs
        ]
        d = split_gap(kinds, n_boot=n_boot, seed=seed)
        d["update"] = u + 1
        out.append(d)
    return out


# ----------------------------------------------------------------------------
# continuations from s_t + o_t and from s_t
# ----------------------------------------------------------------------------


def next_token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """[V] logits -> [V] float32 probabilities of the sampling policy: softmax at
    `temperature` (one-hot argmax when temperature == 0), nucleus-truncated and
    renormalised when top_p < 1 (as transformers' top-p keeps the smallest set
    whose mass reaches top_p)."""
    z = logits.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(z.argmax(), z.numel()).float()
    probs = torch.softmax(z / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        drop = (sp.cumsum(0) - sp) >= top_p  # mass strictly before a token already reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, si, sp)
        probs = probs / probs.sum()
    return probs


NO_ALTERNATIVE = "o_t holds all the mass of the sampling distribution (p = 1: greedy, or top_p keeps it alone): no alternative token"


def exclude_token(probs: torch.Tensor, token_id: int) -> tuple[torch.Tensor | None, float]:
    """The policy with one token excluded: [V] probabilities (the sampling
    distribution, e.g. from ``next_token_probs``, top-p truncation included) ->
    ([V] the same with probs[token_id] set to 0 and the rest renormalised,
    mass of the rest before renormalising). The rest's mass is summed from the
    other entries in float64, not taken as 1 - p, so it stays exact for p
    near 1. (None, 0.0) when the rest has no mass: the distribution of an
    alternative token does not exist.

    E.g. [0.5, 0.3, 0.2] without index 0 -> [0, 0.6, 0.4], mass 0.5.
    """
    rest = probs.detach().to(torch.float64).clone()  # [V]
    rest[int(token_id)] = 0.0
    mass = float(rest.sum())
    if not mass > 0.0 or not math.isfinite(mass):
        return None, 0.0
    return (rest / mass).to(probs.dtype), mass


def sample_first_tokens(probs: torch.Tensor, token_id: int, M: int, *, greedy: bool, alt: bool = True) -> dict[str, Any]:
    """First tokens of the branches of one token o_t = token_id at s_t.

    probs [V]: the sampling distribution pi(.|s_t). Rows, in this order:
    [M] o_t (branch s_t + o_t); [M] a ~ probs (branch s_t); with `alt`, [M]
    a ~ exclude_token(probs, o_t) (alternative branch), or none when that
    does not exist. greedy: the argmax of each distribution instead of draws
    (probs is then one-hot). Draws use torch's global RNG, the s_t branch's
    first, so seeding before the call reproduces all of them.
    Returns {"first": [2M + n_alt] long, "n_alt": M or 0, "alt_probs": [V] or
    None, "alt_mass": float (NaN without `alt`), "alt_reason": None or why
    the alternative branch is empty}.
    """
    probs = probs.detach().cpu()
    pol = probs.argmax().repeat(M) if greedy else torch.multinomial(probs, M, replacement=True)  # [M]
    parts = [torch.full((M,), int(token_id), dtype=torch.long), pol.long()]
    out: dict[str, Any] = {"n_alt": 0, "alt_probs": None, "alt_mass": math.nan, "alt_reason": None}
    if alt:
        q, mass = exclude_token(probs, token_id)
        out.update(alt_probs=q, alt_mass=mass)
        if q is None:
            out["alt_reason"] = NO_ALTERNATIVE
        else:
            parts.append((q.argmax().repeat(M) if greedy else torch.multinomial(q, M, replacement=True)).long())  # [M]
            out["n_alt"] = M
    out["first"] = torch.cat(parts)
    return out


def _gen_kwargs(temperature: float, top_p: float, pad_id: int, eos_ids: Sequence[int]) -> dict:
    kw: dict[str, Any] = dict(pad_token_id=pad_id, eos_token_id=list(eos_ids))
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _cut_at_eos(seq: list[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS."""
    for i, t in enumerate(seq):
        if t in eos_ids:
            return seq[: i + 1]
    return seq


@torch.no_grad()
@in_compute_dtype  # the model's compute dtype (model/precision.py)
def branch_continuations(
    model,
    prefix_ids: torch.Tensor,
    token_id: int,
    M: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    eos_ids: Sequence[int],
    pad_id: int,
    mode: str = "shared",
    return_logits: bool = False,
    alt: bool = True,
) -> dict[str, Any]:
    """3M continuations of the state s_t = prefix_ids: rows 0..M-1 start with the
    forced token o_t = token_id (branch s_t + o_t), rows M..2M-1 with a token
    sampled from pi(.|s_t) (branch s_t), rows 2M..3M-1 with a token sampled
    from pi(.|s_t) with o_t excluded (alternative branch, ``exclude_token``;
    absent when p = 1 or alt=False, leaving 2M rows). The first tokens come
    from ``sample_first_tokens``; every row then samples the policy.

    Args:
        prefix_ids: [L] long, prompt + o_<t (no padding).
        max_new_tokens: budget counted from s_t, first token included (>= 1).
        mode: "shared" (prefix encoded once, its KV cache repeated over the
            rows, one generate call), "batched" (one generate call, every row
            re-encodes the prefix) or "sequential" (one call per row).
        return_logits: also return the logits of the first generate step
            ([R, V] for the R rows that continue), for equality checks.
        alt: draw the alternative branch.
    Returns dict:
        tokens  list of 2M + n_alt token lists, the first token included, cut
                after the first EOS (each at most max_new_tokens long)
        p       float, pi(o_t | s_t) under the sampling policy
        probs   [V] float32 next-token distribution at s_t
        n_alt, alt_probs, alt_mass, alt_reason   as from sample_first_tokens
        first_logits  (only with return_logits) or None when nothing continued
    The sampling RNG is torch's global one: seed it around the call.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dev = next(model.parameters()).device
    prefix = prefix_ids.to(dev).view(1, -1)  # [1, L]
    L = prefix.shape[1]
    out = model(input_ids=prefix, use_cache=(mode == "shared"))
    probs = next_token_probs(out.logits[0, -1], temperature, top_p)  # [V]
    p = float(probs[token_id])
    fs = sample_first_tokens(probs, token_id, M, greedy=temperature <= 0, alt=alt)
    first = fs.pop("first")  # [N] = [2M + n_alt]
    eos = set(int(e) for e in eos_ids)
    tokens = [[int(f)] for f in first]
    active = [i for i in range(first.numel()) if int(first[i]) not in eos]  # rows that go on
    result: dict[str, Any] = {"tokens": tokens, "p": p, "probs": probs.cpu(), **fs, "first_logits": None}
    if max_new_tokens == 1 or not active:
        return result
    R = len(active)
    ids = torch.cat([prefix.expand(R, L), first[active].to(dev).view(R, 1)], dim=1)  # [R, L+1]
    gk = _gen_kwargs(temperature, top_p, pad_id, eos_ids)
    gk.update(max_new_tokens=max_new_tokens - 1, return_dict_in_generate=True, output_logits=return_logits)
    if mode == "shared":
        cache = out.past_key_values
        cache.batch_repeat_interleave(R)  # [1, heads, L, d] -> [R, heads, L, d] per layer
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **gk)
        seqs, logits0 = g.sequences[:, L + 1 :].cpu(), (g.logits[0].cpu() if return_logits else None)
    elif mode == "batched":
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gk)
        seqs, logits0 = g.sequences[:, L + 1 :].cpu(), (g.logits[0].cpu() if return_logits else None)
    else:
        parts, lg = [], []
        for r in range(R):
            g = model.generate(input_ids=ids[r : r + 1], attention_mask=torch.ones_like(ids[r : r + 1]), **gk)
            parts.append(g.sequences[0, L + 1 :].cpu().tolist())
            if return_logits:
                lg.append(g.logits[0].cpu())
        seqs, logits0 = parts, (torch.cat(lg) if return_logits else None)
    for r, i in enumerate(active):
        cont = seqs[r].tolist() if isinstance(seqs, torch.Tensor) else seqs[r]
        tokens[i] = _cut_at_eos(tokens[i] + cont, eos)
    result["first_logits"] = logits0
    return result


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if len(x) else math.nan


def token_seed(seed: int, row: int, position: int) -> int:
    """Per-token RNG seed: a token's continuations do not depend on which other
    tokens were valued before it (so resuming reproduces an unbroken run)."""
    return (int(seed) * 1_000_003 + int(row) * 10_007 + int(position)) % (2**63 - 1)


def token_values(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    positions: Sequence[int],
    answers: Sequence[str],
    M: int,
    verifier: Callable[[list[str], list[str]], list[float]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    rows: Sequence[int] | None = None,
    mode: str = "shared",
    estimator: str = "direct",
    progress: bool = False,
    on_result: Callable[[int, dict], None] | None = None,
    contexts: Sequence[tuple[str, dict]] | None = None,
) -> list[dict[str, Any]]:
    """Token values of K tokens: token k is response_ids[k][positions[k]] of a
    response to prompt_ids[k] (ids without padding), scored against answers[k].
    verifier(texts, answers) -> rewards; with `contexts` [K] ((question, extra
    fields) of each token's problem) it is called as verifier(texts, answers,
    questions, extras), as the trainer calls the run's reward functions.

    max_new_tokens: the response budget of the run (rollout.max_new_tokens);
    continuations from s_t get max_new_tokens - t tokens. `rows` [K] only
    feeds the per-token seed (default: k). estimator: which of ESTIMATORS
    fills "value" / "value_se". Each result dict: p, the fields of
    ``value_estimates`` (avg0, avg1, avg_alt, se0, se1, se_alt, value_direct,
    se_direct, value_eq20, se_eq20, value_am, se_am), value, value_se,
    estimator, alt_mass (mass of the tokens other than o_t), alt_reason (None,
    or why the alternative branch is empty and value_direct NaN), M,
    rewards0 / rewards1 / rewards_alt (lists of M; rewards_alt empty without
    an alternative branch), len0 / len1 / len_alt (mean completed response
    lengths), time_s. `on_result(k, result)` is called as each token finishes
    (the CLI appends a JSON line there).
    """
    from tqdm.auto import tqdm

    from tokencredit.rollout.hf import eos_token_ids

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    eos_ids = eos_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    rows = list(rows) if rows is not None else list(range(len(positions)))
    results = []
    was_training = model.training
    model.eval()
    for k in tqdm(range(len(positions)), desc="token value", disable=not progress, dynamic_ncols=True):
        t = int(positions[k])
        resp = [int(x) for x in response_ids[k]]
        if not 0 <= t < len(resp):
            raise IndexError(f"position {t} outside a response of {len(resp)} tokens")
        budget = max_new_tokens - t
        if budget < 1:
            raise ValueError(f"position {t} is at or past max_new_tokens={max_new_tokens}")
        prefix = torch.tensor([int(x) for x in prompt_ids[k]] + resp[:t], dtype=torch.long)  # [L]
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(token_seed(seed, rows[k], t))
            br = branch_continuations(model, prefix, resp[t], M, max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                      eos_ids=eos_ids, pad_id=pad_id, mode=mode)
        texts = tokenizer.batch_decode([resp[:t] + c for c in br["tokens"]], skip_special_tokens=True)
        args: tuple = (texts, [answers[k]] * len(texts))
        if contexts is not None:
            q, extra = contexts[k]
            args += ([q] * len(texts), {c: [v] * len(texts) for c, v in extra.items()})
        r = [float(x) for x in verifier(*args)]  # [2M + n_alt]
        est = value_estimates(r[:M], r[M : 2 * M], r[2 * M :], br["p"])
        lens = [t + len(c) for c in br["tokens"]]
        res = {
            "p": br["p"], **est, "value": est[f"value_{estimator}"], "value_se": est[f"se_{estimator}"], "estimator": estimator,
            "alt_mass": br["alt_mass"], "alt_reason": br["alt_reason"], "M": M,
            "rewards0": r[:M], "rewards1": r[M : 2 * M], "rewards_alt": r[2 * M :],
            "len0": _mean(lens[:M]), "len1": _mean(lens[M : 2 * M]), "len_alt": _mean(lens[2 * M :]),
            "time_s": time.perf_counter() - t0,
        }
        results.append(res)
        if on_result is not None:
            on_result(k, res)
    if was_training:
        model.train()
    return results


# ----------------------------------------------------------------------------
# which tokens: equal numbers of boosted / suppressed, from A > 0 and A < 0 rows
# ----------------------------------------------------------------------------


def select_tokens(delta: Sequence[float], advantage: Sequence[float], n_tokens: int, eps: float = 1e-6, seed: int = 0) -> list[tuple[int, str, str]]:
    """Pick about n_tokens record indices: for each row sign s in (pos, neg),
    n_s = min(n_tokens // 4, #boosted_s, #suppressed_s) boosted (delta > eps) and
    as many suppressed (delta < -eps) tokens, uniformly without replacement.
    Rows with A == 0 are never picked. The list interleaves the four cells
    (boosted/pos, suppressed/pos, boosted/neg, suppressed/neg, ...) so any
    prefix of it, e.g. what an interrupted run wrote, stays balanced.
    Returns [(index, kind, sign)]."""
    rng = np.random.default_rng(seed)
    d = np.asarray(delta, dtype=np.float64)
    a = np.asarray(advantage, dtype=np.float64)
    per = max(n_tokens // 4, 0)
    cells = []
    for sign, sel in (("pos", a > 0), ("neg", a < 0)):
        b = np.flatnonzero(sel & (d > eps))
        s = np.flatnonzero(sel & (d < -eps))
        n = min(per, b.size, s.size)
        cells.append([(int(i), "boosted", sign) for i in rng.choice(b, n, replace=False)] if n else [])
        cells.append([(int(i), "suppressed", sign) for i in rng.choice(s, n, replace=False)] if n else [])
    out = []
    for j in range(max((len(c) for c in cells), default=0)):
        out += [c[j] for c in cells if j < len(c)]
    return out


# ----------------------------------------------------------------------------
# reading a run: flip records of step N, model before the update of step N
# ----------------------------------------------------------------------------


def pick_checkpoint(run_dir: Path, step: int) -> tuple[Path | None, bool, str]:
    """(checkpoint dir or None = the initial model, exact?, description) of the
    policy before the update of rollout step `step`."""
    from tokencredit.checkpoint import list_checkpoints

    cks = {int(p.name.split("_")[1]): p for p in list_checkpoints(run_dir / "checkpoints")}
    if step - 1 in cks:
        return cks[step - 1], True, f"checkpoints/step_{step - 1} (before the update of step {step})"
    if step == 1:
        return None, True, "initial model (before the first update)"
    before = [s for s in cks if s < step - 1]
    if before:
        s = max(before)
        return cks[s], False, f"checkpoints/step_{s} (step_{step - 1} missing: {step - 1 - s} updates older)"
    if cks:
        s = min(cks)
        return cks[s], False, f"checkpoints/step_{s} (step_{step - 1} missing: {s - step + 1} updates newer)"
    return None, False, f"initial model (no checkpoint; step_{step - 1} missing)"


def _flip_columns(run_dir: Path, step: int) -> dict[str, list]:
    """Columns of probes/flip_step_{step}.parquet (written by the trainer with
    probes.flip.save_tokens=true); they must carry each row's prompt_index."""
    from tokencredit.rundir import read_parquet

    path = run_dir / "probes" / f"flip_step_{step}.parquet"
    if not path.is_file():
        have = sorted(p.name for p in (run_dir / "probes").glob("flip_step_*.parquet")) if (run_dir / "probes").is_dir() else []
        raise FileNotFoundError(f"{path} not found (train with probes.flip.every=1 probes.flip.save_tokens=true); "
                                f"available: {', '.join(have) or 'none'}")
    cols = read_parquet(path)
    if "prompt_index" not in cols:
        raise ValueError(f"{path} has no prompt_index column (each row's prompt), so its rows cannot be matched to their "
                         "prompts; re-run training with probes.flip.save_tokens=true to write flip records that carry it")
    return cols


def rebuild_rows(cols: dict[str, list]) -> dict[int, list[int]]:
    """{row: response token ids in position order} from flip records (every
    sampled token of every row is recorded, positions 0..len-1)."""
    rows: dict[int, dict[int, int]] = {}
    for r, t, tok in zip(cols["row"], cols["position"], cols["token_id"]):
        rows.setdefault(int(r), {})[int(t)] = int(tok)
    out = {}
    for r, d in rows.items():
        if sorted(d) != list(range(len(d))):
            raise ValueError(f"flip records of row {r} do not cover positions 0..{len(d) - 1}")
        out[r] = [d[t] for t in range(len(d))]
    return out


# ----------------------------------------------------------------------------
# Fig. 11: repeated updates on the fixed batch
# ----------------------------------------------------------------------------


def repeated_update_deltas(model, batch, updates: int, *, lr: float, spec=None, temperature: float = 1.0,
                           grad_clip: float = 1.0, betas=(0.9, 0.999), weight_decay: float = 0.0) -> list[torch.Tensor]:
    """Apply `updates` AdamW steps of the clipped surrogate on the whole fixed
    `batch` (RolloutBatch with advantage) to `model` (in place; pass a copy) and
    return the cumulative Δ log p after each: a list of U tensors [B, T],
    l_u - l_0, 0 on padding. Ratios are against l_0 (multi-epoch PPO); spec: the
    loss (`tokencredit.update.LossSpec`, default clip 0.2 / 0.28 token-mean). Each
    update is one `tokencredit.update.optimizer_step` with the whole batch as
    one micro-batch."""
    import dataclasses

    from tokencredit.model import forward_tokens
    from tokencredit.update import LossSpec, optimizer_step

    with torch.no_grad():
        l0 = forward_tokens(model, batch, temperature=temperature, with_entropy=False)["logprob"].detach()  # [B, T]
    rows = dataclasses.replace(batch, old_logprob=l0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    spec = spec or LossSpec()
    out = []
    for _ in range(updates):
        optimizer_step(model, opt, [rows], spec, temperature=temperature, grad_clip=grad_clip)
        with torch.no_grad():
            lu = forward_tokens(model, batch, temperature=temperature, with_entropy=False)["logprob"]  # [B, T]
        out.append((lu - l0).cpu())
    return out


def _rows_batch(prompt_ids: dict[int, list[int]], responses: dict[int, list[int]], advantage: dict[int, float], pad_id: int, n: int):
    """RolloutBatch of the given rows (ordered by row id); prompts left-padded."""
    from tokencredit.batch import RolloutBatch

    rows = sorted(responses)
    P = max(len(prompt_ids[r]) for r in rows)
    T = max(len(responses[r]) for r in rows)
    pi = torch.full((len(rows), P), pad_id, dtype=torch.long)
    pm = torch.zeros((len(rows), P), dtype=torch.long)
    ri = torch.full((len(rows), T), pad_id, dtype=torch.long)
    rm = torch.zeros((len(rows), T), dtype=torch.float32)
    for b, r in enumerate(rows):
        p, o = prompt_ids[r], responses[r]
        pi[b, P - len(p):], pm[b, P - len(p):] = torch.tensor(p), 1
        ri[b, : len(o)], rm[b, : len(o)] = torch.tensor(o), 1.0
    return RolloutBatch(prompt_ids=pi, prompt_mask=pm, response_ids=ri, response_mask=rm,
                        group_id=torch.tensor([r // n for r in rows]), pad_id=int(pad_id),
                        advantage=torch.tensor([float(advantage[r]) for r in rows])), rows


# ----------------------------------------------------------------------------
# the probe on a run directory (incremental, resumable)
# ----------------------------------------------------------------------------


def run_value_probe(
    run_dir: str | Path,
    step: int,
    *,
    n_tokens: int = 32,
    M: int = 8,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    repeat: int = 0,
    max_new_tokens: int | None = None,
    mode: str = "shared",
    estimator: str = "direct",
    device: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    overrides: Sequence[str] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Value the tokens of probes/flip_step_{step}.parquet and append one JSON
    line per token to probes/value_step_{step}.jsonl (or `out`); tokens already
    in that file are skipped (resume). Returns {"path", "written", "skipped",
    "checkpoint", "M", "estimator", "gap": split_gap of all records in the
    file on their "value" (the `estimator`'s), "by_sign", "by_estimator":
    {name: split_gap of value_<name>} for every estimator on the same tokens
    (those where all three are finite; "n_common" of them), "undefined":
    {name: records where value_<name> is NaN}, "entropy_topk", "repeat", ...}.
    The run's config (+ `overrides`), threads and device are resolved by
    tokencredit/probes/context.py, as for the other probes.

    Each line: step, row, position, token_id, token_text, kind, sign, advantage,
    delta, entropy, old_prob (flip record), the fields of ``token_values`` (p,
    avg0 / avg1 / avg_alt and se0 / se1 / se_alt, value_direct / value_eq20 /
    value_am with se_direct / se_eq20 / se_am, value and value_se (the
    `estimator`'s), estimator, alt_mass, alt_reason, M, rewards0 / rewards1 /
    rewards_alt, len0 / len1 / len_alt, time_s; NaN is written as null),
    seed, checkpoint, checkpoint_exact, entropy_rank and entropy_tokens (the
    token's place among the batch's N response-token entropies, see
    ``entropy_ranks``; when the records have entropies), and delta_repeat
    (list of U) with --repeat. result["entropy_topk"] uses the batch-wide
    cut-offs (result["entropy_cutoffs"], {k: cut-off}).
    """
    import copy

    from tokencredit.probes.context import load_model_into, resolve_context
    from tokencredit.rundir import append_jsonl, read_jsonl

    ctx = resolve_context(run=run_dir, checkpoint=checkpoint, overrides=overrides, threads=threads, device=device,
                          latest=False, what="probe value")
    run_dir, cfg = ctx.run, ctx.cfg
    cols = _flip_columns(run_dir, step)
    out = Path(out) if out is not None else ctx.out / f"value_step_{step}.jsonl"
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    done = read_jsonl(out, repair=True)  # a torn last line (killed mid-write) is cut, so appending continues cleanly
    for r in done:
        if "value_direct" not in r:
            raise ValueError(f"{out} was written before the alternative branch (its records have no value_direct, and "
                             "their value is Eq. 20's); pass --out for a new file")
        if r.get("M") != M or r.get("seed") != seed or r.get("estimator") != estimator:
            raise ValueError(f"{out} was written with M={r.get('M')} seed={r.get('seed')} estimator={r.get('estimator')}; "
                             f"rerun with those, or pass --out for a new file")
    done_keys = {(r["row"], r["position"]) for r in done}

    # Fig. 5b: the whole update batch's response-token entropies (every flip record is one response token)
    batch_entropy = np.asarray([as_float(x) for x in cols.get("entropy", [])], dtype=np.float64)  # [N]
    batch_mask = np.isfinite(batch_entropy).astype(np.float64)  # [N] tokens without an entropy are left out
    picks = select_tokens(cols["delta"], cols["advantage"], n_tokens, eps=cfg.probes.flip.eps, seed=seed)
    todo = [(i, kind, sign) for i, kind, sign in picks if (int(cols["row"][i]), int(cols["position"][i])) not in done_keys]
    result: dict[str, Any] = {"path": out, "written": 0, "skipped": len(picks) - len(todo), "selected": len(picks)}
    if not picks:
        raise ValueError(f"flip_step_{step}: no row with A != 0 has both boosted and suppressed tokens (all rewards equal?)")

    if checkpoint:
        exact, desc = True, f"{checkpoint} (given)"
    else:
        ctx.checkpoint, exact, desc = pick_checkpoint(run_dir, step)
    result["checkpoint"] = desc
    if not exact:
        log.warning("value probe: using %s; values are not those of the policy that sampled step %d", desc, step)

    if todo:
        from tokencredit.data.promptset import build_prompt_set
        from tokencredit.rewards.functions import start_reward_functions

        load_model_into(ctx)
        model, tok = ctx.model, ctx.tokenizer
        responses = rebuild_rows(cols)
        row_adv = {int(r): float(a) for r, a in zip(cols["row"], cols["advantage"])}
        # each row's prompt: the index the trainer recorded (exact, also when the reward-balanced buffer mixed steps)
        prompt_set = build_prompt_set(cfg, tok)
        pidx = {int(r): int(i) for r, i in zip(cols["row"], cols["prompt_index"])}
        prompt_ids = {r: tok(prompt_set.prompts[pidx[r]], add_special_tokens=False)["input_ids"] for r in responses}

        delta_repeat: dict[tuple[int, int], list[float]] = {}
        if repeat:
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            batch, order = _rows_batch(prompt_ids, responses, row_adv, pad, cfg.rollout.n)
            from tokencredit.update import LossSpec

            deltas = repeated_update_deltas(copy.deepcopy(model).to(ctx.device).train(False), batch.to(ctx.device), repeat,
                                            lr=cfg.train.lr, spec=LossSpec.from_config(cfg, with_kl=False), temperature=ctx.temperature,
                                            grad_clip=cfg.train.grad_clip, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
            for i, _, _ in todo:
                r, t = int(cols["row"][i]), int(cols["position"][i])
                delta_repeat[(r, t)] = [float(d[order.index(r), t]) for d in deltas]
            if done and any("delta_repeat" not in d for d in done):
                log.warning("value probe: %s has records without delta_repeat (written without --repeat)", out)

        def write(k: int, res: dict) -> None:
            i, kind, sign = todo[k]
            r, t = int(cols["row"][i]), int(cols["position"][i])
            rec = {
                "step": step, "row": r, "position": t, "token_id": int(cols["token_id"][i]),
                "token_text": tok.decode([int(cols["token_id"][i])], skip_special_tokens=False),
                "kind": kind, "sign": sign, "advantage": float(cols["advantage"][i]), "delta": float(cols["delta"][i]),
                "entropy": float(cols["entropy"][i]) if "entropy" in cols else None,
                "old_prob": float(cols["old_prob"][i]) if "old_prob" in cols else None,
                **res, "seed": seed, "checkpoint": desc, "checkpoint_exact": exact,
            }
            if rec["entropy"] is not None and math.isfinite(rec["entropy"]):  # its place among the batch's entropies (Fig. 5b)
                rec["entropy_rank"] = int(entropy_ranks([rec["entropy"]], batch_entropy, batch_mask)[0])
                rec["entropy_tokens"] = int(batch_mask.sum())
            if (r, t) in delta_repeat:
                rec["delta_repeat"] = delta_repeat[(r, t)]
            append_jsonl(out, [rec])  # one line per token, flushed as it finishes
            result["written"] += 1

        rewards = start_reward_functions(cfg.reward)  # the run's reward functions, as the trainer scores

        def verifier(texts, answers, questions, extras):
            return rewards(texts, answers, questions, extras)[0]

        try:
            token_values(
                model, tok,
                [prompt_ids[int(cols["row"][i])] for i, _, _ in todo],
                [responses[int(cols["row"][i])] for i, _, _ in todo],
                [int(cols["position"][i]) for i, _, _ in todo],
                [prompt_set.answers[pidx[int(cols["row"][i])]] for i, _, _ in todo],
                M, verifier, max_new_tokens or cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p, seed=seed, rows=[int(cols["row"][i]) for i, _, _ in todo], mode=mode,
                estimator=estimator, progress=progress, on_result=write,
                contexts=[(prompt_set.questions[pidx[int(cols["row"][i])]], prompt_set.extras[pidx[int(cols["row"][i])]])
                          for i, _, _ in todo],
            )
        finally:
            rewards.close()

    recs = read_jsonl(out)
    result["M"], result["estimator"] = M, estimator
    result["gap"] = split_gap(recs)
    result.update(estimator_gaps(recs))
    result["by_sign"] = {s: split_gap([r for r in recs if r.get("sign") == s]) for s in ("pos", "neg")}
    ks = (20, 40, 60, 80, 100)
    if batch_mask.any():  # cut-offs over all response tokens of the batch, not over the valued ones
        result["entropy_cutoffs"] = dict(zip(ks, entropy_cutoffs(batch_entropy, batch_mask, ks).tolist()))
        result["entropy_topk"] = entropy_topk_gaps(recs, ks=ks, cutoffs=list(result["entropy_cutoffs"].values()))
    else:
        result["entropy_topk"] = []
    result["repeat"] = repeat_gaps(recs)
    ps = [(r["p"], r["old_prob"]) for r in recs if r.get("old_prob") is not None and r.get("p") is not None and r.get("checkpoint_exact")]
    if ps and cfg.rollout.temperature > 0 and cfg.rollout.top_p >= 1.0:  # else p is of another distribution than old_prob
        err = float(np.median([abs(a - b) for a, b in ps]))
        result["p_vs_old_prob_median_abs"] = err
        if err > 1e-3:
            log.warning("value probe: recomputed p differs from the flip record's old_prob (median |diff| %.2g): "
                        "wrong checkpoint or prompt mapping?", err)
    return result


# ----------------------------------------------------------------------------
# CLI: tokencredit probe value --run RUN_DIR --step N [key=value ...]
# ----------------------------------------------------------------------------


def cmd_value(args) -> int:
    if not args.run:
        bare = [o for o in args.overrides if "=" not in o]
        hint = f" (the run directory is no longer positional: --run {bare[0]})" if bare else ""
        print(f"tokencredit probe value: error: --run RUN_DIR is required{hint}", file=sys.stderr)
        return 2
    try:
        res = run_value_probe(
            args.run, args.step, n_tokens=args.tokens, M=args.M, seed=args.seed, checkpoint=args.checkpoint,
            repeat=args.repeat, max_new_tokens=args.max_new_tokens, mode=args.mode, estimator=args.estimator,
            device=args.device, out=args.out,
            progress=not args.no_progress, overrides=args.overrides, threads=args.threads,
        )
    except KeyboardInterrupt:
        print("tokencredit probe value: interrupted; every finished token is saved. Run the same command again to resume.", file=sys.stderr)
        return 130
    except ValueError as e:  # bad step / flags / run layout: one line, no traceback
        print(f"tokencredit probe value: error: {e}", file=sys.stderr)
        return 2
    try:  # the run's trackers (output.report_to) get the gaps; a tracker failure costs a warning only
        from tokencredit.tracking import send_run_summary

        numbers = {"gap": res["gap"], "by_sign": res["by_sign"], "by_estimator": res.get("by_estimator", {}), "M": res.get("M")}
        send_run_summary(args.run, numbers, prefix=f"probe/value_step_{args.step}/")
    except Exception as e:
        log.warning("probe value: summary numbers not sent to the run's trackers (%s)", e)
    g = res["gap"]
    est = res.get("estimator", args.estimator)
    print(f"{res['path']}: {res['written']} tokens valued now, {res['skipped']} already there (model: {res['checkpoint']})")
    print(f"M = {res.get('M', args.M)} continuations per branch (s_t + o_t, s_t, s_t without o_t); "
          f"estimator: {est} ({ESTIMATOR_FORMULAS[est]})")
    print(f"value gap (boosted - suppressed) = {g['gap']:.4f}  95% CI [{g['lo']:.4f}, {g['hi']:.4f}]  "
          f"(n = {g['n_boosted']} + {g['n_suppressed']})")
    for s, label in (("pos", "A > 0 rows"), ("neg", "A < 0 rows")):
        b = res["by_sign"][s]
        print(f"  {label}: gap {b['gap']:.4f} [{b['lo']:.4f}, {b['hi']:.4f}]  mean boosted {b['mean_boosted']:.4f}, "
              f"mean suppressed {b['mean_suppressed']:.4f}")
    if res.get("by_estimator"):
        und = res.get("undefined", {})
        print(f"  gap by estimator, on the {res['n_common']} tokens where all three are defined (undefined on: "
              + ", ".join(f"{e} {und.get(e, 0)}" for e in ESTIMATORS) + "):")
        for e in ESTIMATORS:
            b = res["by_estimator"][e]
            print(f"    {e:<6} {ESTIMATOR_FORMULAS[e]:<28} gap {b['gap']:.4f}  95% CI [{b['lo']:.4f}, {b['hi']:.4f}]")
    if res["entropy_topk"]:
        print("  gap on the valued tokens in the batch's top-k% highest-entropy tokens (Fig. 5b; cut-offs over all "
              "response tokens of the batch): " + ", ".join(f"k={r['k']:.0f}% (n={r['n']}): {r['gap']:.4f}" for r in res["entropy_topk"]))
    if res["repeat"]:
        print("  gap after u repeated updates (Fig. 11): " + ", ".join(f"u={r['update']}: {r['gap']:.4f}" for r in res["repeat"]))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "value",
        help="Monte Carlo token value Q(s,o_t) - Q_{-o_t}(s) of boosted vs suppressed tokens of one update",
        description="Estimate the counterfactual value Q(s_t, o_t) - Q_{-o_t}(s_t) of equal numbers of boosted and suppressed "
        "tokens of rollout step N (from probes/flip_step_N.parquet) from three branches of M continuations (from s_t + o_t, "
        "from s_t, from s_t with o_t excluded) and write probes/value_step_N.jsonl, one line per token, with all three "
        "estimators (direct avg0 - avg_alt, Eq. 20 (avg0 - avg1) / (1 - p), A_M avg0 - avg1). "
        "Interrupt at any time; the same command resumes.",
    )
    p.add_argument("--run", metavar="RUN_DIR", help="the run directory (required): config.yaml, probes/flip_step_N.parquet, checkpoints/")
    p.add_argument("--step", type=int, required=True, help="rollout step N (needs probes/flip_step_N.parquet)")
    p.add_argument("--tokens", type=int, default=32, help="tokens to value: tokens/4 per (boosted|suppressed) x (A>0|A<0)")
    p.add_argument("--M", type=int, default=8, help="continuations per branch (paper: 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=0, metavar="U", help="also record Δ log p after 1..U repeated updates on the batch (Fig. 11)")
    p.add_argument("--checkpoint", default=None, help="checkpoint dir to load instead of checkpoints/step_{N-1}")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default: the run's rollout.max_new_tokens)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="direct",
                   help="the value the gaps use: direct = avg0 - avg_alt (default), eq20 = (avg0 - avg1) / (1 - p) "
                   "(noisy for likely tokens), am = avg0 - avg1; every record stores all three")
    p.add_argument("--mode", choices=MODES, default="shared", help="continuation batching (shared = prefix KV cache shared)")
    p.add_argument("--device", default=None, help="default: the run's model.device (auto = cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: model.threads, else torch's default)")
    p.add_argument("--out", default=None, help="output JSONL (default RUN_DIR/probes/value_step_N.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on the run's config.yaml, e.g. rollout.top_p=0.9")
    p.set_defaults(func=cmd_value)


if __name__ == "__main__":  # python -m tokencredit.probes.value --run RUN_DIR --step N ... (same as `tokencredit probe value`)
    import argparse

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _ap = argparse.ArgumentParser(prog="python -m tokencredit.probes.value")
    add_cli(_ap.add_subparsers(dest="command", required=True))
    _args = _ap.parse_args(["value", *sys.argv[1:]])
    sys.exit(_args.func(_args))
