"""Mini-batch planners and the reward-balanced buffer (cancellation-hypothesis Sec. 4).

A planner is a pure function
    planner(group_id [B] long, advantage [B] float, length [B] long,
            rows_per_minibatch: int, generator: torch.Generator) -> list[list[int]]
returning mini-batches as lists of row indices; every row appears exactly once.
Registered by name in `PLANNERS`; the trainer picks one via `batching.planner`.

    random           shuffle, cut into ceil(B / rows_per_minibatch) chunks
    token_balanced   equal-size partitions with near-equal token sums (the effect of
                     verl's `balance_batch`); scatters groups like `random`
    query_preserved  whole groups only, token sums balanced as far as groups allow (QB)
    sign_split       A > 0 and A < 0 rows never share a mini-batch (negative control)

`minibatch_metrics` measures what a plan does to cancellation (local per-group
advantage sums, N+/N- per mini-batch, groups split across optimizer steps).

`RewardBalancedBuffer` holds rollout rows across rollout steps and releases the
largest update set B with min(N+[B], N-[B]) >= tau * |B| (RB), freshest first. Its selection rule,
maximum age and never-balancing behaviour are this package's design (the paper
publishes no code); see its docstring and docs/batching.md.

Simplifications: signs use a tolerance (`ZERO_ADV_ATOL`); mini-batch order is
shuffled by every planner. The RB selection is exact (a DP, `select_balanced`).

Try it:
    >>> g = torch.Generator().manual_seed(0)
    >>> PLANNERS.get("query_preserved")(torch.tensor([0, 0, 1, 1]), torch.tensor([1., -1, 1, -1]),
    ...                                 torch.tensor([3, 5, 2, 2]), 2, g)
    [[2, 3], [0, 1]]
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from tokencredit.batch import RolloutBatch
from tokencredit.registry import Registry

PLANNERS: Registry = Registry("planner")

ZERO_ADV_ATOL = 1e-6  # |A| <= this counts as a zero advantage (no gradient, no sign)


def advantage_sign(advantage: torch.Tensor, atol: float = ZERO_ADV_ATOL) -> torch.Tensor:
    """[B] float -> [B] long in {-1, 0, +1}; |A| <= atol is 0."""
    a = advantage.detach().double()
    return (a > atol).long() - (a < -atol).long()


def _check(group_id, advantage, length, rows_per_minibatch: int) -> int:
    if int(rows_per_minibatch) < 1:
        raise ValueError(f"rows_per_minibatch must be >= 1, got {rows_per_minibatch}")
    B = int(group_id.shape[0])
    for name, t in (("advantage", advantage), ("length", length)):
        if t is not None and int(t.shape[0]) != B:
            raise ValueError(f"planner: {name} has {int(t.shape[0])} rows, group_id has {B}")
    return B


def _shuffled(minibatches: list[list[int]], generator: torch.Generator) -> list[list[int]]:
    """Random order of optimizer steps; rows inside a mini-batch sorted."""
    perm = torch.randperm(len(minibatches), generator=generator).tolist()
    return [sorted(minibatches[i]) for i in perm]


def _split_even(rows: list[int], k: int) -> list[list[int]]:
    """k consecutive chunks whose sizes differ by at most one."""
    q, r = divmod(len(rows), k)
    out, i = [], 0
    for j in range(k):
        n = q + (1 if j < r else 0)
        out.append(rows[i : i + n])
        i += n
    return out


@PLANNERS.register("random")
def plan_random(group_id, advantage, length, rows_per_minibatch: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffle rows, cut into ceil(B / rows_per_minibatch) consecutive chunks."""
    B = int(group_id.shape[0])
    if B == 0:
        return []
    perm = torch.randperm(B, generator=generator).tolist()
    k = max(1, math.ceil(B / rows_per_minibatch))
    size = math.ceil(B / k)
    return [perm[i : i + size] for i in range(0, B, size)]


