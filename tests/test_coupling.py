"""Tests for tokencredit.probes.coupling (output-layer proxy, paper Eq. 6-10).

Convention checked throughout: eta is the SGD step on J = 1/N sum A_k log pi
(Eq. 2), so the first-order prediction is delta_j = eta/N sum_k A_k K_jk.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencredit.model.tiny import build_tiny
from tokencredit.probes.coupling import (
    coupling_cells,
    coupling_pairs,
    lm_head_grad_step,
    predicted_shift,
    predicted_shift_pairwise,
    token_stats,
)
from tokencredit.probes.lm_head import LogitTransform, lm_head_grad, lm_head_of

ROLLOUTS = [
    "the answer is 42 because 6 times 7 is 42, so the answer is 42.",
    "let x be the number; then x + x = 10 so x = 5 and the answer is 5.",
    "we add the two numbers: 17 + 25 = 42. the final answer is 42!",
    "first, 3 * 3 = 9; then 9 - 4 = 5. so the answer is 5, not 42.",
]
ADV = [1.3, -0.7, 0.9, -1.5]  # one weight per rollout, broadcast to its tokens


# thousands of tiny ops (chunk_tokens=1): one intra-op thread (conftest `one_thread`)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_batch():
    """Real hidden states of the tiny model on 4 char-level rollouts.

    Returns (model, h [N, d], W [V, d], o [N], A [N]) with N ~ 250 and
    many repeated ids (char tokenizer: spaces, vowels, digits).
    """
    model, tok = build_tiny(seed=0)
    hs, os_, As = [], [], []
    with torch.no_grad():
        for text, a in zip(ROLLOUTS, ADV):
            ids = tok(text, return_tensors="pt").input_ids  # (1, T)
            h = model.model(input_ids=ids).last_hidden_state[0]  # [T, d], post final norm
            hs.append(h[:-1])  # state s_t predicts token t+1
            os_.append(ids[0, 1:])
            As.append(torch.full((ids.shape[1] - 1,), a))
    h, o, A = torch.cat(hs), torch.cat(os_), torch.cat(As)
    W = model.get_output_embeddings().weight.detach()
    assert h.shape[0] >= 200 and W.shape[0] >= 90
    assert torch.unique(o).numel() < h.shape[0] // 4  # many repeats
    return model, h, W, o, A


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# (a) chunked == brute force, and the decomposition is consistent ------------


@pytest.mark.parametrize("w_scale", [1.0, 40.0])  # 40: sharp, non-uniform softmax
@pytest.mark.parametrize("chunk", [1, 7, 100_000])
def test_chunked_matches_pairwise_float64(tiny_batch, chunk, w_scale):
    _, h, W, o, A = tiny_batch
    h, W = h.double(), W.double() * w_scale
    eta = 1e-2
    got = predicted_shift(h, W, o, A, eta, chunk_tokens=chunk)
    ref = predicted_shift_pairwise(h, W, o, A, eta)
    # float64 path difference: chunked vs pairwise sums over N ~ 250 tokens, ~N u = 3e-14 of max (measured 3e-14);
    # 1e-9 leaves 3e4x and, unlike the old 1e-5, fails if a float32 step (~1e-7) slips into the float64 path
    for key in ("delta", "self_term", "same_token", "diff_token"):
        assert _rel(got[key], ref[key]) < 1e-9, key
        torch.testing.assert_close(got[key], ref[key], rtol=1e-9, atol=1e-9 * ref[key].abs().max().item())
    # parts add up: float64 sum of three O(0.1) parts vs delta, error ~1e-17; atol 1e-12 is slack
    parts = got["self_term"] + got["same_token"] + got["diff_token"]
    torch.testing.assert_close(parts, got["delta"], rtol=0, atol=1e-12)
    # same-token part equals the explicit pairwise sum restricted to same-id pairs k != j
    N = h.shape[0]
    mask = (o[:, None] == o[None, :]) & ~torch.eye(N, dtype=torch.bool)
    same_explicit = eta / N * ((ref["kernel"] * mask) @ A.double())
    assert _rel(got["same_token"], same_explicit) < 1e-9  # float64, as above (measured 7e-16)
    if w_scale > 1:  # the sharp case really is non-degenerate
        assert got["p_own"].max() > 0.5 and got["p_own"].min() < 0.05


def test_chunked_matches_pairwise_float32(tiny_batch):
    _, h, W, o, A = tiny_batch
    W = W * 40.0
    got = predicted_shift(h, W, o, A, 1e-2, chunk_tokens=16)
    ref = predicted_shift_pairwise(h.double(), W.double(), o, A, 1e-2)
    # float32 kernel vs float64 reference: sums over V ~ 100 and N ~ 250, typical sqrt(N) u = 1e-6 of max; measured 4e-7
    for key in ("delta", "self_term", "same_token"):
        assert _rel(got[key].double(), ref[key]) < 1e-5, key


def test_bias_and_temperature(tiny_batch):
    _, h, W, o, A = tiny_batch
    h, W = h.double(), W.double() * 20
    b = torch.randn(W.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(bias=b, temperature=0.7)
    got = predicted_shift(h, W, o, A, 1e-2, chunk_tokens=13, **kw)
    ref = predicted_shift_pairwise(h, W, o, A, 1e-2, **kw)
    # float64 path difference, as in test_chunked_matches_pairwise_float64 (measured 2e-15)
    for key in ("delta", "self_term", "same_token", "diff_token"):
        assert _rel(got[key], ref[key]) < 1e-9, key
    # and the 1/tau^2 convention agrees with the real update
    real = lm_head_grad_step(W, h, o, A, lr=1e-4, **kw)["delta_logp"]
    assert torch.corrcoef(torch.stack([got["delta"], real]))[0, 1] > 0.99
    # not rounding: float64 first-order prediction vs the real step, O(lr) apart (1e-6 here); a wrong 1/N or
    # 1/tau^2 convention is off by a factor >= 2, so 0.05 only checks the scale (lr 1e-4 vs eta 1e-2)
    assert _rel(got["delta"] * 1e-2, real) < 0.05


@settings(max_examples=30, deadline=None)
@given(
    N=st.integers(2, 14),
    V=st.integers(2, 6),
    d=st.integers(1, 4),
    chunk=st.integers(1, 16),
    seed=st.integers(0, 10_000),
)
def test_property_chunked_equals_pairwise_and_permutation(N, V, d, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    W = 2 * torch.randn(V, d, generator=g, dtype=torch.float64)
    o = torch.randint(V, (N,), generator=g)
    A = torch.randn(N, generator=g, dtype=torch.float64)
    got = predicted_shift(h, W, o, A, 0.3, chunk_tokens=chunk)
    ref = predicted_shift_pairwise(h, W, o, A, 0.3)
    # float64 path difference over N <= 14 tokens, V <= 6: error ~N u |delta| ~ 1e-15 (|delta| <= ~1); 1e-9 / 1e-10 is slack
    for key in ("delta", "self_term", "same_token", "diff_token"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-9, atol=1e-10)
    # permuting tokens permutes the deltas (how the batch is cut/ordered is irrelevant)
    p = torch.randperm(N, generator=g)
    perm = predicted_shift(h[p], W, o[p], A[p], 0.3, chunk_tokens=chunk)
    torch.testing.assert_close(perm["delta"], got["delta"][p], rtol=1e-9, atol=1e-10)


# (b) first-order prediction vs the actual LM-head SGD step --------------------


@pytest.mark.parametrize("w_scale", [1.0, 40.0])
def test_prediction_tracks_actual_sgd_step(tiny_batch, w_scale):
    model, h, W, o, A = tiny_batch
    lr = 1e-3
    if w_scale == 1.0:
        # the model itself (tied embeddings): only the head computation is perturbed
        emb_before = model.get_input_embeddings().weight.detach().clone()
        res = lm_head_grad_step(model, h, o, A, lr=lr)
        assert torch.equal(model.get_input_embeddings().weight, emb_before)  # model untouched
    else:
        W = W * w_scale
        res = lm_head_grad_step(W, h, o, A, lr=lr)
    pred = predicted_shift(h, W, o, A, eta=lr)["delta"]
    real = res["delta_logp"]
    # not rounding: the real step is float32, and delta = lp_new - lp_old cancels (|lp| <= 36, ulp 3.8e-6, against
    # max|delta| 1.6e-3), so the real deltas carry ~1e-2 relative noise (measured 0.45-0.84%; 1e-5 in float64)
    r = torch.corrcoef(torch.stack([pred, real]))[0, 1].item()
    assert r > 0.99, r
    # same scale, not just correlated: eta/N convention matches lr on J with its 1/N (a wrong one is off by >= 2x)
    assert _rel(pred, real) < 0.05
    # update really is W + lr * dJ/dW with dJ/dW = G / N  (Eq. 2-3)
    N = h.shape[0]
    pi = torch.softmax(h @ W.T, -1)
    R = -pi
    R[torch.arange(N), o] += 1
    # float32: W plus a step of ~1e-5; the two gradient paths differ far below ulp(W), so rtol 1e-5 (~80 ulps) is slack
    torch.testing.assert_close(res["weight"], W + lr / N * (R.T @ (A[:, None] * h)), rtol=1e-5, atol=1e-7)


# (c) hand-computed N=2, V=3, d=2 -------------------------------------------------


def _hand_example(o2):
    # h_1 = (1, 0), h_2 = (1, 1); W gives logits (ln2, 0, 0) and (ln2, ln2, 0):
    # pi_1 = (1/2, 1/4, 1/4), pi_2 = (2/5, 2/5, 1/5), <pi_1, pi_2> = 0.35
    ln2 = math.log(2.0)
    h = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    W = torch.tensor([[ln2, 0.0], [0.0, ln2], [0.0, 0.0]], dtype=torch.float64)
    o = torch.tensor([0, o2])
    A = torch.tensor([1.0, -2.0], dtype=torch.float64)
    return h, W, o, A


def test_hand_computed_same_token():
    h, W, o, A = _hand_example(o2=0)  # both emit token 0
    # phi_12 (Eq. 8) = 1 - pi_1(0) - pi_2(0) + <pi_1,pi_2> = 1 - .5 - .4 + .35 = .45
    # Eq. 10 approximation (1 - .5)(1 - .4) = .30 drops <pi_1,pi_2> - pi_1(0) pi_2(0) = .15
    pairs = coupling_pairs(h, W, o, A, "prob", 4, torch.Generator().manual_seed(0))
    # exact: float64 hand numbers (error ~1e-16); assert_close's float64 default (rtol = atol = 1e-7) is slack
    torch.testing.assert_close(pairs["phi"], torch.full((4,), 0.45, dtype=torch.float64))
    torch.testing.assert_close(pairs["phi_eq10"], torch.full((4,), 0.30, dtype=torch.float64))
    assert pairs["same_token"].all()
    torch.testing.assert_close(pairs["hh"], torch.ones(4, dtype=torch.float64))  # <h_1,h_2> = 1
    # contrib A_k <h_j,h_k> phi: k=2 -> -2*.45, k=1 -> 1*.45
    exp_contrib = torch.where(pairs["k"] == 1, torch.tensor(-0.9, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64))
    torch.testing.assert_close(pairs["contrib"], exp_contrib)
    # phi_11 = 1 - 2(.5) + .375 = .375 ; phi_22 = 1 - 2(.4) + .36 = .56
    # eta/N = 1: delta_1 = 1*1*.375 + (-2)*1*.45 = -.525 ; delta_2 = -2*2*.56 + 1*1*.45 = -1.79
    out = predicted_shift(h, W, o, A, eta=2.0, chunk_tokens=1)
    exp = {
        "delta": [-0.525, -1.79],
        "self_term": [0.375, -2.24],
        "same_token": [-0.9, 0.45],
        "diff_token": [0.0, 0.0],
    }
    # exact: float64 hand numbers, a few ops on O(1) values (error ~1e-16); atol 1e-12 and the 1e-7 default are slack
    for key, val in exp.items():
        torch.testing.assert_close(out[key], torch.tensor(val, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out["p_own"], torch.tensor([0.5, 0.4], dtype=torch.float64))


def test_hand_computed_different_token():
    h, W, o, A = _hand_example(o2=1)  # token 1 emits 0, token 2 emits 1
    # phi_12 = -pi_1(1) - pi_2(0) + <pi_1,pi_2> = -.25 - .4 + .35 = -.30 (Eq. 10 exact here)
    pairs = coupling_pairs(h, W, o, A, "prob", 4, torch.Generator().manual_seed(0))
    # exact: float64 hand numbers (error ~1e-16); the float64 default (1e-7) and atol 1e-12 below are slack
    torch.testing.assert_close(pairs["phi"], torch.full((4,), -0.30, dtype=torch.float64))
    torch.testing.assert_close(pairs["phi_eq10"], pairs["phi"])
    assert not pairs["same_token"].any() and not pairs["oversampled"].any()
    # phi_22 = |(-.4, .6, -.2)|^2 = .56 ; delta_1 = .375 + (-2)(1)(-.3) = .975 ; delta_2 = -2.24 - .3
    out = predicted_shift(h, W, o, A, eta=2.0)
    exp = {
        "delta": [0.975, -2.54],
        "self_term": [0.375, -2.24],
        "same_token": [0.0, 0.0],
        "diff_token": [0.6, -0.3],
    }
    for key, val in exp.items():
        torch.testing.assert_close(out[key], torch.tensor(val, dtype=torch.float64), atol=1e-12, rtol=0)


# (d) sampled pairs ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["prob", "entropy"])
def test_coupling_pairs_exact_phi_and_flags(tiny_batch, mode):
    _, h, W, o, A = tiny_batch
    W = W * 40.0
    gen = torch.Generator().manual_seed(0)
    n_pairs = 600
    thr = 0.2 if mode == "prob" else None
    pairs = coupling_pairs(h, W, o, A, mode, n_pairs, gen, thr, chunk_tokens=64)
    j, k = pairs["j"], pairs["k"]
    assert j.shape == (n_pairs,) and (j != k).all()
    # phi = <r_j, r_k> with explicit error vectors
    N = h.shape[0]
    R = -torch.softmax(h.double() @ W.double().T, -1)
    R[torch.arange(N), o] += 1
    # float32 pairs vs a float64 reference on the same inputs: logits |z| <= 30 are off by <= 6e-6, damped by the
    # sharp softmax (small phi has small error); measured <= 4.8e-7 at |phi| = 2, within atol 1e-6 + rtol 1e-5 |phi|
    torch.testing.assert_close(pairs["phi"].double(), (R[j] * R[k]).sum(1), rtol=1e-5, atol=1e-6)
    # float32, the same products (bitwise equal here); the float32 default (rtol 1.3e-6, atol 1e-5) covers a reordered 32-term sum
    torch.testing.assert_close(pairs["hh"], (h[j] * h[k]).sum(1))
    torch.testing.assert_close(pairs["contrib"], A[k] * pairs["hh"] * pairs["phi"])
    assert torch.equal(pairs["same_token"], o[j] == o[k])
    # half oversampled among same-token pairs, and those all are same-token
    over = pairs["oversampled"]
    assert over.sum() == n_pairs // 2 and pairs["same_token"][over].all()
    assert pairs["same_token"][~over].float().mean() < 0.5  # uniform draws: mostly different
    # low-confidence flags
    st_ = token_stats(h, W, o)
    if mode == "prob":
        low = st_["p_own"] < 0.2
    else:
        low = st_["entropy"] > st_["entropy"].median()
    assert torch.equal(pairs["both_low_conf"], low[j] & low[k])
    assert pairs["both_low_conf"].any() and not pairs["both_low_conf"].all()
    # Eq. 10 equals Eq. 8 on different-token pairs
    d_ = ~pairs["same_token"]
    torch.testing.assert_close(pairs["phi_eq10"][d_], pairs["phi"][d_])  # float32, the same formula there: float32 default is slack

    cells = coupling_cells(pairs)
    assert set(cells) == {
        "same_token&low_conf",
        "same_token&not_low_conf",
        "diff_token&low_conf",
        "diff_token&not_low_conf",
    }
    assert sum(c["n"] for c in cells.values()) == n_pairs
    assert abs(sum(c["frac_uniform"] for c in cells.values()) - 1.0) < 1e-9  # four float64 count ratios: error ~4e-16
    m = pairs["same_token"] & pairs["both_low_conf"]
    c = cells["same_token&low_conf"]
    assert c["n"] == int(m.sum())
    # the same float64 mean of the same values (bitwise equal here); rel 1e-9 is slack
    assert math.isclose(c["phi_mean"], pairs["phi"][m].double().mean().item(), rel_tol=1e-9)
    assert math.isclose(c["contrib_abs_mean"], pairs["contrib"][m].double().abs().mean().item(), rel_tol=1e-9)


def test_coupling_pairs_reproducible_and_no_repeats():
    g = torch.Generator().manual_seed(3)
    h, W = torch.randn(20, 4, generator=g), torch.randn(30, 4, generator=g)
    A = torch.randn(20, generator=g)
    o = torch.arange(20)  # no repeated ids -> no oversampling possible
    p1 = coupling_pairs(h, W, o, A, "prob", 50, torch.Generator().manual_seed(7))
    p2 = coupling_pairs(h, W, o, A, "prob", 50, torch.Generator().manual_seed(7))
    assert torch.equal(p1["j"], p2["j"]) and torch.equal(p1["k"], p2["k"])
    assert not p1["oversampled"].any() and not p1["same_token"].any()


# (e) the one LM-head gradient and the one logit transform ----------------------------

TRANSFORMS = {
    "plain": LogitTransform(),
    "scale_temp": LogitTransform(2.5, None, 0.7),
    "scale_softcap_temp": LogitTransform(2.5, 1.5, 0.7),
}


def _rand_head(seed, N=37, V=11, d=5):
    """float64 h [N, d], W [V, d], b [V], o [N] (ids repeat), A [N]."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    W = 1.5 * torch.randn(V, d, generator=g, dtype=torch.float64)
    b = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    o = torch.randint(V, (N,), generator=g)
    o[:12] = o[0]  # a large same-token group
    A = torch.randn(N, generator=g, dtype=torch.float64)
    return h, W, b, o, A


