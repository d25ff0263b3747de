"""The LM head as the output-layer probes see it: logits of fixed final hidden
states, per-token scores and the LM-head gradient of Eq. 2, with one logit
transform.

What it does
    Logits are those of ``tokencredit.model.forward`` (``_chunk_stats``):

        u = W h + b                                   [V]   the head's output
        z = softcap(logit_scale * u) / temperature    [V]   softcap(x) = c tanh(x / c), or x
        pi = softmax(z)

    ``LogitTransform`` holds (logit_scale, softcap, temperature); ``of(model)``
    reads the first two from the model's config (Cohere's ``logit_scale``,
    Gemma-2's ``final_logit_softcapping``), as the forward pass does.

    The score of token k in head-output space is

        rho_k = d log pi_k(o_k) / d u_k = (dz/du)_k * r_k      [V],  r_k = e_{o_k} - pi_k  (Eq. 6)

    with dz/du = logit_scale / temperature (a constant) without softcap and
    logit_scale (1 - tanh^2(logit_scale u / c)) / temperature with it. Since
    u is linear in W, d log pi_k(o_k) / dW = rho_k h_k^T, and the LM-head
    gradient of sum_k A_k log pi_k(o_k) (Eq. 2 without its 1/N) is

        G = sum_k A_k rho_k h_k^T                              [V, d]

    (``lm_head_grad``). Without scale, softcap and temperature rho_k = r_k and
    G = sum_k A_k r_k h_k^T, the paper's form. Both output-layer probes use it:
    ``coupling.predicted_shift`` (first-order Delta log p, Eq. 9) and
    ``masking.lm_head_masking`` (the exact LM-head-only step).

Try it
    from tokencredit.probes.lm_head import LogitTransform, lm_head_grad, lm_head_of
    W, bias, tf = lm_head_of(model, temperature=1.0)
    G = lm_head_grad(h, W, o, A, bias=bias, transform=tf)   # h [N, d], o [N], A [N] -> [V, d]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LogitTransform", "lm_head_of", "score_rows", "dense_scores", "score_dot", "lm_head_grad"]


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap(logit_scale * u) / temperature of the head output u (module docstring)."""

    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.softcap is not None and self.softcap <= 0:
            raise ValueError(f"softcap must be > 0 or None, got {self.softcap}")

    @classmethod
    def of(cls, model, temperature: float = 1.0) -> "LogitTransform":
        """The model's logit scale and final-logit softcap (``forward._logit_transform``)."""
        from tokencredit.model.forward import _logit_transform

        scale, softcap = _logit_transform(model)
        return cls(scale, softcap, float(temperature))

    @property
    def linear(self) -> bool:
        """No softcap: z = (logit_scale / temperature) u."""
        return self.softcap is None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """u [..., V] head outputs -> z [..., V] logits (u itself when the transform is the identity)."""
        z = u * self.logit_scale if self.logit_scale != 1.0 else u
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z / self.temperature if self.temperature != 1.0 else z

    def slope(self, z: torch.Tensor) -> torch.Tensor | float:
        """dz/du at logits z [..., V]: a float without softcap, else a tensor like z."""
        s = self.logit_scale / self.temperature
        if self.softcap is None:
            return s
        t = z * (self.temperature / self.softcap)  # tanh(logit_scale u / softcap)
        return (1.0 - t * t) * s


