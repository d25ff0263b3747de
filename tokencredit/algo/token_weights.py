"""Token weights and sample-polarity advantage: which tokens (and rows) carry the
policy gradient.

Methods, each a pure function (tensors in, tensors out, masks everywhere):

- Forking tokens (Wang et al. 2025, "Beyond the 80/20 Rule", arXiv 2506.01939;
  papers/beyond-80-20-summary.txt, METHODS.md section 3): keep the tokens whose
  entropy is in the top `top` fraction (0.2) of the valid tokens in scope,
  weight 0 elsewhere. Controls: bottom 80% (`forking_low_mask`) and a random
  subset of the same size (`random_token_mask`).
- Entropy band (cancellation paper, Fig. 5b: the boosted-minus-suppressed value
  gap peaks for the top-40% entropy subset): `entropy_band_mask`.
- Sample polarity (Zhu et al. 2025, arXiv 2506.01347; METHODS.md section 5):
  PSR / NSR / W-REINFORCE *replace* the advantages (`polarity_advantages`); the
  cancellation paper's controls keep GRPO advantages and mask rows by reward
  (`sign_mask_advantages`).
- ResRL (tokencredit/algo/resrl.py).

`compute_token_weights` dispatches by name and returns
`(token_weight [B, T] | None, advantage [B], stats)`; the trainer multiplies
A by token_weight inside the clipped surrogate.

Deliberate simplifications / choices:

- Scope. Every selection is a function of the *set* of rows passed in: the same
  answer for any row order, different answers for different row sets. The trainer
  chooses the scope (micro-batch as in the authors' verl code, mini-batch
  (suggested default), or rollout batch) by what it passes.
- Denominator. These functions only produce weights. Whether a weight-0 token
  still counts in the token-mean denominator (paper and TRL: it does, "all";
  authors' code: it does not, "kept") is the loss aggregation's choice.
- k = max(1, ceil(top * N_valid)) is evaluated with a 1e-9 guard against float
  noise, so 0.7 * 10 gives k = 7, not 8.

Try it::

    w, adv, stats = compute_token_weights("forking", entropy=ent, mask=mask,
                                          advantage=adv, top=0.2)
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch

from tokencredit.registry import Registry

from .resrl import resrl_weights

__all__ = [
    "forking_mask",
    "forking_low_mask",
    "random_token_mask",
    "entropy_band_mask",
    "polarity_advantages",
    "sign_mask_advantages",
    "compute_token_weights",
    "TOKEN_WEIGHT_METHODS",
]

_CEIL_GUARD = 1e-9


def _count(frac: float, n: int) -> int:
    """k = ceil(frac * n), robust to float noise (0.7 * 10 -> 7)."""
    return int(math.ceil(frac * n - _CEIL_GUARD))


def _check_frac(name: str, frac: float) -> None:
    if not (0.0 < frac <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {frac}")


def _check_shapes(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must have the same shape")
    return mask > 0  # [B, T] bool valid tokens


def forking_mask(entropy: torch.Tensor, mask: torch.Tensor, top: float = 0.2) -> torch.Tensor:
    """Forking-token mask: entropy in the top `top` fraction of the valid tokens.

    entropy: [B, T] float; mask: [B, T], > 0 = valid token.
    Returns [B, T] float in {0, 1}.

    threshold tau = the k-th largest valid entropy, k = max(1, ceil(top * N_valid));
    keep valid tokens with H >= tau. Ties at tau are all kept, so the kept count is
    exactly k unless ties straddle tau. Padding is never selected; N_valid = 0
    gives all zeros; top = 1 keeps every valid token. top <= 0 or > 1: ValueError.
    """
    _check_frac("top", top)
    return _rank_threshold_mask(entropy, mask, top, largest=True)


def forking_low_mask(entropy: torch.Tensor, mask: torch.Tensor, bottom: float = 0.8) -> torch.Tensor:
    """Low-entropy control: entropy in the bottom `bottom` fraction of valid tokens.

    entropy, mask: [B, T]. Returns [B, T] float in {0, 1}.

    The mirror of `forking_mask`: tau = the k-th smallest valid entropy,
    k = max(1, ceil(bottom * N_valid)); keep valid tokens with H <= tau (ties kept).
    It is not the exact complement of `forking_mask(1 - bottom)`: when
    (1 - bottom) * N_valid is not an integer both round up and one token is in
    both; ties at either threshold also overlap.
    """
    _check_frac("bottom", bottom)
    return _rank_threshold_mask(entropy, mask, bottom, largest=False)


def _rank_threshold_mask(entropy: torch.Tensor, mask: torch.Tensor, frac: float, largest: bool) -> torch.Tensor:
    """Valid tokens at or beyond the k-th largest (largest=True: H >= tau) or k-th
    smallest (H <= tau) valid entropy, k = max(1, ceil(frac * N_valid)); ties kept.
    [B, T] float in {0, 1}; all zeros when no token is valid."""
    valid = _check_shapes(entropy, mask)
    out = torch.zeros(entropy.shape, dtype=torch.float32, device=entropy.device)
    vals = entropy[valid].float()  # (N_valid,)
    if vals.numel() == 0:
        return out
    k = max(1, _count(frac, vals.numel()))
    kth = torch.topk(vals, k, largest=largest, sorted=False).values  # the k extreme entropies
    if largest:
        out[valid & (entropy.float() >= kth.min())] = 1.0  # 1[H_t >= tau_rho] (80/20 paper)
    else:
        out[valid & (entropy.float() <= kth.max())] = 1.0  # 1[H_t <= tau]
    return out


def random_token_mask(
    mask: torch.Tensor,
    count_like: torch.Tensor | int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random control: `count` valid tokens drawn uniformly without replacement.

    mask: [B, T], > 0 = valid. count_like: an int, or a [B, T] mask whose number
    of selected valid tokens (> 0 and valid) sets the count, e.g. a forking mask.
    generator: torch.Generator for the draw (on CPU or on mask's device).
    Returns [B, T] float in {0, 1} with exactly `count` ones, all on valid tokens.
    """
    valid = mask > 0  # [B, T]
    n = int(valid.sum())
    if isinstance(count_like, torch.Tensor):
        if count_like.shape != mask.shape:
            raise ValueError(f"count_like {tuple(count_like.shape)} must match mask {tuple(mask.shape)}")
        count = int(((count_like > 0) & valid).sum())
    else:
        count = int(count_like)
    if not 0 <= count <= n:
        raise ValueError(f"count must be in [0, N_valid={n}], got {count}")
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randperm(n, generator=generator, device=gen_dev)[:count].to(mask.device)  # (count,)
    flat = torch.zeros(n, dtype=torch.float32, device=mask.device)  # (N_valid,) row-major valid tokens
    flat[pick] = 1.0
    out[valid] = flat
    return out


