import math

import pytest
import torch

from tokencredit.algo.losses import aggregate, kl_penalty, loss_mask, normaliser, policy_loss


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_clip_higher_hand_computed():
    # one row, 4 tokens; ratios 1.5, 0.5, 1.1, 0.7 ; A = +1 for the row
    old = _t([[0.0, 0.0, 0.0, 0.0]])
    new = torch.log(_t([[1.5, 0.5, 1.1, 0.7]]))
    mask = _t([[1, 1, 1, 1]])
    loss, st = policy_loss(new, old, _t([1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A>0: -min(r, clip(r)) -> -1.28, -0.5, -1.1, -0.7
    # exact: float64 hand numbers (error ~1e-16) and token-count fractions; approx's default rel 1e-6 only tells formulas apart
    assert loss.item() == pytest.approx(-(1.28 + 0.5 + 1.1 + 0.7) / 4)
    assert st["clipfrac"] == pytest.approx(0.25)  # only the 1.5 token is clipped
    assert st["clipfrac_high"] == pytest.approx(0.25) and st["clipfrac_low"] == 0.0
    # A<0: -min(-r, -clip(r)) = max(r, clip(r)) -> 1.5, 0.8, 1.1, 0.8
    loss, st = policy_loss(new, old, _t([-1.0]), mask)
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1 + 0.8) / 4)
    assert st["clipfrac"] == pytest.approx(0.5) and st["clipfrac_low"] == pytest.approx(0.5)


def test_dual_clip_caps_negative_advantage():
    old = _t([[0.0, 0.0]])
    new = torch.log(_t([[5.0, 2.0]]))
    loss, st = policy_loss(new, old, _t([-2.0]), _t([[1, 1]]), dual_clip=3.0)
    # token 1: max(5*2, clip) = 10, capped at 3*2 = 6; token 2: 4 (< 6)
    # exact: float64 hand numbers, a few ops each (error ~1e-15 << approx's default rel 1e-6)
    assert loss.item() == pytest.approx((6 + 4) / 2)
    assert st["dual_clipfrac"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        policy_loss(new, old, _t([-2.0]), _t([[1, 1]]), dual_clip=0.5)


def test_aggregation_modes_hand_computed():
    # ratio 1 everywhere -> per-token loss = -A
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = _t([[1, 1, 1], [1, 0, 0]])
    adv = _t([1.0, 4.0])
    # exact (all three): float64 sums of small integers, one division (approx's default rel 1e-6 is slack)
    tm, _ = policy_loss(old.clone(), old, adv, mask, agg="token-mean")
    assert tm.item() == pytest.approx(-(1 + 1 + 1 + 4) / 4)
    smtm, _ = policy_loss(old.clone(), old, adv, mask, agg="seq-mean-token-mean")
    assert smtm.item() == pytest.approx(-(1 + 4) / 2)
    smts, _ = policy_loss(old.clone(), old, adv, mask, agg="seq-mean-token-sum")
    assert smts.item() == pytest.approx(-(3 + 4) / 2)
    with pytest.raises(ValueError, match="unknown agg"):
        policy_loss(old.clone(), old, adv, mask, agg="sum")


def test_token_weight_and_denominator_choice():
    old = torch.zeros(1, 4, dtype=torch.float64)
    mask = _t([[1, 1, 1, 1]])
    w = _t([[1, 0, 0.5, 0]])
    # exact (all three): float64 sums of small binary fractions, one division (approx's default rel 1e-6 is slack)
    kept, _ = policy_loss(old.clone(), old, _t([2.0]), mask, token_weight=w, denominator="kept")
    assert kept.item() == pytest.approx(-(2 + 1) / 2)  # weight-0 tokens leave the denominator
    alltok, _ = policy_loss(old.clone(), old, _t([2.0]), mask, token_weight=w, denominator="all")
    assert alltok.item() == pytest.approx(-(2 + 1) / 4)  # 80/20 paper: all tokens count
    # [B, T] advantages are accepted too
    per_tok, _ = policy_loss(old.clone(), old, _t([[2.0, 0, 1, 0]]), mask)
    assert per_tok.item() == pytest.approx(-(2 + 1) / 4)


def test_gradient_invariant_to_micro_batching():
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 5
    base = torch.randn(B, T, generator=gen, dtype=torch.float64)
    old = base + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=gen) > 0.3).double()
    mask[:, 0] = 1
    w = (torch.rand(B, T, generator=gen) > 0.4).double()
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        for czw in ("kept", "all"):
            x = base.clone().requires_grad_(True)
            loss, _ = policy_loss(x, old, adv, mask, agg=agg, token_weight=w, denominator=czw)
            loss.backward()
            full = x.grad.clone()
            # same mini-batch cut into 3 micro-batches of 2 rows, global denominator
            d = normaliser(loss_mask(mask, w, czw), agg)
            y = base.clone().requires_grad_(True)
            for rows in ([0, 1], [2, 3], [4, 5]):
                l, _ = policy_loss(y[rows], old[rows], adv[rows], mask[rows], agg=agg, token_weight=w[rows], denominator=czw, normaliser=d)
                l.backward()
            # float64, each token's gradient is local (-A w rho / d, one global d): no sum changes, equal bitwise here
            assert torch.allclose(full, y.grad, atol=1e-12, rtol=0), (agg, czw)


def test_padding_never_contributes():
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = _t([[0.0, 0.0, 50.0]]).requires_grad_(True)  # huge ratio on padding
    loss, st = policy_loss(new, old, _t([1.0]), _t([[1, 1, 0]]))
    loss.backward()
    assert new.grad[0, 2].item() == 0.0
    assert st["ratio_max"] == pytest.approx(1.0)  # exact: exp(0) = 1 in float64


def test_kl_estimators():
    l = _t([[math.log(0.5)]])
    ref = _t([[math.log(0.25)]])
    # float64, two or three ops on log(0.5), log(0.25): error ~1e-16, approx's default rel 1e-6 is slack
    assert kl_penalty(l, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 = exp(ref-l) - (ref-l) - 1 = 0.5 + log 2 - 1
    assert kl_penalty(l, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    with pytest.raises(ValueError):
        kl_penalty(l, ref, "k2")


def test_empty_mask_gives_zero_loss_with_graph():
    x = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    loss = aggregate(x, torch.zeros(1, 2, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum() == 0