@PLANNERS.register("token_balanced")
def plan_token_balanced(
    group_id, advantage, length, rows_per_minibatch: int, generator: torch.Generator
) -> list[list[int]]:
    """k = ceil(B / rows_per_minibatch) mini-batches of floor/ceil(B / k) rows with
    near-equal token sums: the effect of verl's `balance_batch` (equal-size,
    length-balanced partitions), here cut directly into optimizer steps.

    Algorithm (ours, not verl's Karmarkar-Karp): sort rows by `length` [B]
    descending (random tie-break), deal them in waves of k; in each wave the
    longest row goes to the partition with the smallest token sum so far, the
    next to the second smallest, ... Guarantee (induction over waves: a full wave
    a_1 >= .. >= a_k onto sums s_1 <= .. <= s_k cannot widen the spread D beyond
    max(D, a_1 - a_k); a final partial wave beyond max(D, a_1)):
        max token sum - min token sum <= max(length) - min(length)   if k divides B,
                                      <= max(length)                 otherwise.
    Groups are scattered across mini-batches (this is the baseline QB repairs).
    """
    B = _check(group_id, advantage, length, rows_per_minibatch)
    if B == 0:
        return []
    k = math.ceil(B / rows_per_minibatch)
    lens = length.detach().long().cpu()
    perm = torch.randperm(B, generator=generator)
    order = perm[torch.sort(lens[perm], descending=True, stable=True).indices].tolist()
    sums, parts = [0] * k, [[] for _ in range(k)]
    for start in range(0, B, k):
        wave = order[start : start + k]  # lengths descending
        lightest = sorted(range(k), key=lambda j: (sums[j], j))[: len(wave)]
        for row, j in zip(wave, lightest):
            parts[j].append(row)
            sums[j] += int(lens[row])
    return _shuffled(parts, generator)


@PLANNERS.register("query_preserved")
def plan_query_preserved(
    group_id, advantage, length, rows_per_minibatch: int, generator: torch.Generator
) -> list[list[int]]:
    """Query-preserved mini-batching (cancellation-hypothesis Sec. 4, QB): every
    group (rows sharing `group_id` [B]) lies inside one mini-batch, so each
    mini-batch's advantages sum to zero per group (Eq. 14 discussion).

    Start with k = ceil(B / rows_per_minibatch) mini-batches. Groups, sorted by
    token count descending (random tie-break), go greedily to the mini-batch with
    the fewest tokens among those with room (rows + group size <=
    rows_per_minibatch); if none has room a new mini-batch is opened, so no
    mini-batch ever exceeds rows_per_minibatch rows. With equal group sizes G
    dividing rows_per_minibatch this gives exactly k mini-batches; with varying
    group sizes row counts per mini-batch differ and there may be more than k.
    Raises ValueError if a group has more rows than rows_per_minibatch.
    """
    B = _check(group_id, advantage, length, rows_per_minibatch)
    if B == 0:
        return []
    lens = length.detach().long().cpu().tolist()
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_id.detach().cpu().tolist()):
        members.setdefault(int(g), []).append(i)
    for g, rows in members.items():
        if len(rows) > rows_per_minibatch:
            raise ValueError(
                f"query_preserved: group {g} has {len(rows)} rows but rows_per_minibatch={rows_per_minibatch}; "
                "a group must fit in one mini-batch (use a mini-batch size that is a multiple of the group size)"
            )
    groups = list(members)
    tokens = {g: sum(lens[i] for i in members[g]) for g in groups}
    perm = torch.randperm(len(groups), generator=generator).tolist()
    order = sorted((groups[i] for i in perm), key=lambda g: (-tokens[g], -len(members[g])))
    k = math.ceil(B / rows_per_minibatch)
    bins: list[list[int]] = [[] for _ in range(k)]
    bin_tokens = [0] * k
    for g in order:
        size = len(members[g])
        room = [j for j in range(len(bins)) if len(bins[j]) + size <= rows_per_minibatch]
        if not room:
            bins.append([])
            bin_tokens.append(0)
            room = [len(bins) - 1]
        j = min(room, key=lambda j: (bin_tokens[j], len(bins[j]), j))
        bins[j].extend(members[g])
        bin_tokens[j] += tokens[g]
    return _shuffled([b for b in bins if b], generator)


