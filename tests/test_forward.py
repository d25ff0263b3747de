"""Chunked per-token forward (tokencredit.model.forward) against the naive
full-logits computation: values, gradients, hidden states, padding."""

from __future__ import annotations

import math

import pytest
import torch

from tokencredit.batch import RolloutBatch
from tokencredit.model.forward import forward_tokens, lm_head_inputs, naive_token_logprobs
from tokencredit.model.tiny import build_tiny

PROMPTS = ["2+3=", "what is 12*7?", "hi"]
RESPONSES = ["5<|im_end|>", "84.", "hello there!"]


def make_batch(tok, prompts=PROMPTS, responses=RESPONSES) -> RolloutBatch:
    """Prompts left-padded with pad id 0, responses right-padded; lengths all differ."""
    pad = 0
    p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    P, T = max(map(len, p_ids)), max(map(len, r_ids))
    prompt_ids = torch.tensor([[pad] * (P - len(x)) + x for x in p_ids])  # [B, P]
    prompt_mask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in p_ids])
    response_ids = torch.tensor([x + [pad] * (T - len(x)) for x in r_ids])  # [B, T]
    response_mask = torch.tensor([[1.0] * len(x) + [0.0] * (T - len(x)) for x in r_ids])
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        group_id=torch.arange(len(prompts)),
        pad_id=pad,
    )


def assert_grad_close(a, b, name):
    """Gradients of one loss by two float32 paths (other summation order, chunking or KV cache).
    An entry's rounding error scales with the tensor's largest terms, not with the entry, so the
    bound is relative to max|b|: 1e-5 * max ~ 170 u; measured <= 6e-7 * max (AVX512, AVX2, SSE)."""
    torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=0, msg=name)


@pytest.fixture(scope="module")
def tiny():
    # untied head, 3 layers: hidden_states[-2] is a real middle layer, not the embeddings
    return build_tiny(seed=1, hidden=32, layers=3, heads=4, tie=False)


@pytest.fixture(scope="module")
def batch(tiny):
    b = make_batch(tiny[1])
    # sanity on the fixture itself: different prompt and response lengths, real padding
    assert len(set(b.prompt_mask.sum(-1).tolist())) == 3
    assert len(set(b.response_lengths.tolist())) == 3
    return b


def test_batch_layout(tiny, batch):
    tok = tiny[1]
    assert batch.prompt_ids[2, 0].item() == 0 and batch.prompt_mask[2, 0].item() == 0  # left pad
    assert batch.response_ids[1, -1].item() == 0 and batch.response_mask[1, -1].item() == 0  # right pad
    assert batch.response_ids[0, 1].item() == tok.eos_token_id  # "<|im_end|>" is one token
    assert batch.response_lengths.tolist() == [2, 3, 12]


