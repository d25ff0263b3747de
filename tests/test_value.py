"""Token value probe (direct, Eq. 20 and A_M estimators): hand-computed
statistics, the alternative branch's first-token distribution (o_t excluded),
the shared-prefix continuation path against the unshared ones on the tiny
model, an end-to-end value on a toy task scored by the real verifier, p = 1
(no alternative token), and an interrupted + resumed run of the probe on a
small run directory."""

import json
import math

import pytest
import torch

from tokencredit.probes.value import (
    ESTIMATORS,
    branch_continuations,
    branch_mean_se,
    counterfactual_value,
    entropy_cutoffs,
    entropy_ranks,
    entropy_topk_gaps,
    estimator_gaps,
    exclude_token,
    next_token_probs,
    repeat_gaps,
    sample_first_tokens,
    select_tokens,
    split_gap,
    token_values,
    value_estimates,
    value_gap,
)

# ----------------------------------------------------------------- pure math


# pure-math tests below: python float64 on hand numbers (error ~1e-16); approx's default rel 1e-6 only tells formulas apart


def test_counterfactual_value_hand_numbers():
    assert counterfactual_value(0.75, 0.5, 0.5) == pytest.approx(0.5)
    assert counterfactual_value(0.2, 0.6, 0.2) == pytest.approx(-0.5)
    assert counterfactual_value(1.0, 0.0, 0.0) == 1.0
    assert math.isnan(counterfactual_value(1.0, 1.0, 1.0))
    assert math.isnan(counterfactual_value(1.0, 0.5, float("nan")))


def test_eq20_recovers_q_minus_counterfactual_q():
    # exact expectations: V = p Q + (1 - p) Q_-  =>  (Q - V) / (1 - p) = Q - Q_-
    for Q, Qm, p in [(0.9, 0.3, 0.25), (0.1, 0.8, 0.6), (0.5, 0.5, 0.1)]:
        V = p * Q + (1 - p) * Qm
        assert counterfactual_value(Q, V, p) == pytest.approx(Q - Qm)


def test_branch_mean_se_by_hand():
    # [1, 0, 1, 1]: mean 0.75, sample variance (3 * 0.25^2 + 0.75^2) / 3 = 0.25, se = 0.5 / sqrt(4)
    assert branch_mean_se([1.0, 0.0, 1.0, 1.0]) == pytest.approx((0.75, 0.25))
    assert branch_mean_se([1.0] * 5) == (1.0, 0.0)
    m, se = branch_mean_se([0.5])
    assert m == 0.5 and math.isnan(se)  # one draw: no spread estimate
    assert all(math.isnan(x) for x in branch_mean_se([])) and all(math.isnan(x) for x in branch_mean_se(None))


def test_value_estimates_by_hand():
    r0, r1, ra = [1.0] * 4, [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]
    e = value_estimates(r0, r1, ra, p=0.5)
    se_alt = math.sqrt(1 / 3) / 2  # [0, 0, 1, 1]: sample variance 4 * 0.25 / 3
    assert (e["avg0"], e["avg1"], e["avg_alt"]) == (1.0, 0.75, 0.5)
    assert (e["se0"], e["se1"]) == (0.0, pytest.approx(0.25)) and e["se_alt"] == pytest.approx(se_alt)
    assert e["value_direct"] == pytest.approx(0.5) and e["se_direct"] == pytest.approx(se_alt)  # sqrt(0^2 + se_alt^2)
    assert e["value_am"] == pytest.approx(0.25) and e["se_am"] == pytest.approx(0.25)  # sqrt(0^2 + 0.25^2)
    assert e["value_eq20"] == pytest.approx(0.5) and e["se_eq20"] == pytest.approx(0.5)  # 0.25 / (1 - 0.5) twice
    e = value_estimates([1.0, 0.0], [0.0, 0.0], [1.0, 1.0], p=0.2)
    assert e["se0"] == pytest.approx(0.5) and e["se_direct"] == pytest.approx(0.5) and e["se_am"] == pytest.approx(0.5)
    assert e["value_direct"] == pytest.approx(-0.5) and e["value_eq20"] == pytest.approx(0.5 / 0.8)
    assert e["se_eq20"] == pytest.approx(0.5 / 0.8)
    # both branches noisy: the errors add in quadrature, sqrt(0.25^2 + 1/12) and sqrt(0.25^2 + 0.25^2)
    e = value_estimates([1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], p=0.75)
    assert e["se_direct"] == pytest.approx(math.sqrt(0.0625 + 1 / 12)) and e["se_am"] == pytest.approx(math.sqrt(0.125))
    assert e["se_eq20"] == pytest.approx(math.sqrt(0.125) / 0.25) and e["value_am"] == 0.0 and e["value_direct"] == 0.25
    assert set(f"value_{x}" for x in ESTIMATORS) <= set(e) and set(f"se_{x}" for x in ESTIMATORS) <= set(e)


