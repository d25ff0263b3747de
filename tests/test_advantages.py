import math

import pytest
import torch

from tokencredit.algo.advantages import group_advantages


def test_grpo_hand_computed():
    # group 0: rewards 1,0,0,1 -> mean .5, unbiased std sqrt(1/3); group 1: 1,0,0 -> mean 1/3, std sqrt(1/3)
    r = torch.tensor([1.0, 0, 0, 1, 1, 0, 0])
    g = torch.tensor([0, 0, 0, 0, 5, 5, 5])
    a = group_advantages(r, g, "grpo", eps=0.0)
    s = math.sqrt(1 / 3)
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, (2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s]
    # float64 math, one final float32 rounding: error <= |a| * 2^-24 ~ 7e-8 for |a| <= 1.16, so abs 1e-6 has margin
    assert a.tolist() == pytest.approx(expected, abs=1e-6)


def test_grpo_eps_and_interleaved_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    g = torch.tensor([7, 3, 7, 3])  # interleaved order must not matter
    a = group_advantages(r, g, "grpo", eps=1e-6)
    s = math.sqrt(0.5)  # rewards {1,0}: mean .5, unbiased var = .5
    # float64 math, one final float32 rounding: error <= 0.71 * 2^-24 ~ 4e-8, well inside abs 1e-6
    assert a.tolist() == pytest.approx([0.5 / (s + 1e-6), 0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6)], abs=1e-6)


def test_equal_rewards_and_singletons_give_zero():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    for mode in ("grpo", "drgrpo", "rloo"):
        assert group_advantages(r, g, mode).tolist() == [0.0] * 6


def test_drgrpo_and_rloo():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    g = torch.zeros(4, dtype=torch.long)
    # float64 math, one final float32 rounding (rel 2^-24 ~ 6e-8): approx's default rel 1e-6 is enough
    assert group_advantages(r, g, "drgrpo").tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    # rloo: r_i - mean of the others: 1 - 0 = 1; 0 - 1/3
    assert group_advantages(r, g, "rloo").tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])


def test_grpo_advantages_sum_to_zero_per_group():
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (64,), generator=gen).float()
    g = torch.arange(64) // 8
    a = group_advantages(r, g)
    sums = torch.zeros(8).index_add_(0, g, a)
    # float32: 8 rounded |a| (sum|a| <= sqrt(8 * 7) = 7.5) plus an 8-term float32 sum: worst ~ 9 * 2^-24 * 7.5 = 4e-6 < 1e-5
    assert sums.abs().max() < 1e-5


def test_bad_input():
    with pytest.raises(KeyError, match="valid: drgrpo, grpo, rloo"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), "ppo")
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.long))
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