def _logits_by_hand(h, W, b, tf):
    """z = softcap(logit_scale (W h + b)) / temperature, written out (forward.py's order)."""
    x = (h @ W.T + b) * tf.logit_scale
    if tf.softcap is not None:
        x = tf.softcap * torch.tanh(x / tf.softcap)
    return x / tf.temperature


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("chunk_tokens", [1, 8, 1000])
def test_lm_head_grad_equals_autograd(name, chunk_tokens):
    """G = sum_k A_k rho_k h_k^T is autograd's d/dW sum_k A_k log softmax(z_k)[o_k]."""
    tf = TRANSFORMS[name]
    h, W, b, o, A = _rand_head(0)
    Wg = W.clone().requires_grad_(True)
    J = (A * torch.log_softmax(_logits_by_hand(h, Wg, b, tf), -1).gather(1, o[:, None]).squeeze(1)).sum()
    (ref,) = torch.autograd.grad(J, Wg)
    G = lm_head_grad(h, W, o, A, bias=b, transform=tf, chunk_tokens=chunk_tokens)
    assert G.shape == W.shape and G.dtype == torch.float64
    # float64 path difference: closed form vs autograd, sums over N=37 of |A rho h| (scale/T <= 3.6) ~ 1e2:
    # worst 37 u * 1e2 = 4e-13 < atol 1e-12 (measured 5e-15)
    torch.testing.assert_close(G, ref, rtol=1e-10, atol=1e-12)
    if name == "plain":  # the paper's form sum_k A_k r_k h_k^T
        R = -torch.softmax(h @ W.T + b, -1)
        R[torch.arange(len(o)), o] += 1
        torch.testing.assert_close(G, R.T @ (A[:, None] * h), rtol=1e-10, atol=1e-12)
    else:  # the transform matters (the test is not vacuous)
        plain = lm_head_grad(h, W, o, A, bias=b)
        assert (G - plain).abs().max() > 1e-2  # must differ: the transform changes G by O(1), 1e-2 is far above rounding


