"""Group (cluster) bootstrap of token fractions: hand-computed values and a brute-force
enumeration of every resample on two groups."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokencredit.probes.bootstrap import boost_rates_ci, flip_fractions_ci, gap_ci, group_sums, ratio_ci


def test_group_sums_by_hand():
    ids, s = group_sums(np.array([7, 3, 7, 7]), {"b": np.array([True, False, True, False]), "n": np.ones(4)})
    assert ids.tolist() == [3, 7] and s["b"].tolist() == [0.0, 2.0] and s["n"].tolist() == [1.0, 3.0]


def test_ratio_ci_pools_tokens_and_stays_inside_the_resample_support():
    num, den = np.array([1.0, 3.0]), np.array([4.0, 4.0])  # groups at 0.25 and 0.75
    v, lo, hi = ratio_ci(num, den, reps=4000, seed=1)
    # float64 ratios of small integers and percentiles that land on resample values: ~1e-16, approx's default is slack
    assert v == pytest.approx(0.5)  # pooled 4 / 8
    # every resample of 2 groups out of 2: (a,a) 0.25, (a,b) 0.5, (b,a) 0.5, (b,b) 0.75
    support = {float(sum(num[list(p)]) / sum(den[list(p)])) for p in itertools.product(range(2), repeat=2)}
    assert support == {0.25, 0.5, 0.75} and lo == pytest.approx(0.25) and hi == pytest.approx(0.75)
    assert ratio_ci(np.array([2.0]), np.array([5.0])) == pytest.approx((0.4, 0.4, 0.4))  # one group: no spread
    assert all(np.isnan(ratio_ci(np.zeros(3), np.zeros(3))))


def test_flip_fractions_by_hand_and_sign_agreement():
    # rows 0, 1 in group 10 (A > 0, A < 0), row 2 in group 11 (A > 0)
    table = {"row": [0, 0, 1, 2, 2], "advantage": [1.0, 1.0, -1.0, 0.5, 0.5],
             "delta_grpo": [0.1, -0.2, -0.3, 0.0, 0.4], "delta_positive_only": [0.1, 0.2, 0.3, 0.0, 0.4]}
    out = flip_fractions_ci(table, np.array([10, 10, 11]), reps=500)
    # float64 count ratios (error ~1e-16): approx's default rel 1e-6 is slack
    g = out["grpo"]
    assert g["pos"]["boosted"][0] == pytest.approx(2 / 4) and g["pos"]["stable"][0] == pytest.approx(1 / 4)
    assert g["neg"]["suppressed"][0] == pytest.approx(1.0) and g["neg"]["tokens"] == 1
    assert g["all"]["tokens"] == 5
    assert out["positive_only"]["pos"]["boosted"][0] == pytest.approx(3 / 4)  # 0.1, 0.2, 0.4 of 4
    assert out["sign_agreement"][0] == pytest.approx(3 / 5)  # tokens 0, 3 (both 0), 4 agree
    assert out["sign_agreement_pos"][0] == pytest.approx(3 / 4)


def test_boost_rates_by_hand_for_every_reading():
    # two candidates x one set; candidate 0 in row 0 (group 5), candidate 1 in row 1 (group 6)
    cands = {"row": [0, 1], "set": ["same_token", "same_token"], "set_size": [2, 1], "set_adv_sum": [-0.5, 0.0],
             "delta_lm_head": [0.2, 0.3], "delta_full": [-0.1, float("nan")],  # candidate 1 not run on the full path
             "set_size_pos": [1, 0], "set_size_neg": [1, 1],
             "delta_lm_head_pos": [0.4, 0.0], "delta_lm_head_neg": [-0.2, -0.1],
             "delta_full_pos": [0.3, float("nan")], "delta_full_neg": [-0.4, float("nan")], "set_tokens": [[1, 2], [3]]}
    out = {(r["reading"], r["mode"]): r for r in boost_rates_ci(cands, np.array([5, 6]), reps=400)}
    assert out[("all", "lm_head")]["boost_rate"][0] == 1.0 and out[("all", "lm_head")]["n"] == 2
    assert out[("all", "full")]["n"] == 1 and out[("all", "full")]["boost_rate"] == [0.0, 0.0, 0.0]
    assert out[("pos", "lm_head")]["n"] == 1 and out[("pos", "lm_head")]["boost_rate"][0] == 1.0  # empty A>0 set left out
    assert out[("neg", "lm_head")]["boost_rate"][0] == 0.0 and out[("neg", "lm_head")]["prompts"] == 2
    # aligned: sign(-0.5) * 0.2 < 0 (not boosted); net weight 0 -> 0 (not boosted)
    assert out[("aligned", "lm_head")]["boost_rate"][0] == 0.0
    assert out[("aligned", "lm_head")]["mean_boost"] == pytest.approx(-0.1)  # float64 hand numbers: error ~1e-17
    assert out[("aligned", "full")]["mean_boost"] == pytest.approx(0.1)  # -1 * -0.1
    lo, hi = out[("all", "lm_head")]["boost_rate"][1:]
    assert lo == hi == 1.0  # every prompt's candidate is boosted: no resample differs


def test_gap_ci_by_hand_and_by_enumerating_resamples():
    # group 0: boosted 1.0, suppressed 0.0; group 1: boosted 0.5 and 0.5, suppressed 0.5; a NaN is dropped
    v = np.array([1.0, 0.0, 0.5, 0.5, 0.5, np.nan])
    b = np.array([True, False, True, True, False, True])
    g = np.array([0, 0, 1, 1, 1, 1])
    gap, lo, hi = gap_ci(v, b, g, reps=4000, seed=2)
    # float64 means of 0, 0.5, 1 (error ~1e-16; approx(0.0) allows 1e-12): approx's default is slack
    assert gap == pytest.approx(2.0 / 3.0 - 0.25)  # boosted (1 + 0.5 + 0.5) / 3, suppressed (0 + 0.5) / 2
    # the four resamples of 2 groups: (0,0) 1.0, (0,1) and (1,0) 5/12, (1,1) 0.0
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    assert gap_ci(v, b, g, reps=0) == pytest.approx((gap, gap, gap))
    assert all(np.isnan(gap_ci(v[:1], b[:1], g[:1])))  # no suppressed token

