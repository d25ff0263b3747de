"""Confidence intervals that respect how tokens are correlated: resample whole groups
(prompts), never single tokens (tokens of one rollout, and rollouts of one prompt,
share a context, so a token-level bootstrap is too narrow).

Pure numpy functions:
    group_sums(group [N], {name: [N]})           -> (ids [G], {name: [G]})
    ratio_ci(num [G], den [G], reps, seed)        -> (sum num / sum den, lo, hi)
    flip_fractions_ci(table, group_of_row [B])    -> Fig. 1 fractions with intervals
    boost_rates_ci(candidates, group_of_row [B])  -> Table 1 Boost Rates with intervals
    gap_ci(value [n], boosted [n], group [n])     -> Fig. 5a value gap with an interval

Try it:
    ids, s = group_sums(np.array([0, 0, 1]), {"b": np.array([1, 0, 1]), "n": np.ones(3)})
    ratio_ci(s["b"], s["n"])   # (0.667, lo, hi)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["group_sums", "ratio_ci", "flip_fractions_ci", "boost_rates_ci", "gap_ci"]


def group_sums(group: np.ndarray, columns: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-group sums of per-token columns.

    group: [N] group id of each token; columns: {name: [N] numbers or booleans}.
    Returns (ids [G] sorted distinct ids, {name: [G] float64 sums})."""
    ids, inv = np.unique(np.asarray(group), return_inverse=True)
    return ids, {k: np.bincount(inv, weights=np.asarray(v, dtype=np.float64), minlength=len(ids)) for k, v in columns.items()}


