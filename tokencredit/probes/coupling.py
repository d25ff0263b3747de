"""Output-layer coupling probe: how one GRPO step moves every token's log-prob.

What it does
    Implements the output-layer proxy of the cancellation-hypothesis paper
    (Sec. 2, Eq. 1-10; METHODS.md Sec. 6 "Output-layer proxy"). For one SGD
    step of size ``eta`` on the weighted token log-likelihood

        J(W) = 1/N sum_k A_k log pi(o_k | s_k)                          (Eq. 2)

    taken on the LM-head weight W only, the first-order change of token j's
    log-prob is

        delta_j = eta/N sum_k A_k <h_j, h_k> phi_jk                     (Eq. 9)
                = eta/N rho_j^T (G h_j),   G = sum_k A_k rho_k h_k^T  [V, d]

    with rho_j the score of token j in head-output space (``lm_head``): without
    logit scale, softcap and temperature rho_j = r_j = e_{o_j} - pi_j (Eq. 6),
    G = sum_k A_k r_k h_k^T and phi_jk = <r_j, r_k> (Eq. 8); in general the
    kernel is K_jk = <h_j, h_k> <rho_j, rho_k>. G is ``lm_head.lm_head_grad``,
    the one LM-head gradient that ``masking.lm_head_masking`` uses too.
    ``predicted_shift`` gets all N deltas with O(N V d) work (two passes over
    row chunks, never an [N, V] or [N, N] tensor) and splits each delta into
    self term (k = j), same-token coupling (k != j, o_k = o_j) and
    different-token coupling (the rest). ``coupling_pairs`` samples token
    pairs for the Fig. 2 statistics and ``coupling_cells`` summarises them by
    (same token?) x (both low confidence?). ``predicted_shift_pairwise`` is the
    O(N^2 V) brute-force reference, ``lm_head_grad_step`` the actual update.

Conventions (read before comparing numbers)
    * ``eta`` is the SGD step size on J *including* J's 1/N, i.e.
      W' = W + eta * dJ/dW (Eq. 3), so predictions carry the factor eta/N.
      ``lm_head_grad_step(..., lr=eta)`` uses the same convention.
    * Logits are z = softcap(logit_scale * (W h + b)) / temperature, the
      transform of ``tokencredit.model.forward`` (``lm_head.LogitTransform``;
      pass the model's logit_scale / softcap, ``lm_head.lm_head_of`` reads
      them). Without softcap the score is d log pi / dW = (logit_scale / tau)
      r h^T, so every kernel value is multiplied by (logit_scale / tau)^2.
      temperature=1, no scale, no softcap (the defaults) is the paper's setting.
    * ``A`` is the per-token weight: the advantage of the token's rollout with
      any importance ratio / clip mask / loss normaliser folded in (Eq. 2).
      Tokens that are not in the loss should get A = 0 or be dropped.
    * ``phi`` is always exact (Eq. 8, <r_j, r_k> with the transformed logits'
      softmax). Eq. 10's same-token form (1 - pi_j(o))(1 - pi_k(o)) is an
      approximation: it drops sum_{v != o} pi_j(v) pi_k(v); it is reported as
      ``phi_eq10`` by ``coupling_pairs`` for comparison. For different tokens
      Eq. 10 is exact.

Simplifications
    * Only the LM-head weight is perturbed; the bias (if any) and the hidden
      states h are fixed. The full-parameter kernel (Eq. 5) is out of scope.
    * First order only (Eq. 4): the actual change also has O(eta^2) terms.
    * Math runs in h's dtype (W is cast to it); pass float64 for reference
      checks.

Try it
    from tokencredit.model.tiny import build_tiny
    from tokencredit.probes.coupling import predicted_shift, lm_head_grad_step
    model, tok = build_tiny()
    ids = tok("hello hello world", return_tensors="pt").input_ids
    h = model.model(ids).last_hidden_state[0, :-1].detach()   # [N, d]
    o = ids[0, 1:]                                            # [N]
    A = torch.ones(len(o))                                    # [N]
    W = model.get_output_embeddings().weight.detach()         # [V, d]
    pred = predicted_shift(h, W, o, A, eta=1e-3)
    real = lm_head_grad_step(model, h, o, A, lr=1e-3)["delta_logp"]
"""

from __future__ import annotations