def test_logit_transform_is_the_forward_pass_one():
    """LogitTransform.of(model) on the final hidden states gives forward_tokens' log-probs."""
    from tests.test_probes_masking import make_batch, transformed
    from tokencredit.model.forward import forward_tokens, lm_head_inputs

    model, tok = build_tiny(seed=0)
    batch = make_batch(tok)
    rows, pos = (batch.response_mask > 0).nonzero(as_tuple=True)
    for m in (model, transformed(model)):
        W, bias, tf = lm_head_of(m, temperature=0.8)
        h = lm_head_inputs(m, batch)[rows, pos]
        o = batch.response_ids[rows, pos]
        u = h @ W.T if bias is None else h @ W.T + bias
        lp = torch.log_softmax(tf(u), -1).gather(1, o[:, None]).squeeze(1)
        with torch.no_grad():
            ref = forward_tokens(m, batch, temperature=0.8)["logprob"][rows, pos]
        # float32 path difference (a plain log_softmax vs forward_tokens' chunked fused logsumexp, V=101, |lp| <= 6):
        # typical sqrt(101) u * 6 = 4e-6; measured <= 9.5e-7 (AVX512, AVX2, SSE)
        assert (lp - ref).abs().max() < 1e-5
    assert lm_head_of(transformed(model))[2] == LogitTransform(4.0, 2.0, 1.0)


