"""Planners, minibatch_metrics and RewardBalancedBuffer (cancellation-hypothesis Sec. 4)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencredit.batch import RolloutBatch
from tokencredit.batching import (
    PLANNERS,
    RewardBalancedBuffer,
    advantage_sign,
    balance_need,
    minibatch_metrics,
    select_balanced,
)

ALL = ["random", "token_balanced", "query_preserved", "sign_split"]
FAST = settings(max_examples=40, deadline=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_sets(mbs):
    return {frozenset(mb) for mb in mbs}


def plan(name, gid, adv, length, rpm, seed=0):
    return PLANNERS.get(name)(
        torch.tensor(gid, dtype=torch.long), torch.tensor(adv, dtype=torch.float32),
        torch.tensor(length, dtype=torch.long), rpm, gen(seed),
    )


@st.composite
def planner_inputs(draw, max_group=4):
    sizes = draw(st.lists(st.integers(1, max_group), min_size=0, max_size=10))
    gid = [g for g, s in enumerate(sizes) for _ in range(s)]
    B = len(gid)
    adv = draw(st.lists(st.sampled_from([-1.5, -1.0, 0.0, 0.5, 1.0]), min_size=B, max_size=B))
    length = draw(st.lists(st.integers(1, 60), min_size=B, max_size=B))
    rpm = draw(st.integers(max_group, 12))
    return gid, adv, length, rpm, draw(st.integers(0, 2**16))


# ------------------------------------------------------------------ planners
def test_registry_and_empty_input():
    assert set(ALL) <= set(PLANNERS.names())
    for name in ALL:
        assert plan(name, [], [], [], 4) == []
    with pytest.raises(KeyError, match="valid: "):
        PLANNERS.get("nope")


@FAST
@given(planner_inputs())
def test_every_row_exactly_once(inp):
    gid, adv, length, rpm, seed = inp
    for name in ALL:
        mbs = plan(name, gid, adv, length, rpm, seed)
        assert sorted(i for mb in mbs for i in mb) == list(range(len(gid))), name
        assert all(mb for mb in mbs), name


@FAST
@given(planner_inputs())
def test_token_balanced_sizes_and_token_bound(inp):
    gid, adv, length, rpm, seed = inp
    mbs = plan("token_balanced", gid, adv, length, rpm, seed)
    B = len(gid)
    if B == 0:
        return
    k = math.ceil(B / rpm)
    assert len(mbs) == k
    sizes = [len(mb) for mb in mbs]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= rpm
    sums = [sum(length[i] for i in mb) for mb in mbs]
    # proven bound (plan_token_balanced docstring)
    bound = max(length) - min(length) if B % k == 0 else max(length)
    assert max(sums) - min(sums) <= bound


@FAST
@given(planner_inputs())
def test_query_preserved_keeps_groups_whole(inp):
    gid, adv, length, rpm, seed = inp
    mbs = plan("query_preserved", gid, adv, length, rpm, seed)
    where = {}
    for b, mb in enumerate(mbs):
        assert len(mb) <= rpm
        for i in mb:
            where.setdefault(gid[i], set()).add(b)
    assert all(len(s) == 1 for s in where.values())


@FAST
@given(st.integers(1, 4), st.integers(0, 12), st.integers(1, 4), st.integers(0, 2**16))
def test_query_preserved_equal_groups_use_ceil_b_over_rpm_steps(G, n_groups, mult, seed):
    rpm = G * mult
    gid = [g for g in range(n_groups) for _ in range(G)]
    length = [(7 * i) % 13 + 1 for i in range(len(gid))]
    mbs = plan("query_preserved", gid, [1.0] * len(gid), length, rpm, seed)
    assert len(mbs) == math.ceil(len(gid) / rpm)
    assert all(len(mb) <= rpm and len(mb) % G == 0 for mb in mbs)
    m = minibatch_metrics(torch.tensor(gid), torch.ones(len(gid)), mbs)
    assert m["groups_split"] == 0


@FAST
@given(planner_inputs(max_group=4))
def test_sign_split_never_mixes_signs(inp):
    gid, adv, length, rpm, seed = inp
    for mb in plan("sign_split", gid, adv, length, rpm, seed):
        signs = {1 if adv[i] > 0 else -1 for i in mb if adv[i] != 0}
        assert len(signs) <= 1
        assert len(mb) <= rpm


def test_token_balanced_hand_case():
    # lengths sorted: 9(r0) 6(r2) | 5(r4) 3(r3) | 2(r5) 1(r1); k = 2
    # wave 1: r0 -> P0 (9), r2 -> P1 (6); wave 2: r4 -> P1 (11), r3 -> P0 (12);
    # wave 3: r5 -> P1 (13), r1 -> P0 (13)
    mbs = plan("token_balanced", [0, 0, 1, 1, 2, 2], [0.0] * 6, [9, 1, 6, 3, 5, 2], 3)
    assert as_sets(mbs) == {frozenset({0, 1, 3}), frozenset({2, 4, 5})}


def test_query_preserved_hand_cases():
    # group tokens: g0 10, g1 2, g2 8, g3 6; rpm 4 -> k 2, two groups per step.
    # g0 -> A(10); g2 -> B(8); g3 -> B(14, now full); g1 -> A(12)
    gid = [0, 0, 1, 1, 2, 2, 3, 3]
    mbs = plan("query_preserved", gid, [1, -1] * 4, [5, 5, 1, 1, 4, 4, 3, 3], 4)
    assert as_sets(mbs) == {frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7})}
    # unequal groups 3, 3, 2 with rpm 4: k = 2 but the 2-row group fits nowhere -> a third step
    mbs = plan("query_preserved", [0, 0, 0, 1, 1, 1, 2, 2], [0.0] * 8, [1] * 8, 4)
    assert as_sets(mbs) == {frozenset({0, 1, 2}), frozenset({3, 4, 5}), frozenset({6, 7})}
    with pytest.raises(ValueError, match=r"group 7 has 5 rows but rows_per_minibatch=4"):
        plan("query_preserved", [7] * 5, [0.0] * 5, [1] * 5, 4)


def test_sign_split_hand_case():
    # pos {0, 3}, neg {1, 4, 5}, zero {2} joins the smaller (positive) side
    mbs = plan("sign_split", [0] * 6, [1, -1, 0, 2, -2, -3], [1] * 6, 3)
    assert as_sets(mbs) == {frozenset({0, 2, 3}), frozenset({1, 4, 5})}
    mbs = plan("sign_split", [0] * 6, [1, -1, 0, 2, -2, -3], [1] * 6, 2)
    assert len(mbs) == 4 and sorted(len(mb) for mb in mbs) == [1, 1, 2, 2]


def test_minibatch_metrics_hand_case():
    gid = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.5, -0.5, -0.5, -0.5])
    m = minibatch_metrics(gid, adv, [[0, 1, 4, 5], [2, 3, 6, 7]])
    # step 0: g0 1-1 = 0, g1 1.5-0.5 = 1.0; step 1: g0 -1+1 = 0, g1 -1.0
    assert m == {
        "mb_count": 2.0, "mb_max_abs_group_adv_sum": 1.0,
        "mb_n_pos_mean": 1.5, "mb_n_pos_min": 1.0, "mb_n_neg_mean": 2.5, "mb_n_neg_min": 2.0,
        "mb_min_balance": 0.25, "groups_split": 2.0,
    }
    assert minibatch_metrics(gid, adv, [[0, 3, 4, 5], [1, 2, 6, 7]])["mb_max_abs_group_adv_sum"] == 2.0
    qb = minibatch_metrics(gid, adv, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert qb["mb_max_abs_group_adv_sum"] == 0.0 and qb["groups_split"] == 0.0
    assert minibatch_metrics(gid[:0], adv[:0], [])["mb_count"] == 0.0


def test_query_preserved_zeroes_local_group_sums_with_grpo_advantages():
    torch.manual_seed(0)
    G, n = 8, 16
    gid = torch.arange(n).repeat_interleave(G)
    r = (torch.rand(n * G) < 0.4).float()
    mean = r.view(n, G).mean(1, keepdim=True)
    std = r.view(n, G).std(1, keepdim=True)
    adv = ((r.view(n, G) - mean) / (std + 1e-6)).view(-1)
    length = torch.randint(1, 100, (n * G,))
    qb = minibatch_metrics(gid, adv, PLANNERS.get("query_preserved")(gid, adv, length, 32, gen()))
    rnd = minibatch_metrics(gid, adv, PLANNERS.get("random")(gid, adv, length, 32, gen()))
    # float32 GRPO advantages (|A| <= 2.5) of whole groups of 8: rounding of A and of the float32 group mean, ~3e-6 at worst
    assert qb["mb_max_abs_group_adv_sum"] < 1e-5 and qb["groups_split"] == 0
    assert rnd["mb_max_abs_group_adv_sum"] > 0.5 and rnd["groups_split"] > 0


# ------------------------------------------------------------------ RB selection
def test_balance_need_float_slack():
    assert balance_need(10, 0.3) == 3 and balance_need(8, 0.5) == 4 and balance_need(5, 0.5) == 3


def test_select_balanced_hand_cases():
    # rows: + + + + - - (ages 3 2 1 0 0 1), at most 4 rows, tau .5: 2 youngest + and both -
    pos, neg, age = [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1], [3, 2, 1, 0, 0, 1]
    assert select_balanced(pos, neg, age, 4, 0.5) == [2, 3, 4, 5]
    # room for 6 rows but only 2 negatives: 4 rows is the largest set with N+ = N-
    assert select_balanced(pos, neg, age, 6, 0.5) == [2, 3, 4, 5]
    # tau .25 on 6 rows: 4+/2- is balanced (need 2 of each) -> everything
    assert select_balanced(pos, neg, age, 6, 0.25) == [0, 1, 2, 3, 4, 5]
    # odd limit at tau .5 -> the largest even set
    assert select_balanced(pos, neg, age, 5, 0.5) == [2, 3, 4, 5]
    assert select_balanced([1, 1], [0, 0], [0, 0], 2, 0.25) == []  # no negatives at all
    assert select_balanced([1, 1], [0, 0], [0, 1], 2, 0.0) == [0, 1]  # tau 0: anything goes
    # groups (pos, neg): fresh 1/7 and 7/1 balance each other; old 4/4 waits for room
    assert select_balanced([1, 7, 4], [7, 1, 4], [0, 0, 1], 16, 0.5) == [0, 1]
    assert select_balanced([1, 7, 4], [7, 1, 4], [0, 0, 1], 24, 0.5) == [0, 1, 2]
    # the embedded default's case: fresh groups 1/7, 1/7, 2/6, 1/7 at tau .25 (need 8 of 32)
    # -> 2/6 + 1/7 is 3+ of 16 (needs 4), so the largest balanced subset is 2/6 alone
    assert select_balanced([1, 1, 2, 1], [7, 7, 6, 7], [0, 0, 0, 0], 32, 0.25) == [2]
    # an old 6/2 group repairs it: 1+1+2+1+6 = 11+/29- of 40 > 32 rows; best <= 32 rows:
    # 6/2 + 2/6 + 1/7 + 1/7 = 10+/22- (need 8) with total age 8 * 2 = 16
    assert select_balanced([1, 1, 2, 1, 6], [7, 7, 6, 7, 2], [0, 0, 0, 0, 2], 32, 0.25) == [0, 1, 2, 4]


def _brute_force(pos, neg, age, max_rows, tau):
    """(|B|, total age) of the best set over all 2^U subsets."""
    import itertools

    best = (0, 0)
    for r in range(1, len(pos) + 1):
        for sub in itertools.combinations(range(len(pos)), r):
            P, N = sum(pos[u] for u in sub), sum(neg[u] for u in sub)
            m = P + N
            if 1 <= m <= max_rows and min(P, N) >= balance_need(m, tau):
                key = (m, -sum((pos[u] + neg[u]) * age[u] for u in sub))
                best = max(best, key)
    return best[0], -best[1]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=8),
    st.integers(1, 24), st.sampled_from([0.0, 0.25, 1 / 3, 0.4, 0.5]),
)
def test_select_balanced_is_optimal_against_brute_force(units, max_rows, tau):
    """No balanced set of whole units within the size limit is larger than the released
    one, and none of that size has a smaller total age."""
    pos, neg, age = [u[0] for u in units], [u[1] for u in units], [u[2] for u in units]
    pick = select_balanced(pos, neg, age, max_rows, tau)
    m = sum(pos[u] + neg[u] for u in pick)
    P, N = sum(pos[u] for u in pick), sum(neg[u] for u in pick)
    if pick:
        assert 1 <= m <= max_rows and min(P, N) >= balance_need(m, tau)
    assert (m, sum((pos[u] + neg[u]) * age[u] for u in pick)) == _brute_force(pos, neg, age, max_rows, tau)


def test_select_balanced_rejects_bad_input():
    with pytest.raises(ValueError, match="lengths"):
        select_balanced([1], [1, 2], [0], 4, 0.5)
    with pytest.raises(ValueError, match="max_rows"):
        select_balanced([1], [1], [0], 0, 0.5)


# ------------------------------------------------------------------ RB buffer
def make_batch(gid, adv, step=0, T=3):
    """One rollout step: rows tagged "s{step}r{i}" so tests can follow them."""
    B = len(gid)
    rmask = torch.ones(B, T)
    return RolloutBatch(
        prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.arange(B * T).view(B, T) + 100 * step, response_mask=rmask,
        group_id=torch.tensor(gid, dtype=torch.long), advantage=torch.tensor(adv, dtype=torch.float32),
        old_logprob=-(torch.arange(B * T, dtype=torch.float32).view(B, T) + step) / 10,
        response_text=[f"s{step}r{i}" for i in range(B)],
    )


def groups_of(batch):
    """{group_id: sorted texts}"""
    out = {}
    for g, t in zip(batch.group_id.tolist(), batch.response_text):
        out.setdefault(g, []).append(t)
    return out


def test_buffer_hand_worked_release():
    buf = RewardBalancedBuffer(tau=0.5, update_rows=8, max_age=4)
    # step 0: g0 all-zero (dropped), g1 3+/1-, g2 3+/1- -> 8 rows, N+ 6, N- 2: no subset has N+ = N-
    buf.add(make_batch([0] * 4 + [1] * 4 + [2] * 4, [0.0] * 4 + [1, 1, 1, -1] * 2, step=0), 0)
    out, s = buf.pop_update_set(0)
    assert out is None and s["rb_size"] == 8 and s["rb_pos"] == 6 and s["rb_neg"] == 2
    assert s["rb_dropped_zero_adv"] == 4 and s["rb_waits"] == 1 and s["rb_sampled_total"] == 8
    # step 1 (policy unchanged, so ages stay 0 and 1 apart by version only): g1' 1+/3-, g2' 2+/2-
    buf.add(make_batch([1] * 4 + [2] * 4, [1, -1, -1, -1, 1, 1, -1, -1], step=1), 1)
    out, s = buf.pop_update_set(1)
    # 8-row sets with N+ = N-: {g2', g?} impossible (2+/2- needs another 2+/2-), {g1 or g2, g1'}: 4+/4-
    # -> one old 3+/1- group (age 1) + g1' (age 0); g1 is older in insertion order but ages tie
    assert s["rb_released_rows"] == 8 and s["rb_released_pos"] == 4 and s["rb_released_neg"] == 4
    assert sorted(out.policy_version.tolist()) == [0] * 4 + [1] * 4
    assert s["rb_mean_age"] == 0.5 and s["rb_max_age"] == 1 and s["rb_size"] == 8
    # held: one 3+/1- (age 1) and g2' 2+/2- (age 0): g2' alone is balanced -> released next pop
    out, s = buf.pop_update_set(1)
    assert out.response_text == ["s1r4", "s1r5", "s1r6", "s1r7"] and s["rb_pos"] == 3 and s["rb_neg"] == 1
    assert s["rb_released_total"] == 12 and s["rb_utilisation"] == 12 / 16
    # tau 0.25 releases the last 3+/1- group (need 1 of each)
    buf.tau = 0.25
    out, _ = buf.pop_update_set(1)
    assert len(out) == 4 and len(buf) == 0


def test_buffer_prefers_fresh_rows_and_fills_up_to_update_rows():
    buf = RewardBalancedBuffer(tau=0.25, update_rows=8, max_age=4)
    buf.add(make_batch([0] * 4, [1.0, -1.0, -1.0, -1.0], step=0), 0)  # 1+/3-: balanced alone
    buf.add(make_batch([0] * 4 + [1] * 4, [1.0, -1.0, -1.0, -1.0] * 2, step=1), 1)
    out, s = buf.pop_update_set(1)
    # all three groups are balanced; 8 rows fit: the two fresh (version 1) groups
    assert out.policy_version.tolist() == [1] * 8 and s["rb_mean_age"] == 0 and len(buf) == 4
    # next step: one fresh group + the held one fill the 8 rows
    buf.add(make_batch([0] * 4, [1.0, 1.0, -1.0, -1.0], step=2), 2)
    out, s = buf.pop_update_set(2)
    assert sorted(out.policy_version.tolist()) == [0] * 4 + [2] * 4 and s["rb_mean_age"] == 1.0
    assert len(buf) == 0 and s["rb_utilisation"] == 1.0


def test_buffer_does_not_touch_caller_batch_or_logprobs():
    b = make_batch([5, 5, 6, 6], [1.0, -1.0, 1.0, -1.0], step=3)
    before = b.state_dict()
    buf = RewardBalancedBuffer(tau=0.5, update_rows=4)
    buf.add(b, 3)
    assert b.policy_version is None and torch.equal(b.group_id, before["group_id"])
    out, _ = buf.pop_update_set(3)
    assert out.response_text == b.response_text
    assert torch.equal(out.old_logprob, b.old_logprob) and out.policy_version.tolist() == [3] * 4
    assert len(set(out.group_id.tolist())) == 2


def test_buffer_group_ids_unique_across_steps():
    buf = RewardBalancedBuffer(tau=0.0, update_rows=8)
    buf.add(make_batch([0, 0, 1, 1], [1.0, -1.0] * 2, step=0), 0)
    buf.add(make_batch([0, 0, 1, 1], [1.0, -1.0] * 2, step=1), 0)
    out, _ = buf.pop_update_set(0)
    assert sorted(len(v) for v in groups_of(out).values()) == [2, 2, 2, 2]


def test_buffer_stale_rows_are_dropped():
    buf = RewardBalancedBuffer(tau=0.5, update_rows=100, max_age=1)
    buf.add(make_batch([0, 0], [1.0, 1.0], step=0), 0)
    buf.add(make_batch([0, 0, 0], [1.0, 1.0, 1.0], step=1), 1)
    _, s = buf.pop_update_set(1)  # age 1 <= max_age: kept (nothing balances: no negatives)
    assert s["rb_size"] == 5 and s["rb_dropped_stale"] == 0 and s["rb_buffer_max_age"] == 1
    _, s = buf.pop_update_set(2)  # step-0 rows are 2 versions old
    assert s["rb_size"] == 3 and s["rb_dropped_stale"] == 2
    buf.add(make_batch([0, 0], [1.0, 1.0], step=4), 4)  # add also drops by the newest version
    assert len(buf) == 2
    with pytest.raises(ValueError, match="version 4"):
        buf.pop_update_set(3)


def test_buffer_capacity_drops_oldest_whole_groups():
    # versions do not advance while the buffer waits, so only max_rows bounds it
    buf = RewardBalancedBuffer(tau=0.5, update_rows=4, max_rows=6)
    for step in range(3):  # 3+/1- groups never balance at tau .5
        buf.add(make_batch([0] * 4, [1.0, 1.0, 1.0, -1.0], step=step), 0)
        out, s = buf.pop_update_set(0)
        assert out is None and s["rb_size"] <= 6
    assert s["rb_dropped_overflow"] == 8 and s["rb_dropped_stale"] == 0
    assert buf.pop_update_set(0)[0] is None and len(buf) == 4  # only the newest group is left


def test_buffer_drops_zero_training_advantage_rows():
    # group 0 all zero; group 1 mixed with a zero row (non-binary rewards 0, .5, 1)
    b = make_batch([0, 0, 0, 1, 1, 1], [0.0, 0.0, 0.0, -1.0, 0.0, 1.0])
    for keep_groups in (True, False):
        buf = RewardBalancedBuffer(tau=0.5, update_rows=4, keep_groups=keep_groups)
        buf.add(b, 0)
        out, s = buf.pop_update_set(0)
        assert s["rb_dropped_zero_adv"] == 4 and out.response_text == ["s0r3", "s0r5"]
        assert s["rb_sampled_total"] == 2 and s["rb_utilisation"] == 1.0


def test_buffer_warns_once_when_it_never_balances():
    buf = RewardBalancedBuffer(tau=0.5, update_rows=4, warn_after=3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for v in range(2):
            buf.add(make_batch([0, 0, 0, 0], [1.0, 1.0, 1.0, -1.0], step=v), v)
            assert buf.pop_update_set(v)[0] is None
    assert not rec
    with pytest.warns(RuntimeWarning, match=r"may never balance.*N\+=\d+, N-=\d+, tau=0.5"):
        buf.pop_update_set(2)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(5):
            buf.pop_update_set(2)
    assert not rec  # once per run of waits


def test_buffer_state_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    def fill(buf):
        buf.add(make_batch([0] * 4 + [1] * 4, [1, 1, 1, -1, 1, 1, 1, -1], step=0), 0)
        buf.pop_update_set(0)
        buf.add(make_batch([0] * 4 + [1] * 4, [1, -1, -1, -1, 1, 1, 1, -1], step=1), 1)

    a = RewardBalancedBuffer(tau=0.5, update_rows=8, max_age=4)
    fill(a)
    d = a.state_dict()
    tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(tmp_path / "rb.safetensors"))
    (tmp_path / "rb.json").write_text(json.dumps({k: v for k, v in d.items() if k not in tensors}))
    b = RewardBalancedBuffer(tau=0.5, update_rows=8, max_age=4)
    b.load_state_dict({**load_file(str(tmp_path / "rb.safetensors")), **json.loads((tmp_path / "rb.json").read_text())})
    assert len(b) == len(a) == 16
    for v in (1, 2):
        (oa, sa), (ob, sb) = a.pop_update_set(v), b.pop_update_set(v)
        assert sa == sb
        assert (oa is None) == (ob is None)
        if oa is not None:
            da, db = oa.state_dict(), ob.state_dict()
            assert da.keys() == db.keys()
            for k in da:
                assert torch.equal(da[k], db[k]) if isinstance(da[k], torch.Tensor) else da[k] == db[k]
    assert a.state_dict().keys() == b.state_dict().keys()
    empty = RewardBalancedBuffer(tau=0.5, update_rows=8)
    empty.load_state_dict(RewardBalancedBuffer(tau=0.5, update_rows=8).state_dict())
    assert len(empty) == 0


def test_buffer_rejects_bad_config_and_missing_advantage():
    with pytest.raises(ValueError, match="tau"):
        RewardBalancedBuffer(tau=0.6, update_rows=8)
    b = make_batch([0, 0], [1.0, -1.0])
    b.advantage = None
    with pytest.raises(ValueError, match="advantage"):
        RewardBalancedBuffer(tau=0.5, update_rows=2).add(b, 0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), min_size=1, max_size=6),
    st.sampled_from([0.25, 0.5]), st.integers(4, 24), st.booleans(),
)
def test_buffer_releases_only_valid_sets_and_conserves_rows(steps, tau, limit, keep_groups):
    """steps: per rollout step, the number of positive rows in each 4-row group."""
    G = 4
    buf = RewardBalancedBuffer(tau=tau, update_rows=limit, max_age=2, keep_groups=keep_groups, warn_after=100)
    added = released = 0
    for v, groups in enumerate(steps):
        gid = [g for g in range(len(groups)) for _ in range(G)]
        adv = [1.0 if i < k else -1.0 for k in groups for i in range(G)]
        adv = [0.0 if k in (0, G) else a for k, a in zip([k for k in groups for _ in range(G)], adv)]
        buf.add(make_batch(gid, adv, step=v), v)
        added += len(gid)
        out, s = buf.pop_update_set(v)
        if out is not None:
            sign = advantage_sign(out.advantage)
            n_pos, n_neg = int((sign > 0).sum()), int((sign < 0).sum())
            # integer counts vs the float64 product tau * len (e.g. 0.3 * 10 = 3.0000000000000004): 1e-9 absorbs that rounding
            assert min(n_pos, n_neg) >= tau * len(out) - 1e-9 and 1 <= len(out) <= limit
            if keep_groups:
                assert all(len(rows) == G for rows in groups_of(out).values())
            assert (v - out.policy_version).max() <= 2
            released += len(out)
        dropped = s["rb_dropped_stale"] + s["rb_dropped_zero_adv"] + s["rb_dropped_overflow"]
        assert added == released + s["rb_size"] + dropped
        assert s["rb_size"] <= buf.max_rows
        assert s["rb_utilisation"] == (released / s["rb_sampled_total"] if s["rb_sampled_total"] else 0.0)