@pytest.mark.parametrize("chunk", [1, 3, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive(tiny, batch, chunk, temperature):
    model, _ = tiny
    with torch.no_grad():
        ref = naive_token_logprobs(model, batch, temperature)
        out = forward_tokens(model, batch, temperature=temperature, chunk_tokens=chunk)
    mask = batch.response_mask > 0
    assert out["logprob"].shape == batch.response_ids.shape
    assert out["logprob"].dtype == torch.float32 and out["entropy"].dtype == torch.float32
    # float32 path difference: chunked head + fused logsumexp vs full log_softmax over V=101 on |lp|, H <= 5:
    # typical sqrt(101) * u * 5 = 3e-6, so 1e-5 leaves ~3x (measured <= 1.5e-6)
    torch.testing.assert_close(out["logprob"], ref["logprob"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["entropy"], ref["entropy"], atol=1e-5, rtol=0)
    # real numbers: log-probs negative, entropies positive and below log V
    V = model.config.vocab_size
    assert (out["logprob"][mask] < 0).all()
    assert (out["entropy"][mask] > 0).all() and (out["entropy"][mask] < torch.log(torch.tensor(float(V)))).all()
    # padding positions are exactly zero
    assert (out["logprob"][~mask] == 0).all() and (out["entropy"][~mask] == 0).all()


def test_temperature_changes_values(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        a = forward_tokens(model, batch, temperature=1.0)
        b = forward_tokens(model, batch, temperature=0.7)
    mask = batch.response_mask > 0
    # must differ: T = 1 vs 0.7 moves log-probs by up to ~0.1, far past allclose's default 1e-8 + 1e-5 * |lp|
    assert not torch.allclose(a["logprob"][mask], b["logprob"][mask])


def test_hand_computed_single_token(tiny, batch):
    """One token checked by hand from the full logits of a single unpadded row."""
    model, _ = tiny
    row = batch.select([1])
    assert row.prompt_mask.all()  # row 1 has the longest prompt: no padding at all
    ids = torch.cat([row.prompt_ids, row.response_ids], 1)
    with torch.no_grad():
        logits = model(ids).logits[0]  # [L, V]
        out = forward_tokens(model, row, temperature=0.7, chunk_tokens=1)
    P = row.prompt_ids.shape[1]
    z = logits[P - 1].double() / 0.7  # predicts response token 0
    tgt = row.response_ids[0, 0]
    expected_lp = (z[tgt] - torch.logsumexp(z, 0)).item()
    p = torch.softmax(z, 0)
    expected_ent = -(p * p.log()).sum().item()
    # float32 forward vs a float64 logsumexp/entropy over V=101 of the same logits: as in test_matches_naive
    assert abs(out["logprob"][0, 0].item() - expected_lp) < 1e-5
    assert abs(out["entropy"][0, 0].item() - expected_ent) < 1e-5


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_gradients_match_naive(tiny, batch, chunk):
    model, _ = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    mask = batch.response_mask

    ref = naive_token_logprobs(model, batch, 0.7)["logprob"]
    g_ref = torch.autograd.grad((ref * mask).sum(), params, allow_unused=True)

    out = forward_tokens(model, batch, temperature=0.7, chunk_tokens=chunk)
    assert out["logprob"].requires_grad and not out["entropy"].requires_grad
    g = torch.autograd.grad((out["logprob"] * mask).sum(), params, allow_unused=True)

    n_nonzero = 0
    for (name, _), a, b in zip(model.named_parameters(), g, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert a is not None, name
        assert torch.isfinite(a).all(), name
        assert_grad_close(a, b, name)
        n_nonzero += int(b.abs().max() > 0)
    assert n_nonzero >= len(params) - 1  # every weight gets gradient (padding embedding row aside)


def test_gradient_of_masked_token_is_zero(tiny, batch):
    """Changing a padded response id changes nothing: it neither contributes to
    the loss nor is attended to."""
    model, _ = tiny
    b2 = make_batch(tiny[1])
    b2.response_ids[1, -1] = 17  # padding slot of row 1
    with torch.no_grad():
        a = forward_tokens(model, batch, chunk_tokens=2)["logprob"]
        b = forward_tokens(model, b2, chunk_tokens=2)["logprob"]
    # same computation, the changed id is masked out: equal bitwise here; 1e-6 is 2 ulps at |lp| ~ 5, not a path difference
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_hidden_is_second_to_last_layer(tiny, batch):
    model, _ = tiny
    inputs = batch.model_inputs()
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states
        out = forward_tokens(model, batch, with_hidden=True, with_entropy=False, chunk_tokens=2)
    assert "entropy" not in out
    H = model.config.hidden_size
    assert out["hidden"].shape == (*batch.response_ids.shape, H) and not out["hidden"].requires_grad
    assert len(hs) == model.config.num_hidden_layers + 1
    P = batch.prompt_ids.shape[1]
    B, T = batch.response_ids.shape
    for b in range(B):
        for t in range(T):
            if batch.response_mask[b, t] > 0:
                # the same decoder call on the same inputs: equal bitwise here; 1e-6 on |h| <= 0.08 is only slack
                torch.testing.assert_close(out["hidden"][b, t], hs[-2][b, P - 1 + t], atol=1e-6, rtol=0)
            else:
                assert (out["hidden"][b, t] == 0).all()
    # and it is not the final-layer state
    # must differ: the last layer changes states by O(1) (max 3.4), far past allclose's default tolerance
    assert not torch.allclose(hs[-2], hs[-1])


def test_hidden_detached_under_grad(tiny, batch):
    model, _ = tiny
    out = forward_tokens(model, batch, with_hidden=True)
    assert out["logprob"].requires_grad
    assert not out["hidden"].requires_grad and not out["entropy"].requires_grad


def test_lm_head_inputs(tiny, batch):
    model, _ = tiny
    h = lm_head_inputs(model, batch)  # [B, T, H]
    with torch.no_grad():
        logits = model(**batch.model_inputs(), use_cache=False).logits  # [B, L, V]
    P = batch.prompt_ids.shape[1]
    T = batch.response_ids.shape[1]
    mask = batch.response_mask > 0
    recon = model.get_output_embeddings()(h)  # [B, T, V]
    # float32: the head's 32-term dot products on [B, T] vs [B, L] rows (other GEMM blocking); |z| <= 0.5 so errors ~1e-7
    torch.testing.assert_close(recon[mask], logits[:, P - 1 : P - 1 + T][mask], atol=1e-5, rtol=0)
    assert (h[~mask] == 0).all() and not h.requires_grad


def test_tied_model_and_select(batch):
    """Tied embeddings (as in SmolLM2) and a trimmed sub-batch give the same numbers."""
    model, tok = build_tiny(seed=3, tie=True)
    b = make_batch(tok)
    with torch.no_grad():
        full = forward_tokens(model, b, chunk_tokens=5)
        sub = forward_tokens(model, b.select([2, 0]), chunk_tokens=5)
        ref = naive_token_logprobs(model, b)
    # float32 path difference (chunked vs full head; the sub-batch trims padding columns): as in test_matches_naive
    torch.testing.assert_close(full["logprob"], ref["logprob"], atol=1e-5, rtol=0)
    T2 = sub["logprob"].shape[1]
    torch.testing.assert_close(sub["logprob"][0], full["logprob"][2, :T2], atol=1e-5, rtol=0)
    torch.testing.assert_close(sub["logprob"][1], full["logprob"][0, :T2], atol=1e-5, rtol=0)


def test_all_masked_batch_keeps_graph(tiny, batch):
    model, _ = tiny
    b = make_batch(tiny[1])
    b.response_mask.zero_()
    out = forward_tokens(model, b, chunk_tokens=4)
    assert (out["logprob"] == 0).all() and (out["entropy"] == 0).all()
    (out["logprob"].sum()).backward()  # no "does not require grad" error
    model.zero_grad(set_to_none=True)


def test_bad_arguments(tiny, batch):
    with pytest.raises(ValueError, match="temperature"):
        forward_tokens(tiny[0], batch, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        forward_tokens(tiny[0], batch, chunk_tokens=0)


def test_target_logprob_function_gradcheck():
    """The fused log-prob autograd Function: value and gradient against
    log_softmax + gather, in float64 (finite differences) and on a hand case."""
    from tokencredit.model.forward import _TargetLogprob

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 9, dtype=torch.float64, generator=g, requires_grad=True)  # [n, V]
    tgt = torch.tensor([0, 8, 3, 3, 1, 5])
    assert torch.autograd.gradcheck(lambda x: _TargetLogprob.apply(x, tgt)[0], (z,))
    lp, lse = _TargetLogprob.apply(z, tgt)
    ref = torch.log_softmax(z, -1).gather(-1, tgt[:, None]).squeeze(-1)
    torch.testing.assert_close(lp, ref)  # float64, 9-term logsumexp: error ~1e-15, default float64 tolerance 1e-7
    assert not lse.requires_grad
    # hand case: z = [0, log 3] -> softmax [1/4, 3/4]; lp(tgt=1) = log 3/4; dlp/dz = [-1/4, 1/4]
    z2 = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    lp2, _ = _TargetLogprob.apply(z2, torch.tensor([1]))
    # exact: float64, a few ops on O(1) numbers (error ~1e-16); 1e-12 and the default float64 1e-7 are slack
    assert abs(lp2.item() - math.log(0.75)) < 1e-12
    lp2.sum().backward()
    torch.testing.assert_close(z2.grad, torch.tensor([[-0.25, 0.25]], dtype=torch.float64))


def test_bfloat16_model_runs_and_is_float32(batch):
    model, _ = build_tiny(seed=4)
    model = model.to(torch.bfloat16)
    out = forward_tokens(model, batch, chunk_tokens=4, with_hidden=True)
    assert out["logprob"].dtype == torch.float32 and out["hidden"].dtype == torch.float32
    (out["logprob"] * batch.response_mask).sum().backward()
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad.float()).all()


def test_shared_prompt_path_matches_naive_values_and_gradients(tiny):
    """Groups repeat one prompt: the decoder runs each distinct prompt once into a
    KV cache shared by its rows (forward._shared_prompt_body). Values and
    gradients must equal the plain full-logits computation."""
    from tokencredit.model import forward as fwd

    model, tok = tiny
    prompts = ["2+3=", "2+3=", "2+3=", "hi", "hi", "hi"]
    responses = ["5<|im_end|>", "6", "five!", "hello there!", "yo", "h"]
    b = make_batch(tok, prompts, responses)
    calls = []
    orig = fwd._shared_prompt_body
    fwd._shared_prompt_body = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        out = forward_tokens(model, b, temperature=0.7, chunk_tokens=5)
    finally:
        fwd._shared_prompt_body = orig
    assert calls, "the shared-prompt path was not taken"
    ref = naive_token_logprobs(model, b, 0.7)
    # float32 path difference: prompt KV cache + response pass vs one full pass, then chunked head: as test_matches_naive
    torch.testing.assert_close(out["logprob"], ref["logprob"] * b.response_mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["entropy"], ref["entropy"] * b.response_mask, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad((out["logprob"] * b.response_mask).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref["logprob"] * b.response_mask).sum(), params, allow_unused=True)
    for (name, _), a, r in zip(model.named_parameters(), g, g_ref):
        if r is None:
            continue
        assert_grad_close(a, r, name)


def test_shared_prompt_path_forced_on_distinct_prompts_matches_the_full_pass(tiny):
    """FSDP2 forces the shared-prompt path (`always=True`: every rank must run the same
    layer calls whatever its rows). On rows with all-distinct prompts, where the
    plain choice would decline, it returns the full pass's hidden states."""
    from tokencredit.model import forward as fwd

    model, tok = tiny
    b = make_batch(tok, ["2+3=", "hi", "what is 7?"], ["5<|im_end|>", "hello there!", "h"])
    dec = fwd._decoder(model)
    inputs = b.model_inputs()
    assert fwd._shared_prompt_body(dec, b, inputs) is None  # 3 distinct prompts of 3 rows: declined
    with torch.no_grad():
        shared = fwd._shared_prompt_body(dec, b, inputs, always=True)  # [B, L, H]
        full = dec(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   position_ids=inputs["position_ids"], use_cache=False).last_hidden_state
    real = inputs["attention_mask"].bool()  # padded positions hold no defined state
    # float32 path difference: KV-cached attention sums in another order; |h| <= 3.4, measured <= 5e-7
    torch.testing.assert_close(shared[real], full[real], atol=1e-5, rtol=1e-5)