@pytest.mark.parametrize("name", ["scale_temp", "scale_softcap_temp"])
def test_predicted_shift_with_logit_transform(name):
    """Chunked == pairwise, the pairs' contrib is A_k K_jk, and the first-order
    prediction tracks the actual (autograd) head step, all under the transform."""
    tf = TRANSFORMS[name]
    kw = dict(bias=None, temperature=tf.temperature, logit_scale=tf.logit_scale, softcap=tf.softcap)
    h, W, _, o, A = _rand_head(1, N=60, V=13, d=6)
    got = predicted_shift(h, W, o, A, 0.3, chunk_tokens=5, **kw)
    ref = predicted_shift_pairwise(h, W, o, A, 0.3, **kw)
    # float64 path difference over N=60 tokens: error ~N u |x| (|x| <= 2e2: 1e-12), measured 4e-14; 1e-9 / 1e-10 have margin
    for key in ("delta", "self_term", "same_token", "diff_token"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-9, atol=1e-10)
    pairs = coupling_pairs(h, W, o, A, "prob", 200, torch.Generator().manual_seed(0), chunk_tokens=7, **kw)
    torch.testing.assert_close(pairs["contrib"], A[pairs["k"]] * ref["kernel"][pairs["j"], pairs["k"]], rtol=1e-9, atol=1e-10)
    real = lm_head_grad_step(W, h, o, A, lr=1e-4, **kw)["delta_logp"]
    pred = predicted_shift(h, W, o, A, eta=1e-4, **kw)["delta"]
    # not rounding: float64 first-order prediction vs the real step, O(lr) apart (2e-5 here); 0.01 checks the scale
    assert torch.corrcoef(torch.stack([pred, real]))[0, 1] > 0.999
    assert _rel(pred, real) < 0.01
    st_ = token_stats(h, W, o, **kw)
    pi = torch.softmax(_logits_by_hand(h, W, torch.zeros(W.shape[0], dtype=W.dtype), tf), -1)
    torch.testing.assert_close(st_["p_own"], pi[torch.arange(len(o)), o])  # float64, 13-term softmax: default 1e-7 is slack


