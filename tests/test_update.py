"""The one optimizer step (tokencredit/update.py) and the one no-grad row forward
(model/forward.py forward_rows): the same gradient however the rows are cut, an
outside normaliser, the ratio-weight seam, and forward_rows against forward_tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from tokencredit.algo.losses import loss_mask, normaliser, policy_loss
from tokencredit.batch import RolloutBatch
from tokencredit.model.forward import forward_rows, forward_tokens
from tokencredit.model.tiny import build_tiny
from tokencredit.update import LossSpec, loss_normaliser, micro_batches, optimizer_step


def _batch(B: int = 6, P: int = 4, T: int = 7, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    mask = (torch.arange(T)[None, :] < lens[:, None]).float()  # [B, T]
    b = RolloutBatch(
        prompt_ids=torch.randint(3, 60, (B, P), generator=g), prompt_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.randint(3, 60, (B, T), generator=g) * mask.long(), response_mask=mask,
        group_id=torch.arange(B) // 2, advantage=torch.randn(B, generator=g),
    )
    b.token_weight = (torch.rand(B, T, generator=g) > 0.4).float() * mask
    return b


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny(seed=5, hidden=32, layers=2, heads=4, tie=False)[0]


def _grads(model, batch, micro_rows, spec, **kw):
    """Gradients after one optimizer_step with SGD lr 0 (weights unchanged, grads kept)."""
    m = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
    st = optimizer_step(m, opt, micro_batches(batch, micro_rows), spec, grad_clip=None, **kw)
    return [p.grad.clone() for p in m.parameters() if p.grad is not None], st


def _assert_grad_close(got, ref):
    """float32 gradients by two row cuts (other summation order through the decoder backward):
    an entry's error scales with the tensor's largest terms, so the bound is relative to max|ref|:
    1e-5 * max ~ 170 u; measured <= 1e-6 * max (AVX512, AVX2, SSE kernels)."""
    torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def _with_old(model, batch):
    batch.old_logprob = forward_rows(model, batch, micro_rows=64, with_entropy=False)["logprob"] - 0.05  # ratio != 1
    return batch


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("denominator", ["all", "kept"])
def test_same_gradient_however_the_rows_are_cut(tiny, agg, denominator):
    b = _with_old(tiny, _batch())
    spec = LossSpec(agg=agg, denominator=denominator)
    ref, st = _grads(tiny, b, 6, spec)
    assert len(st["pg_loss"]) == 1
    for micro in (1, 4):
        g, st = _grads(tiny, b, micro, spec)
        assert len(st["pg_loss"]) == -(-6 // micro)
        for a, c in zip(ref, g):
            _assert_grad_close(c, a)


def test_outside_normaliser_scales_the_gradient(tiny):
    """Data parallelism passes the all-ranks count: twice the local N halves the gradient."""
    b = _with_old(tiny, _batch())
    spec = LossSpec()
    n = loss_normaliser(micro_batches(b, 2), spec)
    assert n == normaliser(loss_mask(b.response_mask, b.token_weight, "all"), "token-mean") == float(b.response_mask.sum())
    ref, _ = _grads(tiny, b, 2, spec)
    half, _ = _grads(tiny, b, 3, spec, normaliser=2 * n)
    for a, c in zip(ref, half):
        _assert_grad_close(c, a / 2)  # micro-batches of 2 vs 3 rows; / 2 is exact


def test_ratio_weight_multiplies_the_clipped_term():
    """Hand-computed: rho = 1, A = 2, weights (1, 0.5), token-mean over 2 tokens:
    loss = -(2*1*1 + 2*1*0.5) / 2 = -1.5; ones give exactly the unweighted loss."""
    lp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    old, adv, mask = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 2)
    loss, _ = policy_loss(lp, old, adv, mask, ratio_weight=torch.tensor([[1.0, 0.5]]))
    # exact: float64 (the float32 weights 1, 0.5 are exact), a few ops; approx / allclose defaults are slack
    assert loss.item() == pytest.approx(-1.5)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-1.0, -0.5]], dtype=torch.float64))  # d/dl of -A w rho / 2
    plain, _ = policy_loss(lp.detach(), old, adv, mask)
    ones, _ = policy_loss(lp.detach(), old, adv, mask, ratio_weight=torch.ones(1, 2))
    assert plain.item() == ones.item()


def test_ratio_weight_reaches_the_optimizer_step(tiny):
    b = _with_old(tiny, _batch())
    spec = LossSpec(denominator="all")
    ref, _ = _grads(tiny, b, 3, spec)
    b.ratio_weight = torch.full_like(b.response_mask, 0.25)
    quarter, _ = _grads(tiny, b, 2, spec)
    for a, c in zip(ref, quarter):
        _assert_grad_close(c, a / 4)  # micro-batches of 3 vs 2 rows; the 0.25 weight and / 4 are exact


def test_kl_needs_a_reference_and_is_reported(tiny):
    b = _with_old(tiny, _batch())
    with pytest.raises(ValueError, match="ref_model"):
        _grads(tiny, b, 3, LossSpec(kl_coef=0.1))
    _, st = _grads(tiny, b, 3, LossSpec(kl_coef=0.1), ref_model=copy.deepcopy(tiny))
    assert len(st["kl"]) == 2 and all(k >= 0 for k in st["kl"])  # k3 is non-negative


def test_forward_rows_equals_one_forward_and_restores_the_mode(tiny):
    b = _batch()
    tiny.train()
    out = forward_rows(tiny, b, micro_rows=4, temperature=0.7, with_hidden=True)
    assert tiny.training  # mode restored
    tiny.eval()
    with torch.no_grad():
        full = forward_tokens(tiny, b, temperature=0.7, with_hidden=True)
    assert set(out) == {"logprob", "entropy", "hidden"} and out["hidden"].shape[:2] == b.response_ids.shape
    for k in out:
        # float32 path difference: 4-row passes (padding trimmed) vs one 6-row pass, other GEMM shapes;
        # |lp|, H <= 5 and |h| < 0.1, measured <= 4.8e-7; atol 1e-6 + rtol 1e-5 * |x| is >= 10x that
        torch.testing.assert_close(out[k], full[k], rtol=1e-5, atol=1e-6)
    assert (out["logprob"][b.response_mask == 0] == 0).all()
    with pytest.raises(ValueError, match="micro_rows"):
        forward_rows(tiny, b, micro_rows=0)


def test_loss_spec_from_config():
    from tokencredit.config import load_config

    cfg = load_config(None, ["algo.clip_high=0.3", "algo.loss_agg=seq-mean-token-sum", "token_weights.denominator=kept", "algo.kl_coef=0.2"])
    s = LossSpec.from_config(cfg)
    assert (s.clip_high, s.agg, s.denominator, s.kl_coef) == (0.3, "seq-mean-token-sum", "kept", 0.2)


# ------------------------------------------------------- sampler/trainer mismatch
def test_tis_weights_and_sampler_gap_by_hand():
    import math

    from tokencredit.algo.importance import sampler_gap, tis_weights

    old = torch.tensor([[math.log(0.5), math.log(0.2), 0.0]])  # trainer
    smp = torch.tensor([[math.log(0.25), math.log(0.4), 0.0]])  # sampler
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # float32: exp of a difference of float32 logs, off by a few ulps (rel ~2e-7); allclose's default rtol 1e-5
    w = tis_weights(old, smp, mask, "token", cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 0.5, 0.0]]))  # ratios 2 (capped at 1.5) and 0.5; padding 0
    seq = tis_weights(old, smp, mask, "sequence", cap=3.0)
    assert torch.allclose(seq, torch.tensor([[1.0, 1.0, 0.0]]))  # product 2 * 0.5 = 1
    assert tis_weights(old, smp, mask, "none") is None
    with pytest.raises(ValueError, match="cap"):
        tis_weights(old, smp, mask, "token", cap=0.5)
    g = sampler_gap(old, smp, mask)
    # float32 difference of two float32 logs: off log 2 by <= ulp(1.4) = 1.2e-7, rel 2e-7 < approx's default 1e-6
    assert g["rollout_logprob_abs_diff_mean"] == pytest.approx(math.log(2)) and g["rollout_logprob_abs_diff_max"] == pytest.approx(math.log(2))
    # k3: r - 1 - log r for r = 2 and 0.5: (1 - log 2 + -0.5 + log 2) / 2 = 0.25
    # float32: exp(d) within 1 ulp of 2 (2.4e-7) and of 0.5, then -1 - d: <= ~3e-7 abs on 0.25; abs 1e-6 (default rel 1e-6 = 2.5e-7 was below that)
    assert g["rollout_kl"] == pytest.approx(0.25, abs=1e-6)
    assert sampler_gap(old, old, mask)["rollout_kl"] == 0.0


def test_trainer_applies_tis_only_with_sampler_logprobs(digits_file, tmp_path):
    """hf rows carry no sampling log-probs: no ratio weight, no gap metrics; rows with
    them get min(exp(old - sample), cap) as ratio_weight and the gap logged."""
    from tests.conftest import tiny_overrides
    from tokencredit.config import load_config
    from tokencredit.trainer import Trainer

    tr = Trainer(load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "tis", "algo.tis_cap": 1.5})))
    batch, _ = tr.rollout()
    m = tr.update(copy.deepcopy(batch))
    assert "rollout_kl" not in m and "tis_weight_mean" not in m
    b = copy.deepcopy(batch)
    tr._pre_update_forward(b, need_hidden=False)
    b.sample_logprob = b.old_logprob - 0.5 * b.response_mask  # the sampler gave each token e^-0.5 of the trainer's prob
    gap = tr._sampler_correction(b)
    # float32: old - 0.5 rounds by <= ulp(8) / 2 = 2.4e-7 per token (the subtraction back is exact), then a ~190-term
    # float32 mean: worst ~5e-7 abs, so abs 2e-6 (default rel 1e-6 = 5e-7 was at the worst case)
    assert gap["rollout_logprob_abs_diff_mean"] == pytest.approx(0.5, abs=2e-6) and gap["tis_capped_frac"] == 1.0
    assert torch.allclose(b.ratio_weight, 1.5 * b.response_mask)  # exact: e^0.5 = 1.65 capped at 1.5 (the cap is exact)