def lm_head_of(model, temperature: float = 1.0, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(W [V, d], bias [V] or None, LogitTransform) of `model`'s output layer,
    detached copies in `dtype` on `device`."""
    head = model.get_output_embeddings()
    W = head.weight.detach().to(device=device, dtype=dtype)
    b = getattr(head, "bias", None)
    bias = None if b is None else b.detach().to(device=device, dtype=dtype)
    return W, bias, LogitTransform.of(model, temperature)


def score_rows(
    h: torch.Tensor,
    W: torch.Tensor,
    o: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
    *,
    with_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Scores and confidence of a block of tokens, in h's dtype.

    h [n, d] final hidden states, W [V, d], o [n] emitted ids, bias [V] or None.
    The score rho_k = (dz/du)_k * (e_{o_k} - pi_k) is returned split as

        rho_k = s_k e_{o_k} - q_k,   q_k = (dz/du)_k * pi_k  [V],   s_k = (dz/du)_k[o_k]

    (q [n, V], s [n]) so that dot products keep the one-hot term out of long
    float sums (``score_dot``); ``dense_scores`` builds rho [n, V]. Also returns
    stats (empty unless with_stats), [n] tensors: p_own = pi_k(o_k), entropy =
    H(pi_k) in nats, pi_sq = ||pi_k||^2. Memory: about two [n, V] buffers.
    """
    u = h @ W.T  # [n, V]
    if bias is not None:
        u += bias
    z = transform(u)  # [n, V]
    del u
    slope = transform.slope(z)  # dz/du: float or [n, V]
    z.sub_(z.amax(1, keepdim=True))  # shifted logits, in place (z is a fresh tensor: u's matmul output at the latest)
    ar = torch.arange(h.shape[0], device=h.device)
    stats: dict[str, torch.Tensor] = {}
    if with_stats:
        pi = torch.exp(z)  # [n, V] unnormalised
        tot = pi.sum(1)  # [n]
        pi.div_(tot[:, None])
        stats = {
            "p_own": pi[ar, o],
            "entropy": tot.log_() - _rowdot(pi, z),  # H = logsumexp(z) - E_pi[z]
            "pi_sq": _rowdot(pi, pi),
        }
    else:
        pi = z.exp_()  # [n, V] unnormalised, in place
        pi.div_(pi.sum(1, keepdim=True))
    del z
    if isinstance(slope, torch.Tensor):
        s = slope[ar, o]  # [n]
        q = pi.mul_(slope)
    else:
        s = torch.full((h.shape[0],), slope, dtype=h.dtype, device=h.device)
        q = pi.mul_(slope) if slope != 1.0 else pi
    return q, s, stats


def dense_scores(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """rho [n, V] = s_k e_{o_k} - q_k from ``score_rows``' (q [n, V], s [n]); reuses q's memory."""
    rho = q.neg_()
    rho[torch.arange(q.shape[0], device=q.device), o] += s
    return rho


def score_dot(qa, sa, oa, qb, sb, ob) -> torch.Tensor:
    """<rho_a, rho_b> row by row for two blocks of ``score_rows`` output:
    qa, qb [n, V], sa, sb [n], oa, ob [n] ids -> [n]
    = sa sb 1[oa = ob] - sa qb[oa] - sb qa[ob] + <qa, qb>."""
    ar = torch.arange(qa.shape[0], device=qa.device)
    same = (oa == ob).to(qa.dtype)
    return sa * sb * same - sa * qb[ar, oa] - sb * qa[ar, ob] + _rowdot(qa, qb)


def lm_head_grad(
    h: torch.Tensor,
    W: torch.Tensor,
    o: torch.Tensor,
    A: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    transform: LogitTransform = LogitTransform(),
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """G = sum_k A_k rho_k h_k^T  [V, d]: the gradient w.r.t. W of
    sum_k A_k log pi_k(o_k) (Eq. 2 times N), in h's dtype.

    h [N, d] final hidden states (fixed), W [V, d] LM-head weight, o [N] ids,
    A [N] per-token weights, bias [V] or None (fixed). Rows are processed in
    blocks of `chunk_tokens`: never an [N, V] tensor; memory about
    3 x [chunk_tokens, V] + [V, d].
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    N, d = h.shape
    if W.shape[1] != d or o.shape != (N,) or A.shape != (N,):
        raise ValueError(f"expected h [N, d], W [V, d], o [N], A [N]; got {tuple(h.shape)}, {tuple(W.shape)}, "
                         f"{tuple(o.shape)}, {tuple(A.shape)}")
    G = torch.zeros(W.shape[0], d, dtype=h.dtype, device=h.device)
    A = A.to(h.dtype)
    for s in range(0, N, chunk_tokens):
        sl = slice(s, min(s + chunk_tokens, N))
        rho = dense_scores(*score_rows(h[sl], W, o[sl], bias, transform, with_stats=False)[:2], o[sl])  # [c, V]
        G.addmm_(rho.T, A[sl, None] * h[sl])  # G += sum_k rho_k (A_k h_k)^T
    return G


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without an [n, V] temporary. a, b [n, V] -> [n]"""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
