"""Tests for tokencredit.probes.masking (cancellation paper Table 1, App. D.1).

The reference for every masking effect is the literal procedure: deepcopy the
model, take one SGD step on Eq. 2 with the masked tokens' weights set to 0
(normaliser N unchanged), forward the candidate's row, compare with the
unmasked step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tokencredit.batch import RolloutBatch
from tokencredit.model.forward import forward_tokens
from tokencredit.model.tiny import build_tiny
from tokencredit.probes.masking import (
    SET_NAMES,
    boost_stats,
    build_mask_sets,
    eq2_weights,
    full_masking,
    lm_head_masking,
    masking_probe,
    select_candidates,
    sgd_step,
    sign_agreement,
    token_logprobs,
    untie_lm_head,
)

PROMPTS = ["add 2 and 3", "what is 4 + 4?"]
RESPONSES = [
    ["2 + 3 = 5. the answer is 5", "2 and 3 make 6", "it is 5", "answer: 23"],
    ["4 + 4 = 8", "8", "4 plus 4 is 9, so 9", "the answer is 8."],
]
ADV = [0.9, -1.1, 0.8, -0.6, 0.7, 0.5, -1.4, 0.2]
LR = 0.1


def make_batch(tok, adv=ADV) -> RolloutBatch:
    """8 char-level rows, 2 groups of 4; left-padded prompts, right-padded responses."""
    p_ids, r_ids, gid = [], [], []
    for g, (p, rs) in enumerate(zip(PROMPTS, RESPONSES)):
        for r in rs:
            p_ids.append(tok(p, add_special_tokens=False).input_ids)
            r_ids.append(tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id])
            gid.append(g)
    P, T = max(map(len, p_ids)), max(map(len, r_ids))
    pad = tok.pad_token_id
    prompt = torch.tensor([[pad] * (P - len(x)) + x for x in p_ids])
    pmask = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in p_ids])
    resp = torch.tensor([x + [pad] * (T - len(x)) for x in r_ids])
    rmask = torch.tensor([[1.0] * len(x) + [0.0] * (T - len(x)) for x in r_ids])
    return RolloutBatch(prompt, pmask, resp, rmask, torch.tensor(gid), pad_id=pad, advantage=torch.tensor(adv, dtype=torch.float32))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny(seed=0)  # tied embeddings
    return model, make_batch(tok)


def _flat(batch):
    return (batch.response_mask > 0).nonzero(as_tuple=True)


def _logp(model, batch, b, t):
    sub = batch.select([b])
    with torch.no_grad():
        return float(forward_tokens(model, sub, with_entropy=False)["logprob"][0, t])


def brute_step(model, batch, M, lm_head: bool):
    """deepcopy + one SGD step on Eq. 2 with the tokens M (flat indices) removed,
    normaliser N unchanged. Returns the updated copy."""
    rows, pos = _flat(batch)
    w = eq2_weights(batch)
    w[rows[M], pos[M]] = 0.0
    m = untie_lm_head(model) if lm_head else copy.deepcopy(model)
    sgd_step(m, batch, w, LR, norm=batch.num_tokens, params="lm_head" if lm_head else "trainable")
    return m


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sets_are_well_formed(tiny):
    model, batch = tiny
    rows, pos = _flat(batch)
    ids = batch.response_ids[rows, pos]
    old = token_logprobs(model, batch)[rows, pos].exp()
    in_loss = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(5)) < 0.7
    g = torch.Generator().manual_seed(1)
    cands = select_candidates(ids, 20, g, in_loss)
    assert cands.numel() == 20 and cands.unique().numel() == 20
    thr = float(old.median())
    sets = build_mask_sets(ids, old, cands, thr, g, in_loss)
    for i, c in enumerate(cands.tolist()):
        same = sets["same_token"][i]
        assert same.numel() >= 1 and c not in same.tolist() and in_loss[same].all()
        assert same.numel() == int(((ids == ids[c]) & in_loss).sum()) - int(in_loss[c])
        assert (ids[same] == ids[c]).all()
        rnd = sets["random"][i]
        assert rnd.numel() == same.numel() and (ids[rnd] != ids[c]).all() and in_loss[rnd].all()
        lc = sets["low_conf"][i]
        assert (old[lc] < thr).all() and (ids[lc] != ids[c]).all() and in_loss[lc].all() and lc.numel() <= same.numel()
        sl = sets["same_token&low_conf"][i]
        assert set(sl.tolist()) == {k for k in same.tolist() if old[k] < thr}


@pytest.mark.parametrize("lm_head", [True, False])
def test_empty_set_gives_exactly_zero(tiny, lm_head):
    model, batch = tiny
    rows, pos = _flat(batch)
    ids = batch.response_ids[rows, pos]
    cands = select_candidates(ids, 3, torch.Generator().manual_seed(0))
    empty = {"empty": [torch.empty(0, dtype=torch.long)] * 3}
    fn = lm_head_masking if lm_head else full_masking
    out = fn(model, batch, eq2_weights(batch), cands, empty, LR)
    assert torch.equal(out["delta"]["empty"], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("lm_head", [True, False])
def test_masking_effect_matches_brute_force(tiny, lm_head):
    model, batch = tiny
    rows, pos = _flat(batch)
    ids = batch.response_ids[rows, pos]
    g = torch.Generator().manual_seed(3)
    cands = select_candidates(ids, 2, g)
    old = token_logprobs(model, batch)[rows, pos].exp()
    sets = build_mask_sets(ids, old, cands, float(old.median()), g)
    sets = {k: sets[k] for k in ("same_token", "random")}
    before = _params(model)
    fn = lm_head_masking if lm_head else full_masking
    out = fn(model, batch, eq2_weights(batch), cands, sets, LR)
    full = brute_step(model, batch, torch.empty(0, dtype=torch.long), lm_head)
    for i, c in enumerate(cands.tolist()):
        b, t = int(rows[c]), int(pos[c])
        l_full = _logp(full, batch, b, t)
        assert abs(float(out["logp_full"][i]) - l_full) < 1e-5
        for k, lst in sets.items():
            ref = l_full - _logp(brute_step(model, batch, lst[i], lm_head), batch, b, t)
            assert abs(float(out["delta"][k][i]) - ref) < 1e-5, (k, i, float(out["delta"][k][i]), ref)
    assert any(abs(float(out["delta"]["same_token"][i])) > 1e-4 for i in range(len(cands)))  # a real effect was tested
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # caller's model untouched
    assert all(p.grad is None for p in model.parameters())


def test_lm_head_step_leaves_other_parameters_unchanged(tiny):
    model, batch = tiny
    m = untie_lm_head(model)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    sgd_step(m, batch, eq2_weights(batch), LR, params="lm_head")
    changed = {k for k, v in m.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"lm_head.weight"}
    # the input embedding (tied to the head in the original) is untouched
    assert torch.equal(m.get_input_embeddings().weight, model.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="tied"):
        sgd_step(copy.deepcopy(model), batch, eq2_weights(batch), LR, params="lm_head")


def test_lm_head_closed_form_delta_all_matches_step(tiny):
    model, batch = tiny
    rows, pos = _flat(batch)
    out = lm_head_masking(model, batch, eq2_weights(batch), torch.empty(0, dtype=torch.long), {}, LR)
    m = untie_lm_head(model)
    sgd_step(m, batch, eq2_weights(batch), LR, params="lm_head")
    ref = (token_logprobs(m, batch) - token_logprobs(model, batch))[rows, pos].double()
    assert (out["delta_all"] - ref).abs().max() < 1e-5


def test_sign_agreement_is_one_when_only_the_head_trains():
    model, tok = build_tiny(seed=1, tie=False)
    model.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(True)
    batch = make_batch(tok)
    tables, summary = masking_probe(model, batch, n_candidates=4, n_full=2, lr=LR, threshold=0.5)
    assert summary["sign_agreement"] == 1.0
    d_head = torch.tensor(tables["tokens"]["delta_lm_head"])
    d_full = torch.tensor(tables["tokens"]["delta_full"])
    assert (d_head - d_full).abs().max() < 1e-5
    # with only the head trainable the two update kinds give the same masking effects
    c = tables["candidates"]
    for a, b, f in zip(c["delta_lm_head"], c["delta_full"], c["in_full"]):
        if f:
            assert abs(a - b) < 1e-5


def test_masking_probe_tables_and_summary(tiny):
    model, batch = tiny
    before = _params(model)
    tables, summary = masking_probe(model, batch, n_candidates=6, n_full=2, modes=("lm_head", "full"), seed=0)
    assert [r["set"] for r in summary["table"]] == list(SET_NAMES)
    c = tables["candidates"]
    assert len(c["set"]) == 6 * 4 and sum(c["in_full"]) == 2 * 4
    for r in summary["table"]:
        assert r["n_lm_head"] <= 6 and r["n_full"] <= 2
        if r["n_lm_head"]:
            assert 0.0 <= r["boost_rate_lm_head"] <= 1.0
    assert len(tables["tokens"]["row"]) == batch.num_tokens
    assert 0.0 <= summary["sign_agreement"] <= 1.0
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_boost_stats_and_sign_agreement_by_hand():
    d = torch.tensor([0.5, -0.1, 0.0, 0.2])
    st = boost_stats(d)
    assert st == {"n": 4, "boost_rate": 0.5, "mean_boost": pytest.approx(0.15)}
    st = boost_stats(d, torch.tensor([True, True, False, False]))
    assert st["n"] == 2 and st["boost_rate"] == 0.5 and st["mean_boost"] == pytest.approx(0.2)
    assert boost_stats(torch.empty(0))["n"] == 0
    assert sign_agreement(torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([0.5, 1.0, 0.0, 2.0])) == 0.75