def test_lm_head_inputs_micro_rows():
    """The coupling probe's hidden states do not depend on how rows are cut."""
    from tests.test_probes_masking import make_batch
    from tokencredit.model.forward import lm_head_inputs

    model, tok = build_tiny(seed=0)
    batch = make_batch(tok)
    ref = lm_head_inputs(model, batch)  # [B, T, H], one pass
    for micro_rows in (1, 3, 8, 100):
        got = lm_head_inputs(model, batch, micro_rows=micro_rows)
        assert got.shape == ref.shape
        # float32 path difference: row subsets with trimmed padding (other GEMM shapes); |h| <= 3.2, measured <= 4.8e-7 (1 ulp)
        assert (got - ref).abs().max() < 1e-5, micro_rows
    assert (ref.abs().sum(-1) > 0).eq(batch.response_mask > 0).all()  # 0 exactly on padding
    with pytest.raises(ValueError, match="micro_rows"):
        lm_head_inputs(model, batch, micro_rows=0)


def test_cli_coupling_micro_rows_reaches_the_forward(tmp_path, monkeypatch):
    """`probe coupling --micro-rows 3` runs the hidden-state forward in 3-row passes."""
    import tokencredit.model.forward as fwd
    from tests.test_probes_masking import make_batch
    from tokencredit.cli import main
    from tokencredit.batch import save_batch

    _, tok = build_tiny(seed=0)
    path = save_batch(make_batch(tok), tmp_path / "b")
    seen = []
    real = fwd.lm_head_inputs

    def spy(model, batch, **kw):
        seen.append(kw.get("micro_rows"))
        return real(model, batch, **kw)

    monkeypatch.setattr(fwd, "lm_head_inputs", spy)
    assert main(["probe", "coupling", "--model", "tiny-random", "--batch", str(path), "--out", str(tmp_path / "o"),
                 "--pairs", "16", "--micro-rows", "3"]) == 0
    assert seen == [3]