from typing import Any

import torch

from tokencredit.probes.lm_head import LogitTransform, _rowdot, dense_scores, lm_head_grad, score_dot, score_rows

__all__ = [
    "predicted_shift",
    "predicted_shift_pairwise",
    "token_stats",
    "coupling_pairs",
    "coupling_cells",
    "lm_head_grad_step",
]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _logits(h: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, tf: LogitTransform) -> torch.Tensor:
    """z = tf(W h + b) for a block of rows. h [c, d], W [V, d] -> [c, V]."""
    u = h @ W.T  # [c, V]
    if bias is not None:
        u = u + bias
    return tf(u)


def _prep(h, W, o, A, bias):
    """Validate shapes; cast W, A, bias to h's dtype. Returns (h, W, o, A, bias)."""
    if h.dim() != 2 or W.dim() != 2 or h.shape[1] != W.shape[1]:
        raise ValueError(f"expected h [N, d] and W [V, d]; got {tuple(h.shape)} and {tuple(W.shape)}")
    N = h.shape[0]
    if o.shape != (N,) or A.shape != (N,):
        raise ValueError(f"expected o and A of shape [{N}]; got {tuple(o.shape)} and {tuple(A.shape)}")
    dt = h.dtype
    W = W.detach().to(dt)
    A = A.detach().to(dt)
    bias = None if bias is None else bias.detach().to(dt)
    return h.detach(), W, o.long(), A, bias


def _id_groups(o: torch.Tensor, min_size: int = 1) -> list[torch.Tensor]:
    """Token indices grouped by id (ids ascending), groups of size >= min_size.

    o [N] -> list of index tensors, each [n_v], indices ascending within a group.
    """
    order = torch.argsort(o, stable=True)  # [N]
    _, counts = torch.unique_consecutive(o[order], return_counts=True)
    groups = torch.split(order, counts.tolist())
    return [g for g in groups if g.numel() >= min_size]


def _pack_groups(groups: list[torch.Tensor], chunk_tokens: int):
    """Pack whole id groups into row batches of at most `chunk_tokens` rows.

    Returns (batches, big): batches is a list of (idx [m], [(offset, n), ...])
    where each (offset, n) is a whole group with n >= 2 inside idx; big lists
    the groups with more than `chunk_tokens` tokens (handled block-wise).
    """
    batches, big = [], []
    cur, members, rows = [], [], 0
    for g in groups:
        n = g.numel()
        if n > chunk_tokens:
            big.append(g)
            continue
        if rows + n > chunk_tokens and cur:
            batches.append((torch.cat(cur), members))
            cur, members, rows = [], [], 0
        if n >= 2:
            members.append((rows, n))
        cur.append(g)
        rows += n
    if cur:
        batches.append((torch.cat(cur), members))
    return batches, big