@PLANNERS.register("sign_split")
def plan_sign_split(
    group_id, advantage, length, rows_per_minibatch: int, generator: torch.Generator
) -> list[list[int]]:
    """Negative control (cancellation-hypothesis Sec. 4, Fig. 7a): rows with A > 0
    and rows with A < 0 (`advantage` [B], tolerance ZERO_ADV_ATOL) never share a
    mini-batch. Zero-advantage rows join the side with fewer rows (ties: the
    positive side). Each side is shuffled and cut into ceil(n_side /
    rows_per_minibatch) chunks of near-equal size, so there can be one mini-batch
    more than ceil(B / rows_per_minibatch). Step order is shuffled.
    """
    B = _check(group_id, advantage, length, rows_per_minibatch)
    if B == 0:
        return []
    sign = advantage_sign(advantage).tolist()
    pos = [i for i, s in enumerate(sign) if s > 0]
    neg = [i for i, s in enumerate(sign) if s < 0]
    zero = [i for i, s in enumerate(sign) if s == 0]
    (pos if len(pos) <= len(neg) else neg).extend(zero)
    out: list[list[int]] = []
    for side in (pos, neg):
        if side:
            side = [side[i] for i in torch.randperm(len(side), generator=generator).tolist()]
            out.extend(_split_even(side, math.ceil(len(side) / rows_per_minibatch)))
    return _shuffled(out, generator)


def minibatch_metrics(group_id, advantage, minibatches: list[list[int]]) -> dict[str, float]:
    """What a plan does to cancellation. group_id [B], advantage [B].

    mb_max_abs_group_adv_sum  max over mini-batches b and groups g of |sum_{i in b, g} A_i|
                              (Eq. 14's S_B; ~0 under QB with zero-sum group advantages)
    mb_n_pos_mean / _min      rows with A > 0 per mini-batch
    mb_n_neg_mean / _min      rows with A < 0 per mini-batch
    mb_min_balance            min over mini-batches of min(N+, N-) / rows
    groups_split              groups whose rows lie in more than one mini-batch
    mb_count                  number of mini-batches
    """
    gids = group_id.detach().cpu().tolist()
    adv = advantage.detach().double().cpu().tolist()
    sign = advantage_sign(advantage).tolist()
    max_abs, npos, nneg, balance = 0.0, [], [], []
    steps_of_group: dict[int, set[int]] = {}
    for b, rows in enumerate(minibatches):
        local: dict[int, float] = {}
        for i in rows:
            local[gids[i]] = local.get(gids[i], 0.0) + adv[i]
            steps_of_group.setdefault(gids[i], set()).add(b)
        max_abs = max([max_abs] + [abs(s) for s in local.values()])
        p = sum(1 for i in rows if sign[i] > 0)
        n = sum(1 for i in rows if sign[i] < 0)
        npos.append(p)
        nneg.append(n)
        balance.append(min(p, n) / max(1, len(rows)))
    k = len(minibatches)
    return {
        "mb_count": float(k),
        "mb_max_abs_group_adv_sum": float(max_abs),
        "mb_n_pos_mean": sum(npos) / k if k else 0.0,
        "mb_n_pos_min": float(min(npos, default=0)),
        "mb_n_neg_mean": sum(nneg) / k if k else 0.0,
        "mb_n_neg_min": float(min(nneg, default=0)),
        "mb_min_balance": float(min(balance, default=0.0)),
        "groups_split": float(sum(1 for s in steps_of_group.values() if len(s) > 1)),
    }


def groups_with_signal(group_id: torch.Tensor, advantage: torch.Tensor, atol: float = ZERO_ADV_ATOL) -> torch.Tensor:
    """[B] bool: the row's group has at least one row with nonzero training advantage.

    group_id [B], advantage [B]. DAPO dynamic sampling keeps exactly these groups
    (verl `algorithm.filter_groups`: all-equal rewards give GRPO A = 0 on every row).
    """
    _, inv = torch.unique(group_id.cpu(), return_inverse=True)  # [B]
    nonzero = advantage_sign(advantage, atol).ne(0).cpu().long()  # [B]
    has = torch.zeros(int(inv.max()) + 1 if len(inv) else 0, dtype=torch.long).index_add_(0, inv, nonzero) > 0
    return has[inv]


# ---------------------------------------------------------------- reward-balanced buffer
def balance_need(m: int, tau: float) -> int:
    """Rows of each sign an update set of m rows needs: ceil(tau * m), with 1e-9 slack
    so float noise (0.3 * 10 = 3.0000000000000004) does not ask for an extra row."""
    return max(0, math.ceil(tau * m - 1e-9))


