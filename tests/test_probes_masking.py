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
from tokencredit.model.forward import forward_rows, forward_tokens
from tokencredit.model.tiny import build_tiny
from tokencredit.probes.masking import (
    READINGS,
    SET_NAMES,
    boost_stats,
    build_mask_sets,
    eq2_weights,
    full_masking,
    lm_head_masking,
    low_confidence,
    masking_probe,
    select_candidates,
    sgd_step,
    sign_aligned,
    sign_agreement,
    split_by_sign,
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


def transformed(model, logit_scale=4.0, softcap=2.0):
    """A deepcopy whose logits get a logit scale and a final softcap (Cohere / Gemma-2
    style; the probes' forward reads them from the config)."""
    m = copy.deepcopy(model)
    m.config.logit_scale = logit_scale
    m.config.final_logit_softcapping = softcap
    return m


def logprobs(model, batch):
    """[B, T] no-grad log-probs (the probes' forward_rows)."""
    return forward_rows(model, batch, micro_rows=8, with_entropy=False)["logprob"]


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
    old = logprobs(model, batch)[rows, pos].exp()
    in_loss = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(5)) < 0.7
    g = torch.Generator().manual_seed(1)
    cands = select_candidates(ids, 20, g, in_loss)
    assert cands.numel() == 20 and cands.unique().numel() == 20
    thr = float(old.median())
    low, _ = low_confidence(old, None, "prob", thr)
    state = g.get_state()
    sets = build_mask_sets(ids, low, cands, g, in_loss)
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
    # pair condition: same draws; the low-confidence sets survive only for low-confidence candidates
    g.set_state(state)
    paired = build_mask_sets(ids, low, cands, g, in_loss, pair=True)
    assert 0 < int(low[cands].sum()) < cands.numel()  # both kinds of candidate are tested
    for i, c in enumerate(cands.tolist()):
        for k in ("random", "same_token"):
            assert torch.equal(paired[k][i], sets[k][i])
        for k in ("low_conf", "same_token&low_conf"):
            assert torch.equal(paired[k][i], sets[k][i] if old[c] < thr else torch.empty(0, dtype=torch.long))
    # readings pos / neg: the set's A > 0 and A < 0 tokens, a partition of it
    adv = torch.randn(ids.numel(), generator=torch.Generator().manual_seed(2))
    split = split_by_sign(sets, adv)
    assert set(split) == {f"{k}:{q}" for k in SET_NAMES for q in ("pos", "neg")}
    for k in SET_NAMES:
        for i in range(cands.numel()):
            P, Q = split[f"{k}:pos"][i], split[f"{k}:neg"][i]
            assert (adv[P] > 0).all() and (adv[Q] < 0).all()
            assert sorted(P.tolist() + Q.tolist()) == sorted(sets[k][i].tolist())
    with pytest.raises(ValueError, match="bool"):
        build_mask_sets(ids, old, cands, g, in_loss)  # old-style call with probabilities


def test_low_confidence_by_hand():
    p = torch.tensor([0.1, 0.5, 0.7, 0.49])
    low, cut = low_confidence(p, None, "prob", 0.5)
    assert low.tolist() == [True, False, False, True] and cut == 0.5
    e = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    p5 = torch.full((5,), 0.3)
    low, cut = low_confidence(p5, e, "entropy", 0.5)  # median 2: strictly above it
    assert low.tolist() == [False, False, False, True, True] and cut == 2.0
    low, cut = low_confidence(p5, e, "entropy", 0.8)  # 0.8-quantile: 3.2 (linear interpolation)
    # float32 quantile of exact integers: 3.2 off by one float32 rounding (rel 6e-8) < approx's default rel 1e-6
    assert low.tolist() == [False, False, False, False, True] and cut == pytest.approx(3.2)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="probability"):
            low_confidence(p, None, "prob", bad)
    with pytest.raises(ValueError, match="quantile"):
        low_confidence(p5, e, "entropy", 1.0)
    with pytest.raises(ValueError, match="entropies"):
        low_confidence(p5, None, "entropy", 0.5)
    with pytest.raises(ValueError, match="confidence"):
        low_confidence(p5, e, "margin", 0.5)