def ratio_ci(num: np.ndarray, den: np.ndarray, reps: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """sum(num) / sum(den) and its percentile (1 - alpha) interval when the G groups are
    resampled with replacement (each replicate: G draws, pooled ratio).

    num, den: [G] per-group sums. Returns (ratio, lo, hi); NaN x 3 when den sums to 0;
    replicates whose drawn den sums to 0 are left out."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if den.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    value = float(num.sum() / den.sum())
    if reps <= 0:
        return value, value, value
    idx = np.random.default_rng(seed).integers(0, len(num), size=(reps, len(num)))  # [R, G]
    d = den[idx].sum(1)  # [R]
    r = num[idx].sum(1)[d > 0] / d[d > 0]
    lo, hi = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    return value, float(lo), float(hi)


def flip_fractions_ci(table: dict[str, Any], group_of_row: np.ndarray, eps: float = 1e-6, reps: int = 2000,
                      seed: int = 0) -> dict[str, Any]:
    """Fig. 1's boosted / suppressed / stable token fractions with group-bootstrap intervals.

    table: the polarity probe's per-token columns (row, advantage and one or more
    delta_<variant>); group_of_row: [B] group id of every batch row.
    Returns {variant: {"pos" | "neg" | "all": {"boosted" | "suppressed" | "stable":
    [value, lo, hi], "tokens": n}}} for every delta_<variant> column, and with two
    variants "sign_agreement" / "sign_agreement_pos": [value, lo, hi], the share of
    (all / A>0) tokens whose two deltas have the same sign (a token that neither
    update moves at all, delta exactly 0 in both, counts as agreeing)."""
    row = np.asarray(table["row"], dtype=np.int64)
    g = np.asarray(group_of_row)[row]  # [N]
    adv = np.asarray(table["advantage"], dtype=np.float64)
    subsets = {"pos": adv > 0, "neg": adv < 0, "all": np.ones(len(adv), dtype=bool)}
    variants = [k.removeprefix("delta_") for k in table if k.startswith("delta_")]
    out: dict[str, Any] = {}
    for var in variants:
        d = np.asarray(table[f"delta_{var}"], dtype=np.float64)
        cls = {"boosted": d > eps, "suppressed": d < -eps, "stable": np.abs(d) <= eps}
        out[var] = {}
        for sub, sel in subsets.items():
            _, s = group_sums(g, {**{k: v & sel for k, v in cls.items()}, "n": sel})
            out[var][sub] = {k: list(ratio_ci(s[k], s["n"], reps, seed)) for k in cls} | {"tokens": int(sel.sum())}
    if len(variants) == 2:
        a, b = (np.sign(np.asarray(table[f"delta_{v}"], dtype=np.float64)) for v in variants)
        same = a == b
        _, s = group_sums(g, {"same": same, "n": np.ones(len(same)), "same_pos": same & subsets["pos"], "pos": subsets["pos"]})
        out["sign_agreement"] = list(ratio_ci(s["same"], s["n"], reps, seed))
        out["sign_agreement_pos"] = list(ratio_ci(s["same_pos"], s["pos"], reps, seed))
    return out


def boost_rates_ci(cands: dict, group_of_row: np.ndarray, reps: int = 2000, seed: int = 0) -> list[dict]:
    """Table 1's Boost Rates with percentile intervals from a bootstrap over prompts.

    cands: the masking probe's tables["candidates"] (one row per (candidate, set):
    row, set, set_size, set_adv_sum, delta_lm_head, delta_full and, with the sign
    split, set_size_{pos,neg}, delta_{lm_head,full}_{pos,neg}); group_of_row: [B]
    group (prompt) id of every batch row. A candidate counts for a (reading, set,
    mode) when that reading's set is not empty and its delta is finite (the probe's
    summary rule), boosted when its statistic is > 0: delta for readings all / pos /
    neg, sign(set_adv_sum) * delta for aligned. Returns one dict per (reading, set,
    mode) that has candidates: n, prompts, boost_rate = [value, lo, hi] (value =
    the probe's own Boost Rate), mean_boost."""
    c = {k: np.asarray(v) for k, v in cands.items() if k != "set_tokens"}
    g = np.asarray(group_of_row)[c["row"].astype(np.int64)]  # [C * sets] each candidate row's prompt
    out = []
    for reading in ("all", "pos", "neg", "aligned"):
        if reading in ("pos", "neg") and f"set_size_{reading}" not in c:
            continue
        for name in dict.fromkeys(c["set"].tolist()):
            sel = c["set"] == name
            for mode in ("lm_head", "full"):
                tag = f"_{reading}" if reading in ("pos", "neg") else ""
                d = c[f"delta_{mode}{tag}"].astype(np.float64)
                if reading == "aligned":
                    d = np.sign(c["set_adv_sum"].astype(np.float64)) * d
                size = c[f"set_size{tag}"]
                valid = sel & (size > 0) & np.isfinite(d)
                if not valid.any():
                    continue
                _, sums = group_sums(g[valid], {"b": d[valid] > 0, "n": np.ones(int(valid.sum()))})
                out.append({"reading": reading, "set": name, "mode": mode, "n": int(valid.sum()),
                            "prompts": int((sums["n"] > 0).sum()), "boost_rate": list(ratio_ci(sums["b"], sums["n"], reps, seed)),
                            "mean_boost": float(d[valid].mean())})
    return out


def gap_ci(value: np.ndarray, boosted: np.ndarray, group: np.ndarray, reps: int = 2000, seed: int = 0,
           alpha: float = 0.05) -> tuple[float, float, float]:
    """Value gap mean(value | boosted) - mean(value | suppressed) (Fig. 5a) and its
    percentile (1 - alpha) interval when whole groups (prompts) are resampled.

    value: [n] token values; boosted: [n] bool (False = suppressed); group: [n] the
    prompt of each token (several valued tokens of one prompt share its context).
    Non-finite values are dropped first. Each replicate draws G groups with
    replacement and pools their tokens; replicates without a boosted or without a
    suppressed token are left out. Returns (gap, lo, hi); NaN x 3 when a side is
    empty; lo == hi == gap when reps <= 0."""
    value, boosted, group = np.asarray(value, np.float64), np.asarray(boosted, bool), np.asarray(group)
    keep = np.isfinite(value)
    value, boosted, group = value[keep], boosted[keep], group[keep]
    if not boosted.any() or boosted.all():
        return float("nan"), float("nan"), float("nan")
    _, s = group_sums(group, {"vb": np.where(boosted, value, 0.0), "nb": boosted, "vs": np.where(boosted, 0.0, value), "ns": ~boosted})
    gap = float(s["vb"].sum() / s["nb"].sum() - s["vs"].sum() / s["ns"].sum())
    if reps <= 0:
        return gap, gap, gap
    idx = np.random.default_rng(seed).integers(0, len(s["nb"]), size=(reps, len(s["nb"])))  # [R, G]
    nb, ns = s["nb"][idx].sum(1), s["ns"][idx].sum(1)  # [R]
    ok = (nb > 0) & (ns > 0)
    r = s["vb"][idx].sum(1)[ok] / nb[ok] - s["vs"][idx].sum(1)[ok] / ns[ok]
    lo, hi = np.quantile(r, [alpha / 2, 1 - alpha / 2])
    return gap, float(lo), float(hi)
