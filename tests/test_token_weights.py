"""Tests for tokencredit/algo/token_weights.py: forking-token masks and controls
(Wang et al. 2025, "Beyond the 80/20 Rule"), entropy bands (cancellation paper
Fig. 5b), sample-polarity advantages (Zhu et al. 2025) and the dispatcher.

Hand-computed tensors first, then hypothesis properties, then scope invariance.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencredit.algo.token_weights import (
    TOKEN_WEIGHT_METHODS,
    compute_token_weights,
    entropy_band_mask,
    forking_low_mask,
    forking_mask,
    polarity_advantages,
    random_token_mask,
    sign_mask_advantages,
)

# ------------------------------------------------------------------ hand examples

# [B, T] = (2, 4); the last token of row 1 is padding with a huge entropy
ENT = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.8, 9.9]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])


def test_forking_hand_example():
    # N_valid = 7, k = ceil(0.2 * 7) = 2 -> the two largest valid entropies 0.9, 0.8
    out = forking_mask(ENT, MASK, top=0.2)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    # k = ceil(0.5 * 7) = 4 -> 0.9, 0.8, 0.7, 0.5
    out = forking_mask(ENT, MASK, top=0.5)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]]))


def test_forking_k_at_least_one_and_float_noise():
    ent = torch.arange(10, dtype=torch.float32)[None]  # (1, 10)
    mask = torch.ones(1, 10)
    assert forking_mask(ent, mask, top=0.01).sum() == 1  # k = max(1, ceil(0.1)) = 1
    # 0.7 * 10 = 7.000000000000001 in floats; k must be 7, not 8
    assert forking_mask(ent, mask, top=0.7).sum() == 7
    assert forking_low_mask(ent, mask, bottom=0.7).sum() == 7


def test_forking_ties_kept():
    ent = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    mask = torch.ones(1, 4)
    # k = 1, threshold = 1.0, all three ties kept
    assert torch.equal(forking_mask(ent, mask, top=0.25), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # low side: ties handled with <=
    ent = torch.tensor([[0.2, 0.2, 0.9, 0.2]])
    assert torch.equal(forking_low_mask(ent, mask, bottom=0.25), torch.tensor([[1.0, 1.0, 0.0, 1.0]]))


def test_forking_padding_empty_top_one_and_bad_top():
    assert forking_mask(ENT, torch.zeros_like(MASK)).sum() == 0  # N_valid = 0
    assert torch.equal(forking_mask(ENT, MASK, top=1.0), MASK)
    assert forking_mask(ENT, MASK, top=1.0)[1, 3] == 0  # padding never selected
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            forking_mask(ENT, MASK, top=bad)
        with pytest.raises(ValueError):
            forking_low_mask(ENT, MASK, bottom=bad)
    with pytest.raises(ValueError):
        forking_mask(ENT, MASK[:, :3])


def test_forking_low_hand_example():
    # N_valid = 7, k = ceil(0.8 * 7) = 6 -> all but the largest (0.9)
    out = forking_low_mask(ENT, MASK, bottom=0.8)
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]))
    # with 0.2 * N an integer and no ties, low(0.8) is the complement of top(0.2)
    ent = torch.randperm(10).float().reshape(2, 5)
    mask = torch.ones(2, 5)
    assert torch.equal(forking_low_mask(ent, mask, 0.8) + forking_mask(ent, mask, 0.2), mask)


@st.composite
def entropies_without_ties(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ent = torch.randperm(B * T, generator=g).float().reshape(B, T) / 7.0  # distinct values
    mask = (torch.rand(B, T, generator=g) < draw(st.floats(0.0, 1.0))).float()
    pct = draw(st.integers(1, 100))  # top = pct / 100
    return ent, mask, pct


@settings(max_examples=100, deadline=None)
@given(entropies_without_ties())
def test_forking_property_exact_k(data):
    ent, mask, pct = data
    out = forking_mask(ent, mask, top=pct / 100)
    n = int(mask.sum())
    expect = 0 if n == 0 else max(1, -(-pct * n // 100))  # ceil(pct * n / 100), exact integers
    assert int(out.sum()) == expect
    assert torch.all(out[mask == 0] == 0)  # padding never selected
    if 0 < expect < n:  # every kept token beats every dropped valid token
        kept = ent[(out > 0)]
        dropped = ent[(out == 0) & (mask > 0)]
        assert kept.min() > dropped.max()
    # low side mirrors it
    low = forking_low_mask(ent, mask, bottom=pct / 100)
    assert int(low.sum()) == expect
    assert torch.all(low[mask == 0] == 0)


# ------------------------------------------------------------------ controls and bands


def test_random_control_count_validity_and_reproducible():
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(4, 9, generator=g)
    mask = (torch.rand(4, 9, generator=g) < 0.7).float()
    fork = forking_mask(ent, mask, 0.2)
    r1 = random_token_mask(mask, fork, torch.Generator().manual_seed(1))
    r2 = random_token_mask(mask, fork, torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2)
    assert r1.sum() == fork.sum()
    assert torch.all(r1[mask == 0] == 0)
    assert random_token_mask(mask, 5).sum() == 5
    assert random_token_mask(mask, 0).sum() == 0
    with pytest.raises(ValueError):
        random_token_mask(mask, int(mask.sum()) + 1)
    # uniform: every valid token gets picked over many draws
    g = torch.Generator().manual_seed(2)
    hits = sum(random_token_mask(mask, 3, g) for _ in range(400))
    assert torch.all(hits[mask > 0] > 0)


@settings(max_examples=60, deadline=None)
@given(entropies_without_ties())
def test_entropy_band_matches_forking_and_partitions(data):
    ent, mask, _ = data
    assert torch.equal(entropy_band_mask(ent, mask, 0.0, 0.2), forking_mask(ent, mask, 0.2))
    edges = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    bands = [entropy_band_mask(ent, mask, a, b) for a, b in zip(edges[:-1], edges[1:])]
    assert torch.equal(sum(bands), mask)  # disjoint and covering the valid tokens


def test_entropy_band_hand_and_errors():
    ent = torch.arange(10, dtype=torch.float32)[None]  # 9 is the highest
    mask = torch.ones(1, 10)
    band = entropy_band_mask(ent, mask, 0.2, 0.4)  # ranks 3-4 from the top: 7, 6
    assert torch.equal(band.nonzero()[:, 1], torch.tensor([6, 7]))
    for lo, hi in ((0.4, 0.2), (0.2, 0.2), (-0.1, 0.3), (0.5, 1.1)):
        with pytest.raises(ValueError):
            entropy_band_mask(ent, mask, lo, hi)


# ------------------------------------------------------------------ polarity


def test_polarity_advantages_exact():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.6])
    assert torch.equal(polarity_advantages(r, "psr"), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    assert torch.equal(polarity_advantages(r, "nsr"), torch.tensor([0.0, -1.0, 0.0, -1.0, 0.0]))
    w = polarity_advantages(r, "w_reinforce")
    # exact: the function writes float(lam) into a float32 tensor, the same single rounding as torch.tensor(0.1)
    assert torch.equal(w, torch.tensor([0.1, -1.0, 0.1, -1.0, 0.1]))
    assert torch.equal(polarity_advantages(r, "w_reinforce", lam=0.5)[0], torch.tensor(0.5))
    with pytest.raises(ValueError, match="psr"):
        polarity_advantages(r, "grpo")


def test_sign_mask_advantages_exact():
    a = torch.tensor([0.8, -0.8, 0.5, -1.2, 0.0])
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert torch.equal(sign_mask_advantages(a, r, "positive"), torch.tensor([0.8, 0.0, 0.5, 0.0, 0.0]))
    assert torch.equal(sign_mask_advantages(a, r, "negative"), torch.tensor([0.0, -0.8, 0.0, -1.2, 0.0]))
    with pytest.raises(ValueError):
        sign_mask_advantages(a, r, "both")


# ------------------------------------------------------------------ scope


def test_scope_matters_row_order_does_not():
    g = torch.Generator().manual_seed(3)
    # micro-batch 1 has low entropies, micro-batch 2 high ones
    mb1 = torch.rand(2, 10, generator=g)
    mb2 = torch.rand(2, 10, generator=g) + 5.0
    m = torch.ones(2, 10)
    per_mb = torch.cat([forking_mask(mb1, m), forking_mask(mb2, m)])  # (4, 10)
    joint = forking_mask(torch.cat([mb1, mb2]), torch.cat([m, m]))  # (4, 10)
    assert per_mb[:2].sum() == 4 and joint[:2].sum() == 0  # joint scope picks only mb2
    assert not torch.equal(per_mb, joint)

    ent = torch.rand(6, 7, generator=g)
    mask = (torch.rand(6, 7, generator=g) < 0.8).float()
    perm = torch.randperm(6, generator=g)
    for fn in (
        lambda e, m: forking_mask(e, m, 0.3),
        lambda e, m: forking_low_mask(e, m, 0.6),
        lambda e, m: entropy_band_mask(e, m, 0.2, 0.5),
    ):
        assert torch.equal(fn(ent[perm], mask[perm]), fn(ent, mask)[perm])


# ------------------------------------------------------------------ dispatcher


def _inputs(seed=0, B=4, T=6, H=8):
    g = torch.Generator().manual_seed(seed)
    return dict(
        entropy=torch.rand(B, T, generator=g),
        mask=torch.ones(B, T),
        advantage=torch.tensor([1.0, -1.0, 0.5, -0.5])[:B],
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0])[:B],
        group_id=torch.tensor([0, 0, 1, 1])[:B],
        hidden=torch.randn(B, T, H, generator=g),
    )


def test_dispatcher_all_methods_shapes():
    inp = _inputs()
    for name in TOKEN_WEIGHT_METHODS.names():
        w, adv, stats = compute_token_weights(name, generator=torch.Generator().manual_seed(0), **inp)
        assert adv.shape == (4,)
        assert w is None or w.shape == (4, 6)
        assert {"tw_kept_frac", "tw_mean_w_pos", "tw_mean_w_neg"} <= set(stats)
    assert set(TOKEN_WEIGHT_METHODS.names()) >= {
        "none", "forking", "forking_low", "forking_random", "entropy_band", "psr", "nsr", "w_reinforce", "resrl",
    }


def test_dispatcher_values_and_stats():
    mask = MASK.clone()
    adv = torch.tensor([1.0, -1.0])
    w, a, stats = compute_token_weights("forking", entropy=ENT, mask=mask, advantage=adv)
    assert torch.equal(w, forking_mask(ENT, mask, 0.2)) and torch.equal(a, adv)
    # exact (all three): 0/1 weights sum exactly, then an integer ratio in float64, the same division as the right side
    assert stats["tw_kept_frac"] == pytest.approx(2 / 7)
    assert stats["tw_mean_w_pos"] == pytest.approx(1 / 4)
    assert stats["tw_mean_w_neg"] == pytest.approx(1 / 3)

    w, a, stats = compute_token_weights("forking_random", entropy=ENT, mask=mask, advantage=adv, top=0.5,
                                        generator=torch.Generator().manual_seed(0))
    assert w.sum() == 4

    w, a, stats = compute_token_weights("none", mask=mask, advantage=adv)
    assert w is None and stats["tw_kept_frac"] == 1.0

    r = torch.tensor([1.0, 0.0])
    w, a, stats = compute_token_weights("nsr", mask=mask, advantage=adv, rewards=r)
    assert w is None and torch.equal(a, torch.tensor([0.0, -1.0]))
    assert math.isnan(stats["tw_mean_w_pos"]) and stats["tw_mean_w_neg"] == 1.0
    _, a, _ = compute_token_weights("w_reinforce", mask=mask, advantage=adv, rewards=r, lam=0.25)
    assert torch.equal(a, torch.tensor([0.25, -1.0]))
    _, a, _ = compute_token_weights("positive_only", mask=mask, advantage=adv, rewards=r)
    assert torch.equal(a, torch.tensor([1.0, 0.0]))

    w, _, _ = compute_token_weights("entropy_band", entropy=ENT, mask=mask, advantage=adv, lo=0.0, hi=0.2)
    assert torch.equal(w, forking_mask(ENT, mask, 0.2))


def test_dispatcher_errors():
    inp = _inputs()
    with pytest.raises(KeyError, match="forking_low"):
        compute_token_weights("forkin", **inp)
    with pytest.raises(TypeError, match="top"):
        compute_token_weights("forking", rho=0.2, **inp)
    with pytest.raises(TypeError, match="rank"):
        compute_token_weights("resrl", ranks=4, **inp)
    inp.pop("entropy")
    with pytest.raises(ValueError, match="entropy"):
        compute_token_weights("forking", **inp)


def test_dispatcher_resrl_uses_rewards_and_keeps_advantages():
    inp = _inputs()
    w, adv, stats = compute_token_weights("resrl", **inp)
    assert torch.equal(adv, inp["advantage"])
    assert stats["resrl_groups"] == 2.0 and stats["resrl_groups_skipped"] == 0.0
    # exact: positive rows are set to pos_scale, float32(0.1), the same single rounding as torch.full((6,), 0.1)
    assert torch.equal(w[0], torch.full((6,), 0.1)) and torch.equal(w[2], torch.full((6,), 0.1))
    # w is clamped to [float32(0.1), 1]; the 1e-6 slack only absorbs 0.1's float32 rounding (1.5e-9)
    assert torch.all((w[1] >= 0.1 - 1e-6) & (w[1] <= 1.0))
    # float32 sum of 12 copies of float32(0.1): worst 11 * 2^-24 = 6.6e-7 relative, inside approx's default rel 1e-6
    assert stats["tw_mean_w_pos"] == pytest.approx(0.1)
