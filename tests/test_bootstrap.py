"""Group (cluster) bootstrap of token fractions: hand-computed values and a brute-force
enumeration of every resample on two groups."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokencredit.probes.bootstrap import flip_fractions_ci, group_sums, ratio_ci


def test_group_sums_by_hand():
    ids, s = group_sums(np.array([7, 3, 7, 7]), {"b": np.array([True, False, True, False]), "n": np.ones(4)})
    assert ids.tolist() == [3, 7] and s["b"].tolist() == [0.0, 2.0] and s["n"].tolist() == [1.0, 3.0]


def test_ratio_ci_pools_tokens_and_stays_inside_the_resample_support():
    num, den = np.array([1.0, 3.0]), np.array([4.0, 4.0])  # groups at 0.25 and 0.75
    v, lo, hi = ratio_ci(num, den, reps=4000, seed=1)
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
    g = out["grpo"]
    assert g["pos"]["boosted"][0] == pytest.approx(2 / 4) and g["pos"]["stable"][0] == pytest.approx(1 / 4)
    assert g["neg"]["suppressed"][0] == pytest.approx(1.0) and g["neg"]["tokens"] == 1
    assert g["all"]["tokens"] == 5
    assert out["positive_only"]["pos"]["boosted"][0] == pytest.approx(3 / 4)  # 0.1, 0.2, 0.4 of 4
    assert out["sign_agreement"][0] == pytest.approx(3 / 5)  # tokens 0, 3 (both 0), 4 agree
    assert out["sign_agreement_pos"][0] == pytest.approx(3 / 4)