def _same_in_groups(q, sc, Hb, Ab, vb, members, max_rows):
    """Same-token sums for many small id groups held in one batch, bucketed bmm.

    (q [m, V], sc [m]) the batch's scores rho_j = sc_j e_{o_j} - q_j
    (``lm_head.score_rows``), Hb [m, d], Ab [m], vb [m] ids; members:
    [(offset, n), ...] whole groups (n >= 2) as row ranges of the batch.
    Returns [m]: S_j = sum_{k != j, o_k = o_j} A_k <h_j,h_k> <rho_j,rho_k> (0 for
    rows outside members). Groups are padded to the next power of two and run
    as one batched matmul per size bucket (few large ops instead of one tiny op
    per group); padded rows repeat a real row with weight 0. At most
    max(max_rows, padded group size) rows are gathered at once, so extra
    memory is below max_rows * V floats.
    """
    out = torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)
    buckets: dict[int, list[tuple[int, int]]] = {}
    for off, n in members:
        buckets.setdefault(1 << (n - 1).bit_length(), []).append((off, n))
    for size, lst in buckets.items():
        per = max(1, max_rows // size)
        ar = torch.arange(size, device=q.device)
        for i in range(0, len(lst), per):
            offs = torch.tensor([x[0] for x in lst[i : i + per]], device=q.device)  # [g]
            ns = torch.tensor([x[1] for x in lst[i : i + per]], device=q.device)  # [g]
            valid = ar[None, :] < ns[:, None]  # [g, s]
            rows = offs[:, None] + torch.minimum(ar[None, :], ns[:, None] - 1)  # [g, s]
            Q = q[rows]  # [g, s, V]
            H = Hb[rows]  # [g, s, d]
            a = Ab[rows] * valid  # [g, s], padding gets weight 0
            qv = Q.gather(2, vb[rows].unsqueeze(-1)).squeeze(-1)  # [g, s] q_j(v)
            sv = sc[rows]  # [g, s]
            # <rho_j, rho_k> = s_j s_k - s_j q_k(v) - s_k q_j(v) + <q_j, q_k>   (Eq. 8, o_j = o_k = v)
            phi = torch.bmm(Q, Q.transpose(1, 2))  # [g, s, s]
            del Q
            phi += sv[:, :, None] * sv[:, None, :] - sv[:, :, None] * qv[:, None, :] - sv[:, None, :] * qv[:, :, None]
            K = torch.bmm(H, H.transpose(1, 2)).mul_(phi)  # [g, s, s] <h_j,h_k> <rho_j,rho_k>   (Eq. 7)
            K.diagonal(dim1=1, dim2=2).zero_()  # k != j: the diagonal is the self term
            res = torch.bmm(K, a.unsqueeze(-1)).squeeze(-1)  # [g, s]
            out[rows[valid]] = res[valid]
    return out


def _same_block(qa, sa, qb, sb, v):
    """<rho_j, rho_k> [a, b] for two row blocks of one id group v (``_same_in_groups``' formula)."""
    qva, qvb = qa[:, v], qb[:, v]  # [a], [b]
    return qa @ qb.T + sa[:, None] * sb[None, :] - sa[:, None] * qvb[None, :] - sb[None, :] * qva[:, None]


def _same_in_big_group(scores_of, h, A, g, v, chunk_tokens, out):
    """Same-token sum for a group larger than `chunk_tokens`, block pair by block pair.

    scores_of: idx [m] -> (q [m, V], s [m]) (``lm_head.score_rows``); v the
    group's id. Adds into out [N]. Memory is O(chunk_tokens * V +
    chunk_tokens^2); the second block's scores are recomputed.
    """
    blocks = torch.split(g, chunk_tokens)
    for a, ga in enumerate(blocks):
        qa, sa = scores_of(ga)  # [ca, V], [ca]
        Ha = h[ga]
        for b in range(a, len(blocks)):
            gb = blocks[b]
            qb, sb = (qa, sa) if b == a else scores_of(gb)  # [cb, V], [cb]
            Kab = (Ha @ h[gb].T) * _same_block(qa, sa, qb, sb, v)  # [ca, cb]
            if b == a:
                Kab.fill_diagonal_(0.0)
                out[ga] += Kab @ A[ga]
            else:  # K is symmetric: use the block for both directions
                out[ga] += Kab @ A[gb]
                out[gb] += Kab.T @ A[ga]


# ----------------------------------------------------------------------------
# per-token statistics
# ----------------------------------------------------------------------------


@torch.no_grad()
def token_stats(
    h: torch.Tensor,
    W: torch.Tensor,
    o: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_tokens: int = 1024,
) -> dict[str, torch.Tensor]:
    """Per-token confidence statistics, computed in row chunks.

    h [N, d], W [V, d], o [N] -> dict of [N] tensors:
      p_own   pi_j(o_j), the prob of the token actually emitted
      entropy H(pi_j) in nats
      pi_sq   ||pi_j||^2
    """
    h, W, o, _, bias = _prep(h, W, o, torch.zeros(h.shape[0]), bias)
    tf = LogitTransform(logit_scale, softcap, temperature)
    N = h.shape[0]
    out = {k: torch.empty(N, dtype=h.dtype, device=h.device) for k in ("p_own", "entropy", "pi_sq")}
    for s in range(0, N, chunk_tokens):
        sl = slice(s, min(s + chunk_tokens, N))
        _, _, st = score_rows(h[sl], W, o[sl], bias, tf)
        for k, v in out.items():
            v[sl] = st[k]
    return out


# ----------------------------------------------------------------------------
# predicted shift: chunked O(N V d) and brute-force O(N^2 V)
# ----------------------------------------------------------------------------


@torch.no_grad()
def predicted_shift(
    h: torch.Tensor,
    W: torch.Tensor,
    o: torch.Tensor,
    A: torch.Tensor,
    eta: float,
    chunk_tokens: int = 1024,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """First-order change of every token's log-prob after one LM-head SGD step.

    Args:
        h: [N, d] final hidden states (input of the LM head), fixed.
        W: [V, d] LM-head weight. bias: optional [V], held fixed.
        o: [N] emitted token ids. A: [N] per-token weights (Eq. 2).
        eta: step size on J (which carries 1/N), W' = W + eta dJ/dW (Eq. 3).
        chunk_tokens: rows per block; extra memory ~ 3 * chunk_tokens * V + V * d
            floats (score rows, G h_j, one gather, the gradient G).
        temperature, logit_scale, softcap: the logit transform (module
            docstring); without softcap the kernel gets (logit_scale/temperature)^2.

    Returns dict of [N] tensors:
        delta       eta/N sum_k A_k K_jk                              (Eq. 9)
        self_term   eta/N A_j K_jj                              (k = j in Eq. 9)
        same_token  eta/N sum_{k!=j, o_k=o_j} A_k K_jk
        diff_token  delta - self_term - same_token (pairs with o_k != o_j)
        p_own, entropy   per-token confidence (see ``token_stats``)
    with K_jk = <h_j,h_k> <rho_j,rho_k> (= <h_j,h_k> phi_jk without transform).
    """
    h, W, o, A, bias = _prep(h, W, o, A, bias)
    tf = LogitTransform(logit_scale, softcap, temperature)
    N = h.shape[0]
    scale = eta / N

    # Pass 1: G = sum_k A_k rho_k h_k^T  [V, d], the LM-head gradient of N * J (Eq. 2)
    G = lm_head_grad(h, W, o, A, bias=bias, transform=tf, chunk_tokens=chunk_tokens)

    # Pass 2: delta_j = eta/N rho_j^T (G h_j)  (Eq. 9). Rows are visited in id-sorted
    # batches of whole groups, so the score rows computed here also serve the
    # same-token sums (no extra logits pass).
    delta, phi_self, p_own, ent = (torch.empty(N, dtype=h.dtype, device=h.device) for _ in range(4))
    same = torch.zeros(N, dtype=h.dtype, device=h.device)  # unscaled same-token sums

    def rows_pass(idx):  # [m] -> (q [m, V], s [m]); fills delta, phi_self and the confidence stats of idx
        q, sc, st = score_rows(h[idx], W, o[idx], bias, tf)  # rho_j = s_j e_{o_j} - q_j
        p_own[idx], ent[idx] = st["p_own"], st["entropy"]
        ar, oi = torch.arange(idx.numel(), device=h.device), o[idx]
        # ||rho_j||^2 = s_j^2 - 2 s_j q_j(o_j) + ||q_j||^2  (= 1 - 2 pi_j(o_j) + ||pi_j||^2 without transform; Eq. 8, k = j)
        phi_self[idx] = sc * sc - 2.0 * sc * q[ar, oi] + _rowdot(q, q)
        u = h[idx] @ G.T  # [m, V]  G h_j
        delta[idx] = sc * u[ar, oi] - _rowdot(q, u)  # rho_j^T (G h_j)
        return q, sc

    batches, big = _pack_groups(_id_groups(o), chunk_tokens)
    for idx, members in batches:
        q, sc = rows_pass(idx)  # [m, V], [m]
        if members:  # same-token coupling inside each whole group of the batch
            same[idx] = _same_in_groups(q, sc, h[idx], A[idx], o[idx], members, chunk_tokens)
        del q
    for g in big:
        for blk in torch.split(g, chunk_tokens):
            rows_pass(blk)
        _same_in_big_group(lambda idx: score_rows(h[idx], W, o[idx], bias, tf)[:2], h, A, g, int(o[g[0]]), chunk_tokens, same)
    delta *= scale
    same *= scale  # same_j = eta/N sum_{k != j, o_k = o_j} A_k K_jk
    self_term = scale * A * (h * h).sum(1) * phi_self
    return {
        "delta": delta,
        "self_term": self_term,
        "same_token": same,
        "diff_token": delta - self_term - same,
        "p_own": p_own,
        "entropy": ent,
    }


@torch.no_grad()
def predicted_shift_pairwise(
    h: torch.Tensor,
    W: torch.Tensor,
    o: torch.Tensor,
    A: torch.Tensor,
    eta: float,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """Brute-force reference for ``predicted_shift``: O(N^2 V) time, O(N V + N^2) memory.

    Materialises the score rows R [N, V] (rho_j; r_j = e_{o_j} - pi_j without
    transform) and the kernel K = (H H^T) * (R R^T) [N, N] (Eq. 7), then sums
    Eq. 9 over pairs. Returns the same keys as ``predicted_shift`` minus the
    confidence stats, plus ``kernel`` [N, N] (unscaled: no eta/N; includes
    (logit_scale/temperature)^2 without softcap).
    """
    h, W, o, A, bias = _prep(h, W, o, A, bias)
    tf = LogitTransform(logit_scale, softcap, temperature)
    N = h.shape[0]
    R = dense_scores(*score_rows(h, W, o, bias, tf)[:2], o)  # [N, V] rho_j
    phi = R @ R.T  # [N, N] <rho_j, rho_k>   (Eq. 8)
    del R
    K = (h @ h.T).mul_(phi)  # [N, N] <h_j,h_k> <rho_j,rho_k>   (Eq. 7)
    del phi
    scale = eta / N
    delta = scale * (K @ A)  # [N]   (Eq. 9)
    self_term = scale * K.diagonal() * A
    same_mask = o[:, None] == o[None, :]  # [N, N]
    same_mask.fill_diagonal_(False)
    same = scale * ((K * same_mask) @ A)
    return {
        "delta": delta,
        "self_term": self_term,
        "same_token": same,
        "diff_token": delta - self_term - same,
        "kernel": K,
    }


# ----------------------------------------------------------------------------
# Fig. 2: sampled pair statistics
# ----------------------------------------------------------------------------


@torch.no_grad()
def coupling_pairs(
    h: torch.Tensor,
    W: torch.Tensor,
    o: torch.Tensor,
    A: torch.Tensor,
    entropy_or_prob: str = "prob",
    n_pairs: int = 4096,
    generator: torch.Generator | None = None,
    low_conf_threshold: float | None = None,
    *,
    same_frac: float = 0.5,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_tokens: int = 1024,
) -> dict[str, torch.Tensor]:
    """Sample ordered token pairs (j, k), j != k, and their coupling factors (Fig. 2).

    Same-token pairs are rare, so ``round(same_frac * n_pairs)`` pairs are
    drawn uniformly among ordered same-token pairs (group v picked with
    probability proportional to n_v (n_v - 1)) and the rest uniformly among
    all ordered pairs; ``oversampled`` marks the first kind. Within a cell of
    ``coupling_cells`` both kinds are uniform over that cell's pairs, so cell
    statistics are unbiased; cell *frequencies* must come from the uniform
    draws only (``coupling_cells`` does that). If no id repeats, all pairs
    are uniform.

    Low confidence: entropy_or_prob="prob" -> pi_j(o_j) < threshold (default
    0.5); "entropy" -> H(pi_j) > threshold (default: the batch median).

    Args: h [N, d], W [V, d], o [N], A [N]; generator for reproducibility;
    temperature / logit_scale / softcap: the logit transform (module docstring).
    Returns dict of [n_pairs] tensors:
        j, k          token indices (long)
        hh            <h_j, h_k>
        phi           exact phi_jk = I[o_j=o_k] - pi_j(o_k) - pi_k(o_j) + <pi_j,pi_k>  (Eq. 8)
        phi_eq10      Eq. 10's form (same token: (1-pi_j(o))(1-pi_k(o)))
        contrib       A_k K_jk = A_k <h_j,h_k> <rho_j,rho_k>  (Fig. 2c; no eta/N;
                      = A_k <h_j,h_k> phi_jk (logit_scale/temperature)^2 without softcap)
        same_token    bool, o_j == o_k
        both_low_conf bool
        oversampled   bool, drawn by the same-token sampler
        conf_j, conf_k  the confidence measure used (prob or entropy)
    """
    if entropy_or_prob not in ("prob", "entropy"):
        raise ValueError(f"entropy_or_prob must be 'prob' or 'entropy', got {entropy_or_prob!r}")
    h, W, o, A, bias = _prep(h, W, o, A, bias)
    tf = LogitTransform(logit_scale, softcap, temperature)
    N = h.shape[0]
    if N < 2:
        raise ValueError("need at least two tokens to form a pair")
    stats = token_stats(h, W, o, bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                        chunk_tokens=chunk_tokens)
    if entropy_or_prob == "prob":
        conf = stats["p_own"]
        thr = 0.5 if low_conf_threshold is None else low_conf_threshold
        low = conf < thr
    else:
        conf = stats["entropy"]
        thr = conf.median().item() if low_conf_threshold is None else low_conf_threshold
        low = conf > thr

    # --- same-token draws: group v ~ n_v (n_v - 1), then j != k uniform in v
    groups = _id_groups(o, min_size=2)
    n_same = int(round(same_frac * n_pairs)) if groups else 0
    if n_same:
        sizes = torch.tensor([g.numel() for g in groups])  # [n_groups]
        members = torch.cat(groups)  # [M]
        starts = torch.cumsum(sizes, 0) - sizes  # [n_groups]
        gi = torch.multinomial((sizes * (sizes - 1)).double(), n_same, replacement=True, generator=generator)
        n = sizes[gi]
        a = (torch.rand(n_same, generator=generator) * n).long().clamp_max(n - 1)
        b = (torch.rand(n_same, generator=generator) * (n - 1)).long().clamp_max(n - 2)
        b = b + (b >= a).long()  # uniform over the group minus a
        js, ks = members[starts[gi] + a], members[starts[gi] + b]
    else:
        js = ks = torch.empty(0, dtype=torch.long)
    # --- uniform draws over ordered pairs j != k
    n_uni = n_pairs - n_same
    ju = torch.randint(N, (n_uni,), generator=generator)
    ku = torch.randint(N - 1, (n_uni,), generator=generator)
    ku = ku + (ku >= ju).long()
    j, k = torch.cat([js, ju]), torch.cat([ks, ku])  # [P]
    oversampled = torch.arange(n_pairs) < n_same

    # --- phi per pair, chunked over pairs: two [c, V] softmax blocks at a time
    P = j.numel()
    phi = torch.empty(P, dtype=h.dtype, device=h.device)
    phi10 = torch.empty(P, dtype=h.dtype, device=h.device)
    kern = torch.empty(P, dtype=h.dtype, device=h.device)  # <rho_j, rho_k>
    gain2 = (tf.logit_scale / tf.temperature) ** 2  # <rho_j, rho_k> = gain2 * phi_jk without softcap
    for s in range(0, P, chunk_tokens):
        sl = slice(s, min(s + chunk_tokens, P))
        jj, kk = j[sl], k[sl]
        c = jj.numel()
        pj = torch.softmax(_logits(h[jj], W, bias, tf), dim=-1)  # [c, V]
        pk = torch.softmax(_logits(h[kk], W, bias, tf), dim=-1)  # [c, V]
        same = (o[jj] == o[kk]).to(h.dtype)
        pj_ok = pj[torch.arange(c), o[kk]]  # pi_j(o_k)
        pk_oj = pk[torch.arange(c), o[jj]]  # pi_k(o_j)
        overlap = (pj * pk).sum(1)  # <pi_j, pi_k>
        del pj, pk
        phi[sl] = same - pj_ok - pk_oj + overlap  # Eq. 8
        # Eq. 10: same token -> (1 - pi_j(o))(1 - pi_k(o)); different -> Eq. 8 unchanged
        phi10[sl] = torch.where(same.bool(), (1 - pj_ok) * (1 - pk_oj), -pj_ok - pk_oj + overlap)
        if tf.linear:
            kern[sl] = phi[sl] * gain2 if gain2 != 1.0 else phi[sl]
        else:  # softcap: the slope dz/du differs per vocabulary entry
            qj, sj, _ = score_rows(h[jj], W, o[jj], bias, tf)
            qk, sk, _ = score_rows(h[kk], W, o[kk], bias, tf)
            kern[sl] = score_dot(qj, sj, o[jj], qk, sk, o[kk])
    hh = (h[j] * h[k]).sum(1)  # <h_j, h_k>
    return {
        "j": j,
        "k": k,
        "hh": hh,
        "phi": phi,
        "phi_eq10": phi10,
        "contrib": A[k] * hh * kern,  # A_k K_jk (Fig. 2c)
        "same_token": o[j] == o[k],
        "both_low_conf": low[j] & low[k],
        "oversampled": oversampled,
        "conf_j": conf[j],
        "conf_k": conf[k],
    }


def coupling_cells(pairs: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Summarise ``coupling_pairs`` output by Fig. 2's cells.

    Keys: "same_token&low_conf", "same_token&not_low_conf",
    "diff_token&low_conf", "diff_token&not_low_conf" ("low_conf" = both
    tokens low confidence). Each value holds
      n            pairs in the cell (all draws)
      frac_uniform fraction of the uniform draws that fall in the cell
                   (an unbiased estimate of the cell's share of all pairs)
      {hh,phi,contrib}_{mean,median,abs_mean}   floats (nan if n == 0)
    """
    same, low, over = pairs["same_token"], pairs["both_low_conf"], pairs["oversampled"]
    n_uni = int((~over).sum())
    out: dict[str, dict[str, Any]] = {}
    for s_name, s_val in (("same_token", True), ("diff_token", False)):
        for l_name, l_val in (("low_conf", True), ("not_low_conf", False)):
            m = (same == s_val) & (low == l_val)
            cell: dict[str, Any] = {
                "n": int(m.sum()),
                "frac_uniform": float((m & ~over).sum()) / n_uni if n_uni else float("nan"),
            }
            for q in ("hh", "phi", "contrib"):
                x = pairs[q][m].double()
                empty = x.numel() == 0
                cell[f"{q}_mean"] = float("nan") if empty else x.mean().item()
                cell[f"{q}_median"] = float("nan") if empty else x.median().item()
                cell[f"{q}_abs_mean"] = float("nan") if empty else x.abs().mean().item()
            out[f"{s_name}&{l_name}"] = cell
    return out


# ----------------------------------------------------------------------------
# the actual update (for checking the first-order prediction)
# ----------------------------------------------------------------------------


def lm_head_grad_step(
    model: torch.nn.Module | torch.Tensor,
    h: torch.Tensor,
    o: torch.Tensor,
    A: torch.Tensor,
    lr: float,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """One plain SGD ascent step on J (Eq. 2) w.r.t. the LM-head weight only.

    W' = W + lr * dJ/dW with J = 1/N sum_k A_k log softmax(z_k)[o_k], z_k =
    softcap(logit_scale (W h_k + b)) / tau (Eq. 3 restricted to W). The
    gradient comes from autograd, independent of the closed forms above (the
    logit transform is shared). h is detached, so with tied embeddings only
    the head computation sees W' (the input embedding, hence h, is unchanged).
    The model is NOT modified; the new weight is returned.

    Args:
        model: a causal LM (its ``get_output_embeddings()`` gives weight and
            bias; its config the logit scale and softcap, overriding the
            arguments) or the weight tensor [V, d] itself.
        h [N, d], o [N], A [N]; lr = eta of ``predicted_shift``.
    Returns dict: logp_old [N], logp_new [N], delta_logp [N] (Eq. 1),
        weight [V, d] the updated W, objective J (scalar, before the step).
    """
    tf = LogitTransform(logit_scale, softcap, temperature)
    if isinstance(model, torch.Tensor):
        W0 = model
    else:
        head = model.get_output_embeddings()
        W0 = head.weight
        if bias is None:
            bias = getattr(head, "bias", None)
        tf = LogitTransform.of(model, temperature)
    h, W0, o, A, bias = _prep(h, W0, o, A, bias)
    N = h.shape[0]
    W = W0.clone().requires_grad_(True)

    def logp_of(Wt):  # [N] log pi(o_j | s_j)
        return torch.log_softmax(_logits(h, Wt, bias, tf), dim=-1).gather(1, o[:, None]).squeeze(1)

    with torch.enable_grad():
        logp_old = logp_of(W)
        J = (A * logp_old).sum() / N  # Eq. 2
        (grad,) = torch.autograd.grad(J, W)
    with torch.no_grad():
        W_new = W.detach() + lr * grad  # Eq. 3: theta' = theta + eta grad J
        logp_new = logp_of(W_new)
    logp_old = logp_old.detach()
    return {
        "logp_old": logp_old,
        "logp_new": logp_new,
        "delta_logp": logp_new - logp_old,
        "weight": W_new,
        "objective": J.detach(),
    }