def test_eq20_blows_up_for_a_likely_token_and_direct_does_not():
    """The issue's token: p = 0.99989, avg0 = 1, avg1 = 23/24 ~ 0.958. Eq. 20
    divides the Monte Carlo difference and its error by 1 - p = 1.1e-4."""
    p, r0, r1, ra = 0.99989, [1.0] * 24, [1.0] * 23 + [0.0], [1.0] * 20 + [0.0] * 4
    e = value_estimates(r0, r1, ra, p)
    # float64: 1 - p and 1 - 23/24 cancel ~4 and ~1.4 digits (rel error ~1e-12); rel 1e-6 is slack (measured 5e-13)
    assert e["value_eq20"] == pytest.approx((1 / 24) / 1.1e-4, rel=1e-6) and e["value_eq20"] > 300
    assert e["se_eq20"] == pytest.approx(e["se_am"] / 1.1e-4, rel=1e-6) and e["se_eq20"] > 300
    assert e["value_direct"] == pytest.approx(4 / 24) and e["se_direct"] < 0.1
    assert e["value_am"] == pytest.approx(1 / 24)


def test_value_estimates_without_an_alternative_branch():
    for ra in ([], None):
        e = value_estimates([1.0, 1.0], [1.0, 0.0], ra, p=1.0)
        assert math.isnan(e["value_direct"]) and math.isnan(e["se_direct"]) and math.isnan(e["avg_alt"])
        assert math.isnan(e["value_eq20"]) and math.isnan(e["se_eq20"])  # 1 - p = 0
        assert e["value_am"] == 0.5


def test_estimator_gaps_on_the_same_tokens():
    recs = [  # the NaN / None token is dropped from every estimator's gap, not only from direct's
        {"kind": "boosted", "value_direct": 1.0, "value_eq20": 4.0, "value_am": 0.5},
        {"kind": "suppressed", "value_direct": 0.0, "value_eq20": -2.0, "value_am": 0.0},
        {"kind": "boosted", "value_direct": None, "value_eq20": float("nan"), "value_am": 0.25},
    ]
    g = estimator_gaps(recs, n_boot=0)
    assert g["n_common"] == 2 and g["undefined"] == {"direct": 1, "eq20": 1, "am": 0}
    assert {e: g["by_estimator"][e]["gap"] for e in ESTIMATORS} == {"direct": 1.0, "eq20": 6.0, "am": 0.5}
    assert all(g["by_estimator"][e]["n_boosted"] == 1 for e in ESTIMATORS)