def _top_fraction(entropy: torch.Tensor, mask: torch.Tensor, frac: float) -> torch.Tensor:
    """forking_mask extended to frac = 0 (empty set). [B, T] float."""
    if frac <= 0.0:
        return torch.zeros(entropy.shape, dtype=torch.float32, device=entropy.device)
    return forking_mask(entropy, mask, frac)


def entropy_band_mask(entropy: torch.Tensor, mask: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Entropy band in "top fraction" coordinates: the tokens in the top `hi`
    fraction but not in the top `lo` fraction of the valid tokens by entropy.

    entropy, mask: [B, T]. 0 <= lo < hi <= 1. Returns [B, T] float in {0, 1}.

    Coordinate 0 is the highest entropy: band (0, 0.2) == forking_mask(top=0.2),
    (0.2, 0.4) is the next 20%, and bands (0, a), (a, b), (b, 1) partition the
    valid tokens (ties at a boundary fall in the higher-entropy band). The
    cancellation paper (Fig. 5b) finds the value gap largest on the top-40%
    subset, i.e. band (0, 0.4).
    band = top(hi) - top(lo), top(f) = forking_mask(f), top(0) = {}.
    """
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    _check_shapes(entropy, mask)
    upper = _top_fraction(entropy, mask, hi)  # [B, T]
    inner = _top_fraction(entropy, mask, lo)  # [B, T]
    return upper * (1.0 - inner)


# ---------------------------------------------------------------- sample polarity

_POLARITY = {
    # mode: (advantage if correct, advantage if incorrect); lam fills "lam"
    "psr": (1.0, 0.0),
    "nsr": (0.0, -1.0),
    "w_reinforce": ("lam", -1.0),
}


def polarity_advantages(rewards: torch.Tensor, mode: str, lam: float = 0.1, threshold: float = 0.5) -> torch.Tensor:
    """Zhu et al. (2025) sample-polarity advantages; these REPLACE GRPO advantage.

    rewards: [B]; reward >= threshold counts as correct (the trainer passes
    reward.correct_threshold; 0.5 for 0/1 rewards). No baseline, no std.
      psr:         A = +1 correct, 0 incorrect
      nsr:         A =  0 correct, -1 incorrect
      w_reinforce: A = +lam correct, -1 incorrect (lam = 0.1)
    Returns [B] float32.
    """
    if mode not in _POLARITY:
        raise ValueError(f"unknown polarity mode {mode!r}; valid: {', '.join(sorted(_POLARITY))}")
    a_pos, a_neg = _POLARITY[mode]
    a_pos = lam if a_pos == "lam" else a_pos
    correct = rewards >= threshold  # [B]
    out = torch.full(rewards.shape, float(a_neg), dtype=torch.float32, device=rewards.device)
    out[correct] = float(a_pos)
    return out



def sign_mask_advantages(advantage: torch.Tensor, rewards: torch.Tensor, keep: str, threshold: float = 0.5) -> torch.Tensor:
    """Cancellation-paper control (App. E.1): keep GRPO advantage, mask rows.

    advantage, rewards: [B]. keep="positive": A+ = A * 1[r = 1];
    keep="negative": A- = A * 1[r != 1]. "r = 1" means reward >= threshold.
    Returns [B] in advantage's dtype.
    """
    correct = rewards >= threshold  # [B]
    if keep == "positive":
        sel = correct
    elif keep == "negative":
        sel = ~correct
    else:
        raise ValueError(f"keep must be 'positive' or 'negative', got {keep!r}")
    return advantage * sel.to(advantage.dtype)  # A * 1[r = 1] (or mirror)


# methods that change which rows train (the advantage itself), not token weights
SAMPLE_POLARITY_METHODS = ("psr", "nsr", "w_reinforce", "positive_only", "negative_only")


def training_advantages(
    method: str, advantage: torch.Tensor, rewards: torch.Tensor, lam: float = 0.1, threshold: float = 0.5
) -> torch.Tensor:
    """The advantage that trains each row: [B] -> [B].

    Sample-polarity methods replace (psr, nsr, w_reinforce) or mask (positive_only,
    negative_only) the group advantage row by row, from the row's reward alone, so
    the result does not depend on how the batch is later cut. The trainer applies
    this right after the group advantage, before dynamic sampling and the
    reward-balanced buffer, so both count the signs that actually train (an
    all-correct group under w_reinforce keeps +lam on every row). Every other
    method returns `advantage` unchanged. Idempotent. A row is correct when its
    reward >= threshold (reward.correct_threshold).
    """
    if method in ("psr", "nsr", "w_reinforce"):
        return polarity_advantages(rewards, method, lam, threshold).to(advantage.dtype)
    if method == "positive_only":
        return sign_mask_advantages(advantage, rewards, "positive", threshold)
    if method == "negative_only":
        return sign_mask_advantages(advantage, rewards, "negative", threshold)
    return advantage


# ---------------------------------------------------------------- dispatcher

# Each method: (inputs: dict, params) -> (token_weight | None, advantage, extra stats)
TOKEN_WEIGHT_METHODS: Registry[Callable] = Registry("token weight method")


def _need(inputs: dict, name: str, method: str):
    v = inputs[name]
    if v is None:
        raise ValueError(f"token weight method {method!r} needs {name}")
    return v


# method -> its keywords from the run's `token_weights` config section; a new
# method registers both here (`register_method`) and nothing else changes:
# config validation, its help text and the trainer read the registry.
_FROM_CONFIG: dict[str, Callable[[Any], dict[str, Any]]] = {}


def register_method(name: str, from_config: Callable[[Any], dict[str, Any]] = lambda tw: {}):
    """Register a token-weight method `fn(inputs, **params) -> (weight, advantage,
    stats)` under `name`; `from_config(cfg.token_weights)` gives its params."""

    def deco(fn):
        TOKEN_WEIGHT_METHODS.register(name)(fn)
        _FROM_CONFIG[name] = from_config
        return fn

    return deco


def method_params(tw: Any, threshold: float) -> dict[str, Any]:
    """The keywords `compute_token_weights` gets for the config section `tw`
    (cfg.token_weights); `threshold` (reward.correct_threshold) goes to every
    method that takes one."""
    params = dict(_FROM_CONFIG[tw.method](tw))
    if "threshold" in inspect.signature(TOKEN_WEIGHT_METHODS.get(tw.method)).parameters:
        params["threshold"] = threshold
    return params


@register_method("none")
def _m_none(inp):
    return None, inp["advantage"], {}


@register_method("forking", lambda tw: {"top": tw.top})
def _m_forking(inp, top: float = 0.2):
    return forking_mask(_need(inp, "entropy", "forking"), inp["mask"], top), inp["advantage"], {}


@register_method("forking_low", lambda tw: {"bottom": 1.0 - tw.top})
def _m_forking_low(inp, bottom: float = 0.8):
    return forking_low_mask(_need(inp, "entropy", "forking_low"), inp["mask"], bottom), inp["advantage"], {}


@register_method("forking_random", lambda tw: {"top": tw.top})
def _m_forking_random(inp, top: float = 0.2):
    # same count as the forking mask on these rows (ties included)
    ref = forking_mask(_need(inp, "entropy", "forking_random"), inp["mask"], top)
    return random_token_mask(inp["mask"], ref, inp["generator"]), inp["advantage"], {}


@register_method("entropy_band", lambda tw: {"lo": tw.band[0], "hi": tw.band[1]})
def _m_entropy_band(inp, lo: float = 0.0, hi: float = 0.4):
    w = entropy_band_mask(_need(inp, "entropy", "entropy_band"), inp["mask"], lo, hi)
    return w, inp["advantage"], {}


def _polarity(mode: str):
    if mode == "w_reinforce":

        def fn(inp, lam: float = 0.1, threshold: float = 0.5):
            return None, polarity_advantages(_need(inp, "rewards", mode), mode, lam, threshold), {}

    else:

        def fn(inp, threshold: float = 0.5):
            return None, polarity_advantages(_need(inp, "rewards", mode), mode, threshold=threshold), {}

    return fn


register_method("psr")(_polarity("psr"))
register_method("nsr")(_polarity("nsr"))
register_method("w_reinforce", lambda tw: {"lam": tw.lam})(_polarity("w_reinforce"))


@register_method("positive_only")
def _m_positive_only(inp, threshold: float = 0.5):
    return None, sign_mask_advantages(inp["advantage"], _need(inp, "rewards", "positive_only"), "positive", threshold), {}


@register_method("negative_only")
def _m_negative_only(inp, threshold: float = 0.5):
    return None, sign_mask_advantages(inp["advantage"], _need(inp, "rewards", "negative_only"), "negative", threshold), {}


_RESRL_PARAMS = ("rank", "max_pos_tokens", "q_low", "q_high", "min_w", "pos_scale", "niter", "svd")


@register_method("resrl", lambda tw: {"rank": tw.resrl_rank, "max_pos_tokens": tw.resrl_max_pos_tokens, "pos_scale": tw.resrl_pos_scale})
def _m_resrl(inp, threshold: float = 0.5, **params):
    bad = sorted(set(params) - set(_RESRL_PARAMS))
    if bad:
        raise TypeError(f"token weight method 'resrl': unknown parameters {bad}; valid: {', '.join(_RESRL_PARAMS)}")
    hidden = _need(inp, "hidden", "resrl")
    group_id = _need(inp, "group_id", "resrl")
    is_pos = inp["is_positive"]
    if is_pos is None:
        is_pos = _need(inp, "rewards", "resrl") >= threshold
    w, stats = resrl_weights(hidden, inp["mask"], group_id, is_pos, generator=inp["generator"], **params)
    return w, inp["advantage"], stats


def _row_mean(w: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> float:
    sel = valid & rows[:, None]  # [B, T]
    n = int(sel.sum())
    return float(w[sel].sum()) / n if n else float("nan")


def compute_token_weights(
    method: str,
    *,
    mask: torch.Tensor,
    advantage: torch.Tensor,
    entropy: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    group_id: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    is_positive: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **params,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """Token weights and (possibly replaced) advantages for one scope of rows.

    method: none | forking | forking_low | forking_random | entropy_band | psr |
      nsr | w_reinforce | positive_only | negative_only | resrl (KeyError lists
      them for an unknown name).
    mask: [B, T] response mask; advantage: [B]; entropy: [B, T]; rewards: [B];
    group_id: [B]; hidden: [B, T, H] (resrl); is_positive: [B] bool (resrl;
    default rewards >= threshold); generator: for forking_random / resrl subsampling.
    params: the method's own keywords (forking/forking_random: top=0.2;
      forking_low: bottom=0.8; entropy_band: lo=0.0, hi=0.4; w_reinforce: lam=0.1;
      resrl: rank, max_pos_tokens, q_low, q_high, min_w, pos_scale, niter, svd;
      psr / nsr / w_reinforce / positive_only / negative_only / resrl:
      threshold=0.5, the reward at or above which a row is correct).
      An unknown keyword is a TypeError.

    Returns (token_weight, advantage, stats):
      token_weight: [B, T] float32 (0 on padding) or None (= 1 everywhere).
      advantage: [B] GRPO advantages unchanged, or replaced (psr, nsr,
        w_reinforce) / masked (positive_only, negative_only).
      stats: tw_kept_frac (fraction of valid tokens with weight > 0),
        tw_mean_w_pos / tw_mean_w_neg (mean weight over valid tokens of rows
        whose *returned* advantage is > 0 / < 0; nan when there are none), plus
        the method's own stats (resrl_*).
    """
    fn = TOKEN_WEIGHT_METHODS.get(method)
    inputs = dict(
        mask=mask,
        advantage=advantage,
        entropy=entropy,
        rewards=rewards,
        group_id=group_id,
        hidden=hidden,
        is_positive=is_positive,
        generator=generator,
    )
    sig = inspect.signature(fn)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = [n for n in sig.parameters if n != "inp"]
        bad = sorted(set(params) - set(accepted))
        if bad:
            raise TypeError(
                f"token weight method {method!r}: unknown parameters {bad}; valid: {', '.join(accepted) or 'none'}"
            )
    weight, adv, extra = fn(inputs, **params)

    valid = mask > 0  # [B, T]
    w = weight if weight is not None else valid.to(torch.float32)  # [B, T]
    n_valid = int(valid.sum())
    stats = {
        "tw_kept_frac": float(((w > 0) & valid).sum()) / n_valid if n_valid else float("nan"),
        "tw_mean_w_pos": _row_mean(w, valid, adv > 0),
        "tw_mean_w_neg": _row_mean(w, valid, adv < 0),
    }
    stats.update(extra)
    return weight, adv, stats