def test_sign_aligned_by_hand():
    d = torch.tensor([0.5, -0.2, 0.3, 0.1], dtype=torch.float64)
    net = torch.tensor([1.0, -2.0, -0.5, 0.0])
    a = sign_aligned(d, net)
    assert a.tolist() == [0.5, 0.2, -0.3, 0.0]
    st = boost_stats(a)  # boosted: 0.5 and 0.2; a net weight of 0 is not boosted
    # exact: float64 mean of four hand numbers (error ~1e-17); approx's default rel 1e-6 is slack
    assert st["n"] == 4 and st["boost_rate"] == 0.5 and st["mean_boost"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shape"):
        sign_aligned(d, net[:3])


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


@pytest.mark.parametrize("tf", [False, True], ids=["plain", "scale_softcap"])
@pytest.mark.parametrize("lm_head", [True, False])
def test_masking_effect_matches_brute_force(tiny, lm_head, tf):
    model, batch = tiny
    model = transformed(model) if tf else model  # the closed form under logit scale + softcap
    rows, pos = _flat(batch)
    ids = batch.response_ids[rows, pos]
    g = torch.Generator().manual_seed(3)
    cands = select_candidates(ids, 2, g)
    old = logprobs(model, batch)[rows, pos].exp()
    sets = build_mask_sets(ids, low_confidence(old, None, "prob", float(old.median()))[0], cands, g)
    sets = {k: sets[k] for k in ("same_token", "random")}
    before = _params(model)
    fn = lm_head_masking if lm_head else full_masking
    out = fn(model, batch, eq2_weights(batch), cands, sets, LR)
    full = brute_step(model, batch, torch.empty(0, dtype=torch.long), lm_head)
    # float32 path difference: each delta is a difference of two float32 log-probs (|lp| <= 6, ulp 4.8e-7, ~1e-6
    # each after the V=101 logsumexp) from another update path; measured <= 7e-7 (AVX512, AVX2, SSE)
    for i, c in enumerate(cands.tolist()):
        b, t = int(rows[c]), int(pos[c])
        l_full = _logp(full, batch, b, t)
        assert abs(float(out["logp_full"][i]) - l_full) < 1e-5
        for k, lst in sets.items():
            ref = l_full - _logp(brute_step(model, batch, lst[i], lm_head), batch, b, t)
            assert abs(float(out["delta"][k][i]) - ref) < 1e-5, (k, i, float(out["delta"][k][i]), ref)
    assert any(abs(float(out["delta"]["same_token"][i])) > 1e-4 for i in range(len(cands)))  # a real effect (10x the tolerance)
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


@pytest.mark.parametrize("tf", [False, True], ids=["plain", "scale_softcap"])
def test_lm_head_closed_form_delta_all_matches_step(tiny, tf):
    model, batch = tiny
    model = transformed(model) if tf else model
    rows, pos = _flat(batch)
    out = lm_head_masking(model, batch, eq2_weights(batch), torch.empty(0, dtype=torch.long), {}, LR)
    m = untie_lm_head(model)
    sgd_step(m, batch, eq2_weights(batch), LR, params="lm_head")
    ref = (logprobs(m, batch) - logprobs(model, batch))[rows, pos].double()
    # float32: closed-form head step vs an SGD step, each delta a difference of float32 log-probs (|lp| <= 6,
    # ulp 4.8e-7); measured <= 1.1e-6
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
    # float32: one update by two paths (closed-form head step vs autograd), deltas of float32 log-probs; measured <= 8e-7
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
    assert [(r["reading"], r["set"]) for r in summary["table"]] == [(q, k) for q in READINGS for k in SET_NAMES]
    c = tables["candidates"]
    assert len(c["set"]) == 6 * 4 and sum(c["in_full"]) == 2 * 4
    for r in summary["table"]:
        assert r["n_lm_head"] <= 6 and r["n_full"] <= 2 and r["n_lm_head_paired"] <= 2
        if r["n_lm_head"]:
            assert 0.0 <= r["boost_rate_lm_head"] <= 1.0
    assert len(tables["tokens"]["row"]) == batch.num_tokens
    assert 0.0 <= summary["sign_agreement"] <= 1.0
    after = _params(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the prompt-bootstrap table (probes/bootstrap.py) reproduces every Boost Rate / Mean Boost / n of the summary
    from tokencredit.probes.bootstrap import boost_rates_ci

    ci = {(r["reading"], r["set"], r["mode"]): r for r in boost_rates_ci(c, batch.group_id.numpy(), reps=200)}
    for r in summary["table"]:
        for mode in ("lm_head", "full"):
            got = ci.get((r["reading"], r["set"], mode))
            if not r[f"n_{mode}"]:
                assert got is None
                continue
            assert got["n"] == r[f"n_{mode}"]
            # the same deltas through another float64 mean (equal here); approx's default rel 1e-6 is slack
            assert got["boost_rate"][0] == pytest.approx(r[f"boost_rate_{mode}"])
            assert got["mean_boost"] == pytest.approx(r[f"mean_boost_{mode}"])
            assert got["boost_rate"][1] <= got["boost_rate"][0] <= got["boost_rate"][2]


def test_boost_stats_and_sign_agreement_by_hand():
    d = torch.tensor([0.5, -0.1, 0.0, 0.2])
    st = boost_stats(d)
    # float64 mean of float32(-0.1), float32(0.2): off by ~1e-9 relative, inside approx's default rel 1e-6
    assert st == {"n": 4, "boost_rate": 0.5, "mean_boost": pytest.approx(0.15)}
    st = boost_stats(d, torch.tensor([True, True, False, False]))
    assert st["n"] == 2 and st["boost_rate"] == 0.5 and st["mean_boost"] == pytest.approx(0.2)
    assert boost_stats(torch.empty(0))["n"] == 0
    assert sign_agreement(torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([0.5, 1.0, 0.0, 2.0])) == 0.75


def _brute_reading_table(model, batch, cand_rows, n_full):
    """Every reading of every set by the literal procedure: one deepcopy + SGD
    step per (candidate, masked set), the set split by the sign of A_k by hand.
    cand_rows: [(flat index, {set: all-signs token list})]. Returns
    {(reading, set, mode): (C',) float64 per-candidate statistic over the
    candidates whose set is non-empty} and the raw deltas."""
    rows, pos = _flat(batch)
    A = eq2_weights(batch)[rows, pos].double()
    stats, raw = {}, {}
    for mode, cands in (("lm_head", cand_rows), ("full", cand_rows[:n_full]), ("lm_head_paired", cand_rows[:n_full])):
        head = mode != "full"
        full = brute_step(model, batch, torch.empty(0, dtype=torch.long), head)
        per = {}  # (reading, set) -> list of per-candidate statistics over non-empty sets
        for c, sets in cands:
            b, t = int(rows[c]), int(pos[c])
            l_full = _logp(full, batch, b, t)
            for k, M in sets.items():
                M = torch.tensor(M, dtype=torch.long)
                parts = {"all": M, "pos": M[A[M] > 0], "neg": M[A[M] < 0]}
                d = {}
                for q, Mq in parts.items():
                    if Mq.numel():
                        d[q] = l_full - _logp(brute_step(model, batch, Mq, head), batch, b, t)
                        per.setdefault((q, k), []).append(d[q])
                        raw[(mode, c, k, q)] = d[q]
                if M.numel():
                    net = float(A[M].sum())
                    per.setdefault(("aligned", k), []).append((net > 0) * d["all"] - (net < 0) * d["all"])
        for (q, k), ds in per.items():
            stats[(q, k, mode)] = torch.tensor(ds, dtype=torch.float64)
    return stats, raw


@pytest.mark.parametrize("kw", [dict(), dict(confidence="entropy", threshold=0.5, pair=True)], ids=["prob", "entropy_pair"])
def test_every_reading_matches_brute_force(tiny, kw):
    """Table rows of all four readings (n, Boost Rate, Mean Boost; LM-head, full,
    paired) against deltas from literal masked SGD steps."""
    model, batch = tiny
    rows, pos = _flat(batch)
    old = logprobs(model, batch)[rows, pos].exp()
    kw = kw or dict(threshold=float(old.median()))  # the tiny model puts every prob under 0.5
    C, n_full = 4, 2
    tables, summary = masking_probe(model, batch, n_candidates=C, n_full=n_full, lr=LR, seed=1, **kw)
    c = tables["candidates"]
    cand_rows = []
    for i in range(0, len(c["set"]), len(SET_NAMES)):
        cand_rows.append((c["candidate"][i], {c["set"][i + j]: c["set_tokens"][i + j] for j in range(len(SET_NAMES))}))
    stats, raw = _brute_reading_table(model, batch, cand_rows, n_full)
    # the per-candidate deltas of the table are the brute-force ones, for every reading
    for i, k, cand in zip(range(len(c["set"])), c["set"], c["candidate"]):
        for q, tag in (("all", ""), ("pos", "_pos"), ("neg", "_neg")):
            for mode in ("lm_head", "full"):
                got = c[f"delta_{mode}{tag}"][i]
                ref = raw.get((mode, cand, k, q))
                if ref is None:  # empty set (delta = 0) or not run on the full path
                    assert got == 0.0 or (mode == "full" and not c["in_full"][i]), (mode, cand, k, q, got)
                else:  # float32 deltas of log-probs by another update path, as in test_masking_effect_matches_brute_force
                    assert abs(got - ref) < 1e-5, (mode, cand, k, q, got, ref)
    # non-vacuous: both signs are masked somewhere, and reading (a) differs from (c) somewhere
    assert any(c["set_size_pos"][i] and c["set_size_neg"][i] for i in range(len(c["set"])))
    assert any(abs(x) > 1e-3 for x in raw.values())  # real effects: 100x the 1e-5 tolerance
    assert {q for q in READINGS if any(r[0] == q for r in stats)} == set(READINGS)
    tol = 1e-5  # float32 noise of the brute-force steps: a |delta| below it has no reliable sign
    assert sum(abs(x) > tol for x in raw.values()) >= 0.8 * len(raw)
    table = {(r["reading"], r["set"]): r for r in summary["table"]}
    differs = False
    for (q, k), r in table.items():
        for mode in ("lm_head", "full", "lm_head_paired"):
            x = stats.get((q, k, mode), torch.zeros(0, dtype=torch.float64))
            assert r[f"n_{mode}"] == x.numel(), (q, k, mode, r[f"n_{mode}"], x)
            if x.numel():
                boosted = round(r[f"boost_rate_{mode}"] * x.numel())
                assert int((x > tol).sum()) <= boosted <= int((x > -tol).sum()), (q, k, mode, boosted, x)
                # a mean of deltas each within the per-delta bound above; measured <= 6e-7
                assert r[f"mean_boost_{mode}"] == pytest.approx(float(x.mean()), abs=tol)
        if r["n_lm_head"]:
            differs |= r["boost_rate_lm_head"] != table[("all", k)]["boost_rate_lm_head"] and q == "aligned"
    assert differs
    if kw.get("pair"):  # pair condition: the low-confidence rows hold only low-confidence candidates
        low = dict(zip(c["candidate"], c["candidate_low_conf"]))
        assert 0 < sum(low.values()) < len(low)
        for q in READINGS:
            for k in ("low_conf", "same_token&low_conf"):
                assert table[(q, k)]["n_lm_head"] <= sum(low.values())
        ent = forward_tokens(model, batch)["entropy"][rows, pos]
        low_ref = ent > ent.double().quantile(0.5)  # [N] entropy above the batch median
        assert tables["tokens"]["low_conf"] == low_ref.tolist()
        assert summary["low_conf_cut"] == pytest.approx(float(ent.double().quantile(0.5)))  # same float64 quantile: equal here
        for i, k in enumerate(c["set"]):
            if k in ("low_conf", "same_token&low_conf"):
                assert bool(low_ref[c["candidate"][i]]) == c["candidate_low_conf"][i]
                assert set(c["set_tokens"][i]) <= set(low_ref.nonzero().view(-1).tolist())
                if not c["candidate_low_conf"][i]:
                    assert c["set_size"][i] == 0  # pair condition: both tokens low confidence
        assert any(c["set_size"][i] for i, k in enumerate(c["set"]) if k == "same_token&low_conf")


def test_full_masking_compose_checks_the_partition(tiny):
    model, batch = tiny
    rows, pos = _flat(batch)
    ids = batch.response_ids[rows, pos]
    cands = select_candidates(ids, 1, torch.Generator().manual_seed(0))
    M = torch.tensor([0, 3, 5])
    sets = {"all": [M], "a": [M[:1]], "b": [M[1:]], "bad": [M[:2]]}
    out = full_masking(model, batch, eq2_weights(batch), cands, sets, LR, compose={"all": ("a", "b")})
    ref = full_masking(model, batch, eq2_weights(batch), cands, {"all": [M]}, LR)
    # float32 path difference: the parts' gradients summed vs one backward over M, then deltas of float32 log-probs
    # (|lp| ~ 5, ulp 4.8e-7): 1e-6 was 2 ulps, 1e-5 as the brute-force checks (equal here); |delta| = 0.015 >> 1e-5
    assert abs(float(out["delta"]["all"][0] - ref["delta"]["all"][0])) < 1e-5 and abs(float(ref["delta"]["all"][0])) > 1e-3
    with pytest.raises(ValueError, match="partition"):
        full_masking(model, batch, eq2_weights(batch), cands, sets, LR, compose={"all": ("a", "bad")})
    with pytest.raises(ValueError, match="compose"):
        full_masking(model, batch, eq2_weights(batch), cands, sets, LR, compose={"all": ("a", "nope")})


def test_cli_masking_options(tiny, tmp_path, capsys):
    import json

    from tokencredit.cli import main
    from tokencredit.batch import save_batch

    _, batch = tiny
    path = save_batch(batch, tmp_path / "b")
    out = tmp_path / "probes"
    common = ["probe", "masking", "--model", "tiny-random", "--batch", str(path), "--out", str(out), "--no-progress",
              "--candidates", "3", "--full-candidates", "1"]
    assert main([*common, "--confidence", "entropy", "--low-conf", "0.7", "--pair", "--no-sign-split"]) == 0
    rows = [json.loads(x) for x in (out / "masking.jsonl").read_text().splitlines()]
    assert [(r["reading"], r["set"]) for r in rows] == [(q, k) for q in ("all", "aligned") for k in SET_NAMES]
    assert all(isinstance(r["n_lm_head"], int) and isinstance(r["n_full"], int) for r in rows)
    s = json.loads((out / "masking_summary.json").read_text())
    assert s["confidence"] == "entropy" and s["pair"] is True and s["threshold"] == 0.7 and "0.7-quantile" in s["low_conf_rule"]
    text = capsys.readouterr().out
    assert "reading (a)" in text and "reading (c)" in text and "reading (b+)" not in text
    assert main(common) == 0  # defaults: every reading
    rows = [json.loads(x) for x in (out / "masking.jsonl").read_text().splitlines()]
    assert [r["reading"] for r in rows[:: len(SET_NAMES)]] == list(READINGS)
    capsys.readouterr()
    assert main([*common, "--low-conf", "1.5"]) == 2
    assert main([*common, "--confidence", "entropy", "--low-conf", "1.0"]) == 2
    assert "--low-conf" in capsys.readouterr().err


@pytest.mark.parametrize("tf", [False, True], ids=["plain", "scale_softcap"])
def test_coupling_and_masking_share_the_lm_head_step(tiny, tf):
    """The masking probe's exact head step (closed form from lm_head_grad) is the
    autograd head step of coupling.lm_head_grad_step, and coupling's first-order
    prediction (the same G) tracks it: one gradient, one logit transform."""
    from tokencredit.model.forward import lm_head_inputs
    from tokencredit.probes.coupling import lm_head_grad_step, predicted_shift
    from tokencredit.probes.lm_head import lm_head_of

    model, batch = tiny
    model = transformed(model) if tf else model
    rows, pos = _flat(batch)
    w = eq2_weights(batch)
    lr = 0.005  # small: the first-order prediction below is within a few % of the step
    out = lm_head_masking(model, batch, w, torch.empty(0, dtype=torch.long), {}, lr)
    h = lm_head_inputs(model, batch)[rows, pos].double()  # [N, d]
    o, A = batch.response_ids[rows, pos], w[rows, pos].double()
    real = lm_head_grad_step(model, h, o, A, lr=lr)["delta_logp"]  # autograd on W, the model's transform
    # float32 hidden states, the same head step by closed form and by autograd; measured <= 4e-8, 1e-5 as above
    assert (out["delta_all"] - real).abs().max() < 1e-5
    W, bias, t = lm_head_of(model, dtype=torch.float64)
    pred = predicted_shift(h, W, o, A, lr, bias=bias, temperature=t.temperature, logit_scale=t.logit_scale, softcap=t.softcap)["delta"]
    # not rounding: first-order prediction vs the step at lr 0.005 (second-order gap 0.9% of max here)
    assert torch.corrcoef(torch.stack([pred, out["delta_all"]]))[0, 1] > 0.99
    assert (pred - out["delta_all"]).abs().max() < 0.05 * out["delta_all"].abs().max()
    if tf:  # the transform changes the step (not vacuous)
        plain = lm_head_masking(tiny[0], batch, w, torch.empty(0, dtype=torch.long), {}, lr)["delta_all"]
        assert (plain - out["delta_all"]).abs().max() > 1e-3  # must differ: 0.055 here, far above float noise


def test_masking_probe_passes_chunk_tokens_and_micro_rows(tiny, monkeypatch):
    """model.chunk_tokens and --micro-rows reach the LM-head path; results do not depend on them."""
    import tokencredit.probes.masking as mk

    model, batch = tiny
    seen = {}
    grad, inputs = mk.lm_head_grad, mk.lm_head_inputs

    def grad_spy(*a, **kw):
        seen["chunk_tokens"] = kw["chunk_tokens"]
        return grad(*a, **kw)

    def inputs_spy(m, b, **kw):
        seen["micro_rows"] = kw["micro_rows"]
        return inputs(m, b, **kw)

    kw = dict(n_candidates=4, modes=("lm_head",), seed=0)
    ref, _ = masking_probe(model, batch, **kw)
    monkeypatch.setattr(mk, "lm_head_grad", grad_spy)
    monkeypatch.setattr(mk, "lm_head_inputs", inputs_spy)
    got, _ = masking_probe(model, batch, chunk_tokens=3, micro_rows=2, **kw)
    assert seen == {"chunk_tokens": 3, "micro_rows": 2}
    # float32 path difference (2-row passes, chunked head) on values <= 0.06 (deltas) and <= ~0.1 (probs): errors
    # ~ u * |x| * few ~ 1e-8, measured <= 3e-8; 1e-6 leaves 30x
    for col in ("delta_lm_head", "old_prob"):
        assert max(abs(a - b) for a, b in zip(got["tokens"][col], ref["tokens"][col])) < 1e-6
    assert max(abs(a - b) for a, b in zip(got["candidates"]["delta_lm_head"], ref["candidates"]["delta_lm_head"])) < 1e-6