def test_exclude_token_by_hand():
    # float32 inputs renormalised in float64: a few roundings (rel ~1e-7) against allclose's rtol 1e-5 / approx's rel 1e-6
    q, mass = exclude_token(torch.tensor([0.5, 0.3, 0.2]), 0)
    assert torch.allclose(q, torch.tensor([0.0, 0.6, 0.4])) and mass == pytest.approx(0.5)
    q, mass = exclude_token(torch.tensor([0.5, 0.3, 0.2]), 2)
    assert torch.allclose(q, torch.tensor([0.625, 0.375, 0.0])) and mass == pytest.approx(0.8)
    # under top_p: the truncated policy ([0.625, 0.375, 0, 0]) without o_t, renormalised
    nucleus = next_token_probs(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 1.0, top_p=0.7)
    assert torch.allclose(exclude_token(nucleus, 0)[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(exclude_token(nucleus, 2)[0], nucleus)  # o_t outside the nucleus: p = 0, nothing changes
    # nothing left: p = 1 (one-hot), or top_p keeps o_t alone
    assert exclude_token(torch.tensor([0.0, 1.0, 0.0]), 1) == (None, 0.0)
    only = next_token_probs(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), 1.0, top_p=0.4)
    assert exclude_token(only, 0) == (None, 0.0)
    # the rest's mass comes from the other entries, not from 1 - p (float32 rounds p = 1 - 1e-9 to 1)
    q, mass = exclude_token(torch.tensor([1.0, 1e-9, 3e-9]), 0)
    # float64 sum of float32(1e-9), float32(3e-9): off 4e-9 by their float32 rounding (rel <= 6e-8) < rel 1e-6
    assert mass == pytest.approx(4e-9, rel=1e-6) and torch.allclose(q, torch.tensor([0.0, 0.25, 0.75]))


def test_alternative_first_tokens_follow_the_renormalised_policy():
    probs = torch.tensor([0.5, 0.3, 0.2])
    torch.manual_seed(0)
    n = 20000
    f = sample_first_tokens(probs, 0, n, greedy=False)
    first = f["first"]
    assert first.shape == (3 * n,) and f["n_alt"] == n and f["alt_reason"] is None
    assert (first[:n] == 0).all()
    pol = torch.bincount(first[n : 2 * n], minlength=3).double() / n
    alt = torch.bincount(first[2 * n :], minlength=3).double() / n
    assert alt[0] == 0  # o_t never drawn in the alternative branch
    # statistical: n = 20000 draws, sd sqrt(0.6 * 0.4 / n) = 0.0035, so 0.015 is 4.3 sigma (fixed seed: deterministic)
    assert torch.allclose(alt, torch.tensor([0.0, 0.6, 0.4], dtype=torch.float64), atol=0.015)
    assert torch.allclose(pol, probs.double(), atol=0.015)
    # the s_t branch draws come first: the same seed gives the same s_t rows with or without the alternative branch
    torch.manual_seed(0)
    assert torch.equal(sample_first_tokens(probs, 0, n, greedy=False, alt=False)["first"], first[: 2 * n])
    g = sample_first_tokens(probs, 1, 2, greedy=True)
    assert g["first"].tolist() == [1, 1, 0, 0, 0, 0]
    g = sample_first_tokens(probs, 0, 2, greedy=True)  # greedy alternative: the best token other than o_t
    assert g["first"].tolist() == [0, 0, 0, 0, 1, 1]
    none = sample_first_tokens(torch.tensor([0.0, 1.0, 0.0]), 1, 3, greedy=False)
    assert none["first"].tolist() == [1] * 6 and none["n_alt"] == 0 and none["alt_reason"]


def test_value_gap_and_bootstrap():
    gap, lo, hi = value_gap([1.0, 0.5, 0.0], [0.0, 0.5], n_boot=2000, seed=1)
    assert gap == pytest.approx(0.5 - 0.25)
    assert lo <= gap <= hi and lo >= -0.5 and hi <= 1.0
    assert value_gap([1.0, 0.5, 0.0], [0.0, 0.5], n_boot=2000, seed=1) == (gap, lo, hi)
    assert value_gap([0.3, float("nan")], [0.1], n_boot=0) == pytest.approx((0.2, 0.2, 0.2))
    assert all(math.isnan(x) for x in value_gap([], [1.0]))
    # constant groups: zero-width interval
    assert value_gap([2.0] * 5, [1.0] * 4, n_boot=100) == (1.0, 1.0, 1.0)


def _rec(kind, value, entropy=0.0, **kw):
    return {"kind": kind, "value": value, "entropy": entropy, **kw}


def test_split_gap_and_entropy_subsets():
    recs = [_rec("boosted", 1.0, 9), _rec("suppressed", 0.0, 8), _rec("boosted", 0.0, 2), _rec("suppressed", 0.0, 1),
            _rec("boosted", None, 5), _rec("stable", 5.0, 7)]
    s = split_gap(recs, n_boot=0)
    assert (s["gap"], s["n_boosted"], s["n_suppressed"]) == (0.5, 2, 2)
    rows = entropy_topk_gaps(recs, ks=(40, 100), n_boot=0)
    # valued tokens by entropy: 9 (b, 1), 8 (s, 0), 7 (stable), 2 (b, 0), 1 (s, 0)
    assert rows[0]["n"] == 2 and rows[0]["gap"] == 1.0
    assert rows[1]["n"] == 5 and rows[1]["gap"] == 0.5


def test_entropy_cutoffs_by_hand():
    # [B, T] = [2, 4]; the padded cells hold entropies that would win if they counted
    ent = torch.tensor([[5.0, 4.0, 3.0, 99.0], [2.0, 1.0, 0.5, 50.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    # N = 6 response tokens, sorted 5 4 3 2 1 0.5; n_k = max(1, ceil(6 k / 100)) = 1, 3, 4, 6
    cut = entropy_cutoffs(ent, mask, ks=(10, 50, 60, 100))
    assert cut.tolist() == [5.0, 3.0, 2.0, 0.5]
    # a NaN entropy is dropped like padding
    nan_ent = ent.clone()
    nan_ent[1, 2] = float("nan")
    assert entropy_cutoffs(nan_ent, mask, ks=(100,)).tolist() == [1.0]
    # rank = 1 + number of batch tokens with a strictly higher entropy
    assert entropy_ranks([5.0, 3.0, 2.5, 0.5, 7.0], ent, mask).tolist() == [1, 3, 4, 6, 1]
    with pytest.raises(ValueError, match="shape"):
        entropy_cutoffs(ent, mask[:, :3])
    with pytest.raises(ValueError, match="percentage"):
        entropy_cutoffs(ent, mask, ks=(0,))
    with pytest.raises(ValueError, match="no response token"):
        entropy_cutoffs(ent, torch.zeros_like(mask))


def test_fig5b_cutoffs_come_from_the_whole_batch():
    """Fig. 5b sorts *all* tokens by entropy: the valued tokens at 6, 5, 2, 1 are
    the batch's ranks 4, 5, 8, 9 of 10 (10 padded columns hold entropies that
    must not count), so the batch's top 60% holds only the first two, while
    ranking the valued tokens among themselves would take three."""
    batch = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 30.0], [4.0, 3.0, 2.0, 1.0, 0.5, 30.0]])  # [B, T]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    recs = [_rec("boosted", 1.0, 6.0), _rec("suppressed", 0.0, 5.0), _rec("boosted", 0.0, 2.0), _rec("suppressed", 1.0, 1.0)]
    ks = (30, 60, 100)
    cut = entropy_cutoffs(batch, mask, ks)  # n_k = 3, 6, 10 -> 7, 4, 0.5
    assert cut.tolist() == [7.0, 4.0, 0.5]
    rows = entropy_topk_gaps(recs, ks, n_boot=0, cutoffs=cut)
    assert [r["n"] for r in rows] == [0, 2, 4]
    assert math.isnan(rows[0]["gap"])  # no valued token among the batch's top 30%
    assert rows[1]["gap"] == 1.0  # {6: boosted 1.0, 5: suppressed 0.0}
    assert rows[2]["gap"] == 0.0  # all four: 0.5 - 0.5
    assert {r["scope"] for r in rows} == {"batch"} and rows[1]["cutoff"] == 4.0
    # the per-sample ranking (older files without batch information) selects other tokens
    own = entropy_topk_gaps(recs, ks, n_boot=0)
    assert [r["n"] for r in own] == [2, 3, 4] and own[1]["gap"] == 0.5 and own[0]["scope"] == "valued"
    # records carrying their batch rank give the batch-wide subsets without the cut-offs (what the report reads)
    ranks = entropy_ranks([r["entropy"] for r in recs], batch, mask)
    assert ranks.tolist() == [4, 5, 8, 9]
    ranked = [dict(r, entropy_rank=int(q), entropy_tokens=10) for r, q in zip(recs, ranks)]
    strip = lambda rs: json.dumps([{k: v for k, v in r.items() if k != "cutoff"} for r in rs])  # noqa: E731  (NaN-safe)
    assert strip(entropy_topk_gaps(ranked, ks, n_boot=0)) == strip(rows)
    with pytest.raises(ValueError, match="cutoffs"):
        entropy_topk_gaps(recs, ks, cutoffs=cut[:2])


def test_batch_cutoffs_and_ranks_agree_with_ties():
    # ties at the cut-off all go in, under both rules
    batch = torch.tensor([3.0, 2.0, 2.0, 1.0, 2.0])
    mask = torch.ones(5)
    cut = entropy_cutoffs(batch, mask, ks=(40,))  # n_k = 2: the 2nd largest is 2.0
    recs = [_rec("boosted" if i % 2 else "suppressed", float(i), e) for i, e in enumerate(batch.tolist())]
    by_cut = entropy_topk_gaps(recs, (40,), n_boot=0, cutoffs=cut)[0]
    ranks = entropy_ranks(batch.tolist(), batch, mask)
    assert ranks.tolist() == [1, 2, 2, 5, 2]
    by_rank = entropy_topk_gaps([dict(r, entropy_rank=int(q), entropy_tokens=5) for r, q in zip(recs, ranks)], (40,), n_boot=0)[0]
    assert by_cut["n"] == by_rank["n"] == 4 and by_cut["gap"] == by_rank["gap"]


def test_repeat_gaps_relabels_by_cumulative_delta():
    recs = [_rec("boosted", 1.0, delta_repeat=[0.1, 0.2]), _rec("suppressed", 0.0, delta_repeat=[-0.1, 0.3]),
            _rec("suppressed", 0.5, delta_repeat=[-0.2, -0.4])]
    g = repeat_gaps(recs)
    assert [r["update"] for r in g] == [1, 2]
    # exact: float64 means of 0, 0.5, 1 (approx's default is slack; approx(0.0) allows only 1e-12)
    assert g[0]["gap"] == pytest.approx(1.0 - 0.25)  # boosted {1.0}, suppressed {0.0, 0.5}
    assert g[1]["gap"] == pytest.approx(0.5 - 0.5)  # boosted {1.0, 0.0}, suppressed {0.5}
    assert repeat_gaps([_rec("boosted", 1.0)]) == []


def test_select_tokens_balanced_and_interleaved():
    #           pos rows: 3 boosted, 2 suppressed, 1 stable; neg rows: 1 boosted, 4 suppressed; A = 0: ignored
    delta = [0.1, 0.2, 0.3, -0.1, -0.2, 0.0, 0.5, -0.1, -0.2, -0.3, -0.4, 0.9, -0.9]
    adv = [1.0] * 6 + [-1.0] * 5 + [0.0, 0.0]
    picks = select_tokens(delta, adv, n_tokens=16, seed=0)
    cells = [(k, s) for _, k, s in picks]
    assert cells.count(("boosted", "pos")) == cells.count(("suppressed", "pos")) == 2
    assert cells.count(("boosted", "neg")) == cells.count(("suppressed", "neg")) == 1
    assert cells[:4] == [("boosted", "pos"), ("suppressed", "pos"), ("boosted", "neg"), ("suppressed", "neg")]
    for i, k, s in picks:
        assert (delta[i] > 0) == (k == "boosted") and (adv[i] > 0) == (s == "pos")
    assert select_tokens(delta, adv, 16, seed=0) == picks
    assert len(select_tokens(delta, adv, n_tokens=4, seed=0)) == 4


def test_next_token_probs_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # float32 softmax of float32 logs: a few ulps (<= 6e-8 measured) against allclose's default rtol 1e-5
    assert torch.allclose(next_token_probs(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(next_token_probs(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.equal(next_token_probs(logits, 0.0), torch.tensor([1.0, 0.0, 0.0, 0.0]))


# ----------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny():
    from tokencredit.model.tiny import build_tiny

    return build_tiny(seed=0)


def _prefix(tok, text="<|im_start|>user\nSay 7<|im_end|>\n<|im_start|>assistant\nIt is"):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def test_shared_cache_matches_unshared_paths(tiny):
    model, tok = tiny
    prefix = _prefix(tok)
    o_t = tok.convert_tokens_to_ids(" ")
    kw = dict(max_new_tokens=6, temperature=0.0, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, return_logits=True)
    res = {m: branch_continuations(model, prefix, o_t, 3, mode=m, **kw) for m in ("shared", "batched", "sequential")}
    assert res["shared"]["tokens"] == res["batched"]["tokens"] == res["sequential"]["tokens"]
    assert len(res["shared"]["tokens"]) == 9 and res["shared"]["n_alt"] == 3  # 3M rows: o_t, s_t, s_t without o_t
    assert all(len(t) == 6 for t in res["shared"]["tokens"])
    assert res["shared"]["tokens"][0][0] == o_t
    # first generate step with the shared cache == a plain forward over the whole (R, L+1) input, no cache
    first = torch.tensor([t[0] for t in res["shared"]["tokens"]])
    assert o_t not in first[6:].tolist()
    ids = torch.cat([prefix.expand(9, -1), first[:, None]], 1)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits[:, -1]  # [R, V]
    # float32 path difference: cached prefix + one step vs a full no-cache pass; |z| <= 0.7, measured <= 6e-8
    torch.testing.assert_close(res["shared"]["first_logits"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res["batched"]["first_logits"], ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        p_ref = torch.softmax(model(input_ids=prefix[None]).logits[0, -1], -1)[o_t]
    probs1 = next_token_probs(model(input_ids=prefix[None]).logits[0, -1].detach(), 1.0)
    assert probs1[o_t].item() == pytest.approx(p_ref.item(), rel=1e-5)  # float32 softmax of the same logits: ~u apart


def test_modes_agree_with_the_alternative_branch(tiny):
    """shared == batched == sequential with the third branch: greedy, whole
    continuations; sampled, the 3M first tokens (drawn before any generate
    call) under the same seed, and shared == batched whole continuations."""
    model, tok = tiny
    prefix = _prefix(tok, "<|im_start|>user\nSay 3<|im_end|>\n<|im_start|>assistant\nSure")
    with torch.no_grad():
        probs = next_token_probs(model(input_ids=prefix[None]).logits[0, -1], 1.0)
    o_t = int(probs.argmax())  # the likeliest token: the alternative branch differs most from the s_t branch
    base = dict(eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    greedy = {m: branch_continuations(model, prefix, int(probs.argsort()[-2]), 4, max_new_tokens=5, temperature=0.0, mode=m, **base)
              for m in ("shared", "batched", "sequential")}
    assert greedy["shared"]["tokens"] == greedy["batched"]["tokens"] == greedy["sequential"]["tokens"]
    assert len(greedy["shared"]["tokens"]) == 12
    sampled = {}
    for m in ("shared", "batched", "sequential"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            sampled[m] = branch_continuations(model, prefix, o_t, 5, max_new_tokens=4, temperature=1.0, mode=m, **base)
    firsts = {m: [t[0] for t in r["tokens"]] for m, r in sampled.items()}
    assert firsts["shared"] == firsts["batched"] == firsts["sequential"] and len(firsts["shared"]) == 15
    assert sampled["shared"]["tokens"] == sampled["batched"]["tokens"]
    # alt_mass (float64 sum of the other float32 probs) - (1 - p) is the float32 softmax normaliser's relative error over
    # V=101 terms: worst ~V u = 6e-6, so abs 1e-5 (1e-6 was ~16 u, the worst case of an 8-lane sum; measured 6e-8)
    assert all(r["alt_mass"] == pytest.approx(1 - r["p"], abs=1e-5) for r in sampled.values())
    assert o_t not in firsts["shared"][10:]


def test_alternative_branch_never_starts_with_o_t(tiny):
    """o_t = the argmax at a low temperature (p = 0.998 on the tiny model, the
    regime where Eq. 20 divides by 1 - p ~ 2e-3): the s_t branch draws it
    almost always, the alternative branch never; its first tokens follow the
    policy renormalised without o_t."""
    model, tok = tiny
    prefix = _prefix(tok)
    with torch.no_grad():
        logits = model(input_ids=prefix[None]).logits[0, -1]
    temp = 0.05
    probs = next_token_probs(logits, temp)
    o_t = int(probs.argmax())
    assert 0.99 < probs[o_t] < 1.0, "pick another temperature: o_t should be likely, with some mass left, for this test to bite"
    M = 3000
    torch.manual_seed(5)
    r = branch_continuations(model, prefix, o_t, M, max_new_tokens=1, temperature=temp,
                             eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    first = torch.tensor([t[0] for t in r["tokens"]])  # [3M]
    pol, alt = first[M : 2 * M], first[2 * M :]
    assert (pol == o_t).float().mean() > 0.98 and not (alt == o_t).any()
    # exact: the renormalised policy without o_t; empirical: within ~4 sigma of it per token
    expect = probs.clone().double()
    expect[o_t] = 0
    expect /= expect.sum()
    # float32 logits by another pass (~1e-7 apart), amplified 20x by T = 0.05, renormalised: measured <= 1.4e-8 on <= 0.39
    torch.testing.assert_close(r["alt_probs"].double(), expect, atol=1e-6, rtol=1e-5)
    freq = torch.bincount(alt, minlength=expect.numel()).double() / M
    # statistical: 4 binomial sigmas per token, + 1e-3 for tokens whose expected count is ~0 (fixed seed)
    assert ((freq - expect).abs() <= 4 * (expect * (1 - expect) / M).sqrt() + 1e-3).all()
    # under top_p the same truncated distribution as p's, without o_t
    torch.manual_seed(6)
    r = branch_continuations(model, prefix, o_t, M, max_new_tokens=1, temperature=1.0, top_p=0.5,
                             eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    nucleus = next_token_probs(logits, 1.0, top_p=0.5)
    alt = torch.tensor([t[0] for t in r["tokens"][2 * M :]])
    assert r["n_alt"] == M and 0 < (nucleus > 0).sum() < nucleus.numel()  # a real truncation, with tokens other than o_t
    assert not (alt == o_t).any() and (nucleus[alt] > 0).all()
    expect = nucleus.clone().double()
    expect[o_t] = 0
    torch.testing.assert_close(r["alt_probs"].double(), expect / expect.sum(), atol=1e-6, rtol=1e-5)  # as above


def test_p_one_gives_nan_not_a_crash(tiny):
    """No alternative token (greedy with o_t the argmax, or top_p keeping o_t
    alone): value_direct is NaN with a reason, Eq. 20 NaN, A_M defined; the
    gap functions drop the token."""
    from tokencredit.rewards import MathVerifier

    model, tok = tiny
    prompt = tok("<|im_start|>user\nSay 7<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    resp = tok("It is 7", add_special_tokens=False)["input_ids"]
    t = 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + resp[:t]])).logits[0, -1]
    resp = resp[:t] + [int(logits.argmax())] + resp[t + 1 :]  # o_t = the greedy token: p = 1 at temperature 0
    tiny_p = 1e-4  # top_p so small that the nucleus is the argmax alone
    with MathVerifier(timeout_s=1) as ver:
        outs = [token_values(model, tok, [prompt], [resp], [t], ["7"], 3, ver, max_new_tokens=len(resp) + 1, **kw)[0]
                for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=tiny_p, seed=2))]
    for res in outs:
        assert res["p"] == 1.0 and res["alt_mass"] == 0.0 and "no alternative" in res["alt_reason"]
        assert res["rewards_alt"] == [] and math.isnan(res["avg_alt"]) and math.isnan(res["len_alt"])
        assert math.isnan(res["value_direct"]) and math.isnan(res["se_direct"]) and math.isnan(res["value"])
        assert math.isnan(res["value_eq20"]) and res["value_am"] == res["avg0"] - res["avg1"] == 0.0
        assert res["estimator"] == "direct" and len(res["rewards0"]) == len(res["rewards1"]) == 3
    recs = [dict(outs[0], kind="boosted"), {"kind": "boosted", "value": 0.5, "value_direct": 0.5, "value_eq20": 1.0, "value_am": 0.2},
            {"kind": "suppressed", "value": 0.1, "value_direct": 0.1, "value_eq20": 0.3, "value_am": 0.0}]
    assert split_gap(recs, n_boot=10)["n_boosted"] == 1
    assert estimator_gaps(recs, n_boot=10)["n_common"] == 2


def test_shared_sampling_stops_at_eos_and_budget(tiny):
    model, tok = tiny
    prefix = _prefix(tok)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    r = branch_continuations(model, prefix, eos, 4, max_new_tokens=5, temperature=1.0, eos_ids=[eos], pad_id=tok.pad_token_id)
    assert r["tokens"][:4] == [[eos]] * 4  # forced EOS: the branch-0 responses end at once
    for t in r["tokens"][4:]:
        assert 1 <= len(t) <= 5 and (eos not in t[:-1])
    one = branch_continuations(model, prefix, 5, 2, max_new_tokens=1, temperature=1.0, eos_ids=[eos], pad_id=tok.pad_token_id)
    assert all(len(t) == 1 for t in one["tokens"])


def test_token_value_on_a_toy_task_with_the_verifier(tiny):
    """Last position, forced token '7', answer 7: every s_t + o_t continuation is
    correct (avg0 = 1); from s_t only a sampled '7' is. Greedy: value = 1 - 0."""
    from tokencredit.rewards import MathVerifier

    model, tok = tiny
    prompt = tok("<|im_start|>user\nSay 7<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    resp = tok("It is 7", add_special_tokens=False)["input_ids"]
    t = len(resp) - 1
    with MathVerifier(timeout_s=1) as ver:
        greedy = token_values(model, tok, [prompt], [resp], [t], ["7"], 4, ver, max_new_tokens=len(resp), temperature=0.0)[0]
        sampled = token_values(model, tok, [prompt], [resp], [t], ["7"], 8, ver, max_new_tokens=len(resp), temperature=1.0, seed=3)[0]
        again = token_values(model, tok, [prompt], [resp], [t], ["7"], 8, ver, max_new_tokens=len(resp), temperature=1.0, seed=3)[0]
        am = token_values(model, tok, [prompt], [resp], [t], ["7"], 8, ver, max_new_tokens=len(resp), temperature=1.0, seed=3,
                          estimator="am")[0]
        with pytest.raises(ValueError, match="estimator"):
            token_values(model, tok, [prompt], [resp], [t], ["7"], 2, ver, max_new_tokens=len(resp), estimator="eq21")
    assert greedy["avg0"] == 1.0 and greedy["rewards0"] == [1.0] * 4
    assert greedy["p"] in (0.0, 1.0)
    if greedy["p"] == 0.0:  # the random model's argmax is not '7'
        assert greedy["avg1"] == 0.0 and greedy["value"] == 1.0
    with torch.no_grad():
        p_ref = torch.softmax(model(input_ids=torch.tensor([prompt + resp[:t]])).logits[0, -1], -1)[resp[t]].item()
    # float32 path difference in the logits (~1e-7) moves p by ~1e-7 relative; rel 1e-5 has margin
    assert sampled["p"] == pytest.approx(p_ref, rel=1e-5)
    assert sampled["avg0"] == 1.0
    # float64 on the record's averages; its p and p_ref differ ~1e-7 relative, moving 1 / (1 - p) far less than rel 1e-6
    assert sampled["value_eq20"] == pytest.approx((1.0 - sampled["avg1"]) / (1.0 - p_ref))
    assert sampled["value_am"] == pytest.approx(1.0 - sampled["avg1"])
    # direct (the default): Q(s, '7') - Q_-'7'(s) from the third branch, whose first token is never '7'
    assert sampled["estimator"] == "direct" and len(sampled["rewards_alt"]) == 8 and sampled["alt_reason"] is None
    assert sampled["value"] == sampled["value_direct"] == pytest.approx(1.0 - sampled["avg_alt"])
    assert sampled["value_direct"] == pytest.approx(1.0 - sum(sampled["rewards_alt"]) / 8)
    assert sampled["alt_mass"] == pytest.approx(1.0 - p_ref, abs=1e-5)  # float32 softmax normaliser, as in test_modes_agree
    assert again["rewards1"] == sampled["rewards1"] and again["rewards_alt"] == sampled["rewards_alt"]  # per-token seed
    if greedy["p"] == 0.0:
        assert greedy["value_direct"] == greedy["value_eq20"] == greedy["value_am"] == 1.0
    assert am["value"] == am["value_am"] and am["value_se"] == am["se_am"]
    assert {k: am[k] for k in ("rewards0", "rewards1", "rewards_alt")} == {k: sampled[k] for k in ("rewards0", "rewards1", "rewards_alt")}


# ----------------------------------------------------------------- the probe on a run directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory without training: config + flip_step_1.parquet from a real
    rollout of the initial tiny model, so the probe's model is exact (step 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokencredit.config import dump_config, load_config
    from tokencredit.model import forward_tokens, load_model
    from tokencredit.probes.flip import flip_records
    from tokencredit.data.promptset import build_prompt_set
    from tokencredit.rollout.hf import generate_hf

    d = tmp_path_factory.mktemp("valuerun")
    data = d / "digits.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say the digit {i}.", "answer": str(i)}) for i in range(10)) + "\n")
    cfg = load_config(None, [f"data.train={data}", "model.name=tiny-random", "rollout.prompts_per_step=2", "rollout.n=4",
                             "rollout.max_new_tokens=5", "train.lr=0.01", "output.root=" + str(d)])
    (d / "config.yaml").write_text(dump_config(cfg))
    model, tok = load_model("tiny-random")
    ps = build_prompt_set(cfg, tok)
    idx = ps.indices(0, cfg.rollout.prompts_per_step)  # the first rollout step's prompts, as the trainer draws them
    prompts, answers = [ps.prompts[i] for i in idx], [ps.answers[i] for i in idx]
    torch.manual_seed(0)
    b = generate_hf(model, tok, prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=5, answers=answers)
    b.advantage = torch.tensor([1.0, -1.0] * 4)
    with torch.no_grad():
        lp = forward_tokens(model, b, with_entropy=True)
    delta = torch.randn(lp["logprob"].shape, generator=torch.Generator().manual_seed(0)) * b.response_mask
    pidx = torch.tensor(idx).repeat_interleave(4)  # as the trainer records it
    rec = flip_records(delta, b.advantage, b.response_mask, b.response_ids, lp["entropy"], lp["logprob"], 1,
                       group_id=b.group_id, prompt_index=pidx)
    (d / "probes").mkdir()
    pq.write_table(pa.table(rec), d / "probes" / "flip_step_1.parquet")
    return d


def test_probe_writes_resumes_and_matches_old_prob(run_dir):
    import pyarrow.parquet as pq

    from tokencredit.probes.value import run_value_probe
    from tokencredit.rundir import read_jsonl

    out = run_dir / "probes" / "value_step_1.jsonl"
    res = run_value_probe(run_dir, 1, n_tokens=4, M=2, repeat=2, progress=False)
    assert res["written"] == 4 and res["skipped"] == 0
    assert res["checkpoint"].startswith("initial model")
    full = read_jsonl(out)
    assert len(full) == 4
    assert sum(r["kind"] == "boosted" for r in full) == 2
    assert {r["sign"] for r in full} == {"pos", "neg"}
    flip = pq.read_table(run_dir / "probes" / "flip_step_1.parquet").to_pydict()
    ent = torch.tensor(flip["entropy"], dtype=torch.float64)  # every response token of the batch
    ks = (20, 40, 60, 80, 100)
    assert res["entropy_cutoffs"] == dict(zip(ks, entropy_cutoffs(ent, torch.ones_like(ent), ks).tolist()))
    assert {r["scope"] for r in res["entropy_topk"]} == {"batch"}
    for r in full:
        assert r["entropy_tokens"] == ent.numel() and r["entropy_rank"] == 1 + int((ent > r["entropy"]).sum())
        # right prompt, right model: float32 path difference, p <= 1 off by ~p * 1e-6 (measured <= 4e-9)
        assert r["p"] == pytest.approx(r["old_prob"], abs=1e-5)
        assert len(r["delta_repeat"]) == 2 and r["checkpoint_exact"] is True
        # float64 arithmetic on the record's own numbers (equal here); approx's default rel 1e-6 is slack
        assert r["value_eq20"] is None or r["value_eq20"] == pytest.approx((r["avg0"] - r["avg1"]) / (1 - r["p"]))
        assert r["value_am"] == pytest.approx(r["avg0"] - r["avg1"])
        assert r["estimator"] == "direct" and r["value"] == r["value_direct"] and r["value_se"] == r["se_direct"]
        assert r["value_direct"] == pytest.approx(r["avg0"] - r["avg_alt"]) and len(r["rewards_alt"]) == 2
        assert r["se_direct"] == pytest.approx(math.hypot(r["se0"], r["se_alt"]))
    assert res["M"] == 2 and res["estimator"] == "direct"
    assert set(res["by_estimator"]) == set(ESTIMATORS) and res["n_common"] == sum(
        all(r[f"value_{e}"] is not None for e in ESTIMATORS) for r in full)
    assert res["by_estimator"]["direct"]["n_boosted"] == res["by_estimator"]["eq20"]["n_boosted"]  # the same tokens
    # resuming with another estimator would mix two meanings of "value" in one file: refused
    with pytest.raises(ValueError, match="estimator=direct"):
        run_value_probe(run_dir, 1, n_tokens=4, M=2, repeat=2, progress=False, estimator="eq20")
    # interrupted run: 2 complete lines and a torn one
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    res2 = run_value_probe(run_dir, 1, n_tokens=4, M=2, repeat=2, progress=False)
    assert (res2["written"], res2["skipped"]) == (2, 2)
    again = read_jsonl(out)
    strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, again))) == sorted(map(json.dumps, map(strip, full)))


def test_cli_errors(run_dir, capsys):
    import argparse

    from tokencredit.probes.value import add_cli

    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    a = ap.parse_args(["value", "--run", str(run_dir), "--step", "1", "--tokens", "4", "--M", "3", "--no-progress"])
    assert a.func(a) == 2 and "M=2" in capsys.readouterr().err
    a = ap.parse_args(["value", "--run", str(run_dir), "--step", "9"])
    with pytest.raises(FileNotFoundError, match="flip_step_9"):
        a.func(a)
    assert ap.parse_args(["value", "--run", "r", "--step", "1"]).estimator == "direct"
    with pytest.raises(SystemExit):
        ap.parse_args(["value", "--run", "r", "--step", "1", "--estimator", "eq21"])
    capsys.readouterr()
    # a file written before the alternative branch (value = Eq. 20, no value_direct) is not resumed into
    old = run_dir / "probes" / "value_old.jsonl"
    old.write_text(json.dumps({"row": 0, "position": 0, "M": 2, "seed": 0, "value": 1.0, "kind": "boosted"}) + "\n")
    a = ap.parse_args(["value", "--run", str(run_dir), "--step", "1", "--M", "2", "--out", str(old), "--no-progress"])
    assert a.func(a) == 2 and "value_direct" in capsys.readouterr().err


def test_cli_estimator_option_and_summary(run_dir, tmp_path, capsys):
    import argparse

    from tokencredit.probes.value import add_cli
    from tokencredit.rundir import read_jsonl

    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    out = tmp_path / "value_eq20.jsonl"
    a = ap.parse_args(["value", "--run", str(run_dir), "--step", "1", "--tokens", "4", "--M", "2", "--estimator", "eq20",
                       "--out", str(out), "--no-progress"])
    assert a.func(a) == 0
    text = capsys.readouterr().out
    assert "M = 2 continuations per branch" in text and "estimator: eq20" in text
    for e in ESTIMATORS:
        assert f"    {e} " in text  # one gap line per estimator, on the same tokens
    recs = read_jsonl(out)
    assert len(recs) == 4 and all(r["estimator"] == "eq20" and r["value"] == r["value_eq20"] for r in recs)


def test_flip_file_without_prompt_index_is_refused(run_dir, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from tokencredit.probes.value import run_value_probe

    # records without prompt_index (older trainer): one clear error naming the file, before any model work
    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("value_*"))
    t = pq.read_table(d / "probes" / "flip_step_1.parquet").drop(["prompt_index"])
    pq.write_table(t, d / "probes" / "flip_step_1.parquet")
    with pytest.raises(ValueError, match="prompt_index") as e:
        run_value_probe(d, 1, n_tokens=4, M=2, progress=False)
    assert "flip_step_1.parquet" in str(e.value) and "probes.flip.save_tokens=true" in str(e.value)
    assert not (d / "probes" / "value_step_1.jsonl").exists()


def test_probe_scores_with_the_runs_reward_functions(run_dir, tmp_path):
    """The value probe calls the run's reward.functions as the trainer does (questions included), not
    math-verify alone: a reward that reads the question gives every continuation 0.25."""
    import shutil

    from tokencredit.config import dump_config, load_config
    from tokencredit.probes.value import run_value_probe
    from tokencredit.rundir import read_jsonl

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    (d / "probes" / "value_step_1.jsonl").unlink(missing_ok=True)
    rew = tmp_path / "rew.py"
    rew.write_text("def reward(responses, answers, prompts, **kw):\n"
                   "    return [0.25 if 'digit' in p else 0.0 for p in prompts]\n")
    cfg = load_config(d / "config.yaml", [f"reward.functions=[{rew}:reward]"])
    (d / "config.yaml").write_text(dump_config(cfg))
    run_value_probe(d, 1, n_tokens=4, M=2, progress=False)
    recs = read_jsonl(d / "probes" / "value_step_1.jsonl")
    assert len(recs) == 4
    for r in recs:
        assert r["rewards0"] == r["rewards1"] == [0.25, 0.25] and r["value_direct"] in (0.0, None)