_INF = 1 << 50  # "unreachable" total age in the selection DP (ages are small integers)


def select_balanced(pos, neg, age, max_rows: int, tau: float) -> list[int]:
    """The reward-balanced update set: exact, a pure function of per-unit counts.

    pos, neg, age: [U] ints per unit (a unit is a whole group under QB, else one row):
    rows with training advantage > 0, rows with < 0, and the unit's age in policy
    versions (0 = sampled by the current policy). Zero-advantage rows are not units'
    rows (the buffer drops them). Returns the sorted unit indices of a set B with

        min(N+[B], N-[B]) >= tau * |B|,   1 <= |B| <= max_rows   (paper Sec. 4, RB)

    that (1) maximises |B| = N+ + N-, then (2) minimises the total row age
    sum_{u in B} (pos_u + neg_u) * age_u; remaining ties go to fewer units of later
    types. [] when no nonempty balanced set exists.

    Method: units of one type (pos, neg) are interchangeable except for age, so an
    optimal B takes the youngest k_t of each type t (exchange argument). A DP over
    types on the state (N+, N-) with N+ + N- <= max_rows keeps the least total age
    for each reachable state, and argmin k_t per state for the backtrack.
    Cost: sum_t min(count_t, max_rows // size_t) array updates of the state grid
    (<= (max_rows + 1)^2 int64): microseconds for the embedded default (32 rows),
    ~1-3 s at the paper's 1,024 rows with several hundred held groups.
    Row units (2 types) cost O(max_rows^2) once.
    """
    import numpy as np

    P_u, N_u, A_u = [int(x) for x in pos], [int(x) for x in neg], [int(x) for x in age]
    if not len(P_u) == len(N_u) == len(A_u):
        raise ValueError(f"select_balanced: pos/neg/age lengths differ ({len(P_u)}, {len(N_u)}, {len(A_u)})")
    if max_rows < 1:
        raise ValueError(f"select_balanced: max_rows must be >= 1, got {max_rows}")
    if any(x < 0 for x in P_u + N_u + A_u):
        raise ValueError("select_balanced: pos, neg and age must be >= 0")
    types: dict[tuple[int, int], list[int]] = {}
    for u in range(len(P_u)):
        if 0 < P_u[u] + N_u[u] <= max_rows:
            types.setdefault((P_u[u], N_u[u]), []).append(u)
    if not types:
        return []
    keys = sorted(types)
    for t in keys:  # youngest first, then insertion order
        types[t].sort(key=lambda u: (A_u[u], u))
    Pmax = min(max_rows, sum(t[0] * len(types[t]) for t in keys))
    Nmax = min(max_rows, sum(t[1] * len(types[t]) for t in keys))
    cost = np.full((Pmax + 1, Nmax + 1), _INF, dtype=np.int64)  # (P+1, N+1) least total age
    cost[0, 0] = 0
    choices = []
    for t in keys:
        p, n = t
        members = types[t]
        kmax = min(len(members), max_rows // (p + n))
        prefix = np.cumsum([0] + [(p + n) * A_u[u] for u in members[:kmax]])  # (kmax+1,)
        best = cost.copy()
        pick = np.zeros(cost.shape, dtype=np.int32)
        for k in range(1, kmax + 1):
            dp, dn = k * p, k * n
            if dp > Pmax or dn > Nmax:
                break
            cand = cost[: Pmax + 1 - dp, : Nmax + 1 - dn] + int(prefix[k])  # (P+1-dp, N+1-dn)
            tgt = best[dp:, dn:]
            better = cand < tgt
            tgt[better] = cand[better]
            pick[dp:, dn:][better] = k
        cost = best
        choices.append(pick)
    P, N = np.meshgrid(np.arange(Pmax + 1), np.arange(Nmax + 1), indexing="ij")  # (P+1, N+1)
    M = P + N
    need = np.ceil(tau * M - 1e-9).astype(np.int64)
    ok = (cost < _INF) & (M >= 1) & (M <= max_rows) & (np.minimum(P, N) >= need)
    if not ok.any():
        return []
    m_best = int(M[ok].max())
    ok &= M == m_best
    c_best = int(cost[ok].min())
    ok &= cost == c_best
    cand = np.argwhere(ok)  # rows [P, N], sorted: the most balanced, then fewer positives
    cand = sorted(cand.tolist(), key=lambda x: (abs(x[0] - x[1]), x[0]))
    p_cur, n_cur = cand[0]
    out: list[int] = []
    for t, pick in zip(reversed(keys), reversed(choices)):
        k = int(pick[p_cur, n_cur])
        out.extend(types[t][:k])
        p_cur, n_cur = p_cur - k * t[0], n_cur - k * t[1]
    assert p_cur == 0 and n_cur == 0, "select_balanced: backtrack did not reach the empty set"
    return sorted(out)


class RewardBalancedBuffer:
    """Reward-balanced batching (cancellation-hypothesis Sec. 4, RB): rollout rows
    accumulate across rollout steps, and an update set B is released only when
        min(N+[B], N-[B]) >= tau * |B|.

    The buffer *defers* an update until it is balanced; it is not there to shrink or
    age it (METHODS.md section 2). Design (ours; the paper publishes no code):

      * add(batch, v): rows carry the advantage that trains (`batch.advantage`,
        after any sample-polarity transform). Rows whose training advantage is zero
        carry no gradient and are dropped on entry (`rb_dropped_zero_adv`). A copy
        is stored with `policy_version` = v; the caller's batch is untouched.
      * units: whole groups (keep_groups=True, query-preserved compatible; a
        group's zero-advantage rows are the only rows it loses) or single rows.
      * pop_update_set(now): releases the largest balanced set of whole units with
        |B| <= update_rows, and among those the one with the least total row age
        (`select_balanced`, exact). So fresh units train first, held units fill in
        only where they keep or repair balance or there is room, and a row is held
        back only when the balance rule or the size limit forces it.
      * ageing: rows older than `max_age` policy versions are dropped
        (`rb_dropped_stale`); beyond `max_rows` held rows (default
        (max_age + 1) * update_rows) the oldest units are dropped
        (`rb_dropped_overflow`). Memory is bounded either way.
      * never balancing: no fallback, an unbalanced set is never released. After
        `warn_after` consecutive pops without a release a RuntimeWarning fires once
        (again only after a later release and a new run of waits); the trainer
        keeps sampling.
      * stats are floats. rb_dropped_*, rb_released_total, rb_sampled_total are
        cumulative (checkpointed); rb_utilisation = rows trained / nonzero-advantage
        rows sampled, cumulative; rb_mean_age / rb_max_age describe the released
        rows (0 when none), rb_buffer_max_age the rows still held.
    """

    def __init__(self, tau: float, update_rows: int, max_age: int = 1, keep_groups: bool = True,
                 warn_after: int = 8, max_rows: int | None = None):
        if not 0.0 <= tau <= 0.5:
            raise ValueError(f"RewardBalancedBuffer: tau must be in [0, 0.5] (paper: 0.25 or 0.5), got {tau}")
        max_rows = (max_age + 1) * update_rows if max_rows is None else max_rows
        if update_rows < 1 or max_age < 0 or warn_after < 1 or max_rows < update_rows:
            raise ValueError(
                "RewardBalancedBuffer: need update_rows >= 1, max_age >= 0, warn_after >= 1, max_rows >= update_rows; "
                f"got {update_rows}, {max_age}, {warn_after}, {max_rows}"
            )
        self.tau, self.update_rows, self.max_age = float(tau), int(update_rows), int(max_age)
        self.keep_groups, self.warn_after, self.max_rows = bool(keep_groups), int(warn_after), int(max_rows)
        self._rows: RolloutBatch | None = None
        self._seq = torch.zeros(0, dtype=torch.long)  # [N] insertion order of held rows
        self._counters = dict(next_gid=0, next_seq=0, latest_version=-(2**62), waits=0, warned=0,
                              dropped_stale=0, dropped_zero_adv=0, dropped_overflow=0, released_total=0,
                              sampled_total=0)

    def __len__(self) -> int:
        return 0 if self._rows is None else len(self._rows)

    # ------------------------------------------------------------------ add
    def add(self, batch: RolloutBatch, policy_version: int) -> None:
        """Buffer the rows of one rollout step (sampled by `policy_version`)."""
        if batch.advantage is None:
            raise ValueError("RewardBalancedBuffer.add: batch.advantage is None; compute advantages first")
        if len(batch) == 0:
            return
        c = self._counters
        rows = batch.select(torch.arange(len(batch)))  # copy
        _, inv = torch.unique(rows.group_id, return_inverse=True)  # [B] dense group index
        n_groups = int(inv.max()) + 1
        rows.group_id = (inv + c["next_gid"]).to(torch.long)
        rows.policy_version = torch.full((len(rows),), int(policy_version), dtype=torch.long, device=inv.device)
        c["next_gid"] += n_groups
        keep = advantage_sign(rows.advantage).ne(0).cpu()  # [B] rows that carry gradient
        c["dropped_zero_adv"] += int((~keep).sum())
        c["sampled_total"] += int(keep.sum())
        c["latest_version"] = max(c["latest_version"], int(policy_version))
        if keep.any():
            idx = keep.nonzero().squeeze(1)
            seq = torch.arange(c["next_seq"], c["next_seq"] + len(idx), dtype=torch.long)
            c["next_seq"] += len(idx)
            kept = rows.select(idx)
            self._rows = kept if self._rows is None else RolloutBatch.concat([self._rows, kept])
            self._seq = torch.cat([self._seq, seq])
        self._drop_stale(c["latest_version"])
        if len(self) > self.max_rows:  # drop the oldest units beyond capacity
            inv, order, size = self._units()
            over = size.cumsum(0) - size < len(self) - self.max_rows  # shortest oldest prefix covering the excess
            drop = torch.zeros(len(order), dtype=torch.bool)
            drop[order[over]] = True
            c["dropped_overflow"] += int(drop[inv].sum())
            self._keep_rows(~drop[inv])

    def _units(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Held rows as units (whole groups, or single rows): inv [N] unit of each row,
        order [U] unit ids oldest first (version, then insertion), size [U] rows (in order)."""
        key = self._rows.group_id.cpu() if self.keep_groups else torch.arange(len(self))
        _, inv = torch.unique(key, return_inverse=True)
        U = int(inv.max()) + 1
        big = torch.full((U,), 2**62, dtype=torch.long)
        first_seq = big.scatter_reduce(0, inv, self._seq, "amin")
        version = big.scatter_reduce(0, inv, self._rows.policy_version.cpu(), "amin")
        order = torch.sort(first_seq).indices
        order = order[torch.sort(version[order], stable=True).indices]
        return inv, order, torch.bincount(inv, minlength=U)[order]

    def _keep_rows(self, mask: torch.Tensor) -> None:
        """Keep the held rows where mask [N] bool is True (order preserved)."""
        idx = mask.cpu().nonzero().squeeze(1)
        if len(idx) == 0:
            self._rows, self._seq = None, torch.zeros(0, dtype=torch.long)
        else:
            self._rows, self._seq = self._rows.select(idx), self._seq[idx]

    def _drop_stale(self, now: int) -> None:
        if self._rows is None:
            return
        stale = (now - self._rows.policy_version.cpu()) > self.max_age
        if stale.any():
            self._counters["dropped_stale"] += int(stale.sum())
            self._keep_rows(~stale)

    # ------------------------------------------------------------------ pop
    def pop_update_set(self, policy_version: int) -> tuple[RolloutBatch | None, dict[str, float]]:
        """(update set or None, stats). `policy_version` is the current policy."""
        c, now = self._counters, int(policy_version)
        if self._rows is not None and int(self._rows.policy_version.max()) > now:
            raise ValueError(
                f"RewardBalancedBuffer.pop_update_set(policy_version={now}) but the buffer holds rows "
                f"sampled by version {int(self._rows.policy_version.max())}"
            )
        c["latest_version"] = max(c["latest_version"], now)
        self._drop_stale(now)
        released = None
        if self._rows is not None:
            inv, order, size = self._units()
            U = len(order)
            sign = advantage_sign(self._rows.advantage).cpu()
            pos = torch.bincount(inv, weights=(sign > 0).double(), minlength=U)[order].long()
            neg = torch.bincount(inv, weights=(sign < 0).double(), minlength=U)[order].long()
            version = torch.full((U,), 2**62, dtype=torch.long).scatter_reduce(
                0, inv, self._rows.policy_version.cpu(), "amin")[order]
            # min(N+[B], N-[B]) >= tau |B|, |B| <= update_rows  (cancellation-hypothesis Sec. 4)
            pick = select_balanced(pos, neg, now - version, self.update_rows, self.tau)
            if pick:
                rank = torch.empty(U, dtype=torch.long)
                rank[order] = torch.arange(U)
                row_rank = rank[inv]  # [N] position of each row's unit, oldest first
                chosen = torch.zeros(U, dtype=torch.bool)
                chosen[torch.tensor(pick, dtype=torch.long)] = True
                mask = chosen[row_rank]
                idx = mask.nonzero().squeeze(1)
                released = self._rows.select(idx[torch.sort(row_rank[idx], stable=True).indices])
                self._keep_rows(~mask)
        if released is None:
            c["waits"] += 1
            if c["waits"] >= self.warn_after and not c["warned"]:
                c["warned"] = 1
                p, n = self._signs()
                warnings.warn(
                    f"RewardBalancedBuffer: no update set released for {c['waits']} consecutive pops; it may never "
                    f"balance (held {len(self)} rows, N+={p}, N-={n}, tau={self.tau}, "
                    f"update_rows={self.update_rows}). Lower tau (e.g. 0.25), sample larger rollout batches, "
                    "or use a task whose pass rate is further from 0 and 1.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            c["waits"], c["warned"] = 0, 0
            c["released_total"] += len(released)
        return released, self._stats(released, now)

    @property
    def utilisation(self) -> float:
        """Rows released / nonzero-advantage rows added, cumulative (0 before any add)."""
        c = self._counters
        return c["released_total"] / c["sampled_total"] if c["sampled_total"] else 0.0

    def _signs(self) -> tuple[int, int]:
        if self._rows is None:
            return 0, 0
        s = advantage_sign(self._rows.advantage)
        return int((s > 0).sum()), int((s < 0).sum())

    def _stats(self, released: RolloutBatch | None, now: int) -> dict[str, float]:
        c = self._counters
        pos, neg = self._signs()
        rel_age = (now - released.policy_version).double() if released is not None else torch.zeros(0)
        rel_sign = advantage_sign(released.advantage) if released is not None else torch.zeros(0)
        held_age = (now - self._rows.policy_version) if self._rows is not None else torch.zeros(0)
        return {
            "rb_size": float(len(self)),
            "rb_pos": float(pos),
            "rb_neg": float(neg),
            "rb_released_rows": float(rel_age.numel()),
            "rb_released_pos": float((rel_sign > 0).sum()),
            "rb_released_neg": float((rel_sign < 0).sum()),
            "rb_released_total": float(c["released_total"]),
            "rb_sampled_total": float(c["sampled_total"]),
            "rb_utilisation": self.utilisation,
            "rb_dropped_stale": float(c["dropped_stale"]),
            "rb_dropped_zero_adv": float(c["dropped_zero_adv"]),
            "rb_dropped_overflow": float(c["dropped_overflow"]),
            "rb_mean_age": float(rel_age.mean()) if rel_age.numel() else 0.0,
            "rb_max_age": float(rel_age.max()) if rel_age.numel() else 0.0,
            "rb_buffer_max_age": float(held_age.max()) if held_age.numel() else 0.0,
            "rb_waits": float(c["waits"]),
        }

    # ------------------------------------------------------------- persist
    def state_dict(self) -> dict[str, Any]:
        """Flat dict: tensors under "rows.*", JSON-able ints / strings / lists elsewhere."""
        d: dict[str, Any] = {f"counter.{k}": int(v) for k, v in self._counters.items()}
        if self._rows is not None:
            d.update({f"rows.{k}": v for k, v in self._rows.state_dict().items()})
            d["rows._seq"] = self._seq
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        counters = {k[len("counter."):]: int(v) for k, v in d.items() if k.startswith("counter.")}
        self._counters = {**{k: 0 for k in self._counters}, **counters}
        rows = {k[len("rows."):]: v for k, v in d.items() if k.startswith("rows.") and k != "rows._seq"}
        if rows:
            self._rows = RolloutBatch.from_state_dict(rows)
            self._seq = d["rows._seq"].long().cpu()
        else:
            self._rows, self._seq = None, torch.zeros(0, dtype=torch.long)
