"""Per-token log-probabilities, entropies and hidden states of a RolloutBatch,
without ever materialising the whole batch's `[N, V]` logits.

Why: with a 49k-token vocabulary, the logits of 16 x 256 response tokens are
16*256*49152*4 B = 805 MB in float32, and autograd keeps them (plus the
softmax) alive until backward. Here the decoder body runs once, the hidden
states of the N real response tokens are gathered into an `[N, H]` matrix, and
the LM head + log-softmax run over chunks of `chunk_tokens` rows. Under grad
each chunk is wrapped in non-reentrant activation checkpointing, so the
backward pass also recomputes and holds one chunk's logits at a time, and a
fused log-prob autograd Function keeps that at about two `[chunk, V]` float32
buffers (logits + their gradient). Peak logits memory is O(chunk * V) instead
of O(N * V): bench/forward_memory.py measures 4.0 GB -> 0.83 GB at N=4096,
V=49152, chunk_tokens=2048 (0.16 GB at 256).

Layout (RolloutBatch): prompts left-padded `[B, P]`, responses right-padded
`[B, T]`; the model sees `cat(prompt, response)` of length L = P + T.
Response token t of row b is predicted by the hidden state at position P-1+t.

Deliberate simplifications: the model must compute its logits as
`lm_head(last_hidden_state)` (optionally with Cohere's `logit_scale` or
Gemma-2's `final_logit_softcapping`, which are applied); the decoder body is
not chunked (its activations are O(L * H) per layer, far below O(L * V)).

Try it:
    from tokencredit.model.tiny import build_tiny
    from tokencredit.model.forward import forward_tokens
    model, tok = build_tiny()
    out = forward_tokens(model, batch, chunk_tokens=256, with_hidden=True)
    out["logprob"]  # [B, T] float32, 0 where response_mask == 0
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tokencredit.batch import RolloutBatch
from tokencredit.model.precision import compute_autocast

__all__ = ["forward_rows", "forward_tokens", "full_params", "is_fsdp", "lm_head_inputs", "naive_token_logprobs", "through_root"]


# ----------------------------------------------------------------- public API
def forward_tokens(
    model,
    batch: RolloutBatch,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 2048,
    with_entropy: bool = True,
    with_hidden: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token statistics of `batch.response_ids` under `model` at `temperature`.

    Returns a dict of `[B, T]` response-aligned tensors, exactly 0 wherever
    `response_mask == 0`:
      - "logprob": float32 (float64 for a float64 model; bf16 compute still gives
        float32), log softmax(logits / temperature)[token];
        differentiable when torch grad is enabled;
      - "entropy" (if with_entropy): float32, detached,
        H = logsumexp(z) - sum_v softmax(z)_v * z_v with z = logits / temperature;
      - "hidden" (if with_hidden): `[B, T, H]` float32, detached, the output of
        the second-to-last decoder layer (transformers' `hidden_states[-2]`) at
        the position predicting each token (the ResRL representation).

    Memory: one decoder-body pass plus about 2 x `[chunk_tokens, V]` float32
    buffers alive at a time, in forward and in backward. Note that
    `response_mask` is also the attention mask of the response part (see
    RolloutBatch.model_inputs), so a masked token is invisible to later ones.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if needs_root_call(model):  # FSDP2: run inside the root's __call__ (see `through_root`)
        return through_root(model, lambda: forward_tokens(model, batch, temperature=temperature, chunk_tokens=chunk_tokens,
                                                          with_entropy=with_entropy, with_hidden=with_hidden))

    with compute_autocast(model):  # bf16 compute on float32 parameters (model/precision.py); no-op otherwise
        return _forward_tokens(model, batch, temperature, chunk_tokens, with_entropy, with_hidden)


def _forward_tokens(model, batch: RolloutBatch, temperature: float, chunk_tokens: int, with_entropy: bool,
                    with_hidden: bool) -> dict[str, torch.Tensor]:
    """`forward_tokens` after its checks, in the model's compute dtype."""
    h_all, h_mid, (b_idx, t_idx, pos) = _body(model, batch, with_hidden=with_hidden)
    B, T = batch.response_ids.shape
    dev = h_all.device

    h_flat = h_all[b_idx, pos]  # [N, H] final hidden states feeding the LM head
    tgt = batch.response_ids.to(dev)[b_idx, t_idx]  # [N] target ids
    head = model.get_output_embeddings()
    scale, softcap = _logit_transform(model)

    need_grad = torch.is_grad_enabled() and (
        h_flat.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    N = h_flat.shape[0]
    lps, ents = [], []
    for s in range(0, max(N, 1), chunk_tokens):  # at least one (possibly empty) chunk keeps the graph
        h_c, t_c = h_flat[s : s + chunk_tokens], tgt[s : s + chunk_tokens]  # [n, H], [n]
        args = (h_c, t_c, head, float(temperature), scale, softcap, with_entropy)
        if need_grad:
            lp_c, ent_c = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            lp_c, ent_c = _chunk_stats(*args)
        lps.append(lp_c)
        ents.append(ent_c)

    out: dict[str, torch.Tensor] = {}
    idx = (b_idx, t_idx)
    lp_flat = torch.cat(lps)  # [N]
    dt = lp_flat.dtype  # float32 (float64 for a float64 model)
    out["logprob"] = torch.zeros(B, T, dtype=dt, device=dev).index_put(idx, lp_flat)  # [B, T]
    if with_entropy:
        ent_flat = torch.cat(ents)  # [N]
        out["entropy"] = torch.zeros(B, T, dtype=dt, device=dev).index_put(idx, ent_flat)
    if with_hidden:
        hm = _at_least_f32(h_mid[b_idx, pos].detach())  # [N, H]
        out["hidden"] = torch.zeros(B, T, hm.shape[-1], dtype=hm.dtype, device=dev).index_put(idx, hm)
    return out


@torch.no_grad()
def forward_rows(
    model,
    batch: RolloutBatch,
    *,
    micro_rows: int,
    temperature: float = 1.0,
    chunk_tokens: int = 2048,
    with_entropy: bool = True,
    with_hidden: bool = False,
) -> dict[str, torch.Tensor]:
    """`forward_tokens` over `batch` in micro-batches of `micro_rows` rows, no grad,
    in eval mode (the model's mode is restored afterwards): the one no-grad
    per-token forward of the trainer and the probes.

    Returns CPU tensors on the batch's own `[B, T]` grid (0 on padding):
    "logprob" [B, T], "entropy" [B, T] (with_entropy), "hidden" [B, T, H]
    (with_hidden). Each micro-batch is trimmed to its longest row, so the
    result does not depend on how rows are grouped beyond float rounding of
    the decoder on different padding.
    """
    if micro_rows < 1:
        raise ValueError(f"micro_rows must be >= 1, got {micro_rows}")
    B, T = batch.response_ids.shape
    dev = _device(model)
    was = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    with full_params(model):  # FSDP2: one gather for all micro-batches
        try:
            for s in range(0, B, micro_rows):
                sub = batch.select(range(s, min(B, s + micro_rows))).to(dev)
                out = forward_tokens(model, sub, temperature=temperature, chunk_tokens=chunk_tokens,
                                     with_entropy=with_entropy, with_hidden=with_hidden)
                for k, v in out.items():
                    pad = torch.zeros((v.shape[0], T) + tuple(v.shape[2:]), dtype=v.dtype)  # [b, T(, H)]
                    pad[:, : v.shape[1]] = v.cpu()
                    parts.setdefault(k, []).append(pad)
        finally:
            model.train(was)
    if not parts:  # no rows
        keys = ["logprob"] + (["entropy"] if with_entropy else [])
        return {k: torch.zeros(0, T) for k in keys}
    return {k: torch.cat(v, 0) for k, v in parts.items()}


@torch.no_grad()
def lm_head_inputs(model, batch: RolloutBatch, *, micro_rows: int | None = None) -> torch.Tensor:
    """`[B, T, H]` float32, detached, on the model's device: the final (post-norm)
    hidden state that the LM head maps to the logits predicting each response
    token; 0 on padding. Probes (e.g. the output-layer coupling proxy) build on it.
    micro_rows: rows per decoder pass (memory O(micro_rows * L * H) per layer);
    None = the whole batch in one pass."""
    B, T = batch.response_ids.shape
    if micro_rows is not None and micro_rows < 1:
        raise ValueError(f"micro_rows must be >= 1, got {micro_rows}")
    step = B if micro_rows is None else micro_rows
    out = None
    for s in range(0, B, max(step, 1)) if B else [0]:
        sub = batch if step >= B else batch.select(range(s, min(B, s + step)))  # select trims the padding columns
        with compute_autocast(model):
            h_all, _, (b_idx, t_idx, pos) = _body(model, sub, with_hidden=False)
        h = _at_least_f32(h_all[b_idx, pos])  # [n, H]
        if out is None:
            out = torch.zeros(B, T, h.shape[-1], dtype=h.dtype, device=h.device)  # [B, T, H]
        out.index_put_((b_idx + s, t_idx), h)
    return out


def naive_token_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Reference implementation for tests: one full `model(...)` call that
    materialises all `[B, L, V]` logits. Returns {"logprob", "entropy"}, both
    `[B, T]` float32, 0 on padding; "logprob" carries grad if enabled.
    Do not use in training (memory O(B * L * V))."""
    dev = _device(model)
    inputs = {k: v.to(dev) for k, v in batch.model_inputs().items()}
    with compute_autocast(model):
        logits = model(**inputs, use_cache=False).logits  # [B, L, V]
    P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    z = _at_least_f32(logits[:, P - 1 : P - 1 + T]) / temperature  # [B, T, V]
    logp = F.log_softmax(z, dim=-1)  # [B, T, V]
    ids = batch.response_ids.to(dev)
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # [B, T]
    ent = -(logp.exp() * logp).sum(-1).detach()  # [B, T]
    mask = batch.response_mask.to(dev) > 0
    zero = torch.zeros((), dtype=lp.dtype, device=dev)
    return {"logprob": torch.where(mask, lp, zero), "entropy": torch.where(mask, ent, zero)}


# ---------------------------------------------------------------- FSDP2
def is_fsdp(model) -> bool:
    """True when `fully_shard` (FSDP2) was applied to `model` itself (the root)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def full_params(model):
    """FSDP2: gather every sharded module's parameters once and keep them for the block,
    so the no-grad forwards inside (generation, old log-probs, probes) run no
    collectives: ranks may then run different numbers of forwards. Resharded on
    exit. Entering is a collective (every rank enters); nested entries and plain
    models are no-ops. Memory: the full model on every rank for the block's length,
    as a colocated vLLM engine holds it anyway.

    Assumes `dist.shard_model`'s settings (layers reshard after forward, the root
    does not, FSDP2's default) and restores exactly those. Do not call
    `state_dict()` inside the block: FSDP2 reshards every module before saving."""
    if not is_fsdp(model) or getattr(model, "_tc_full_params", False):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first
    model._tc_full_params = True
    try:
        model.set_reshard_after_forward(False)  # recursive: every layer keeps its gathered parameters
        for m in mods:
            m.unshard()
        yield
    except BaseException:
        model.reset_iter_state()  # a forward that raised leaves the root mid-forward; reshard would skip it
        raise
    finally:
        model._tc_full_params = False
        for m in mods[1:]:  # the layers reshard after forward again; the root never does (FSDP2's default)
            m.set_reshard_after_forward(True, recurse=False)
        for m in mods:
            m.reshard()


def needs_root_call(model) -> bool:
    """An FSDP2 root that is not already running its own `__call__`."""
    return is_fsdp(model) and not getattr(model, "_tc_in_root_call", False)


def through_root(model, fn):
    """`fn()` run as the forward of FSDP2 root `model`, so that its forward hooks fire.

    This file never calls `model.forward` (the decoder body and the LM head are
    called directly, to keep `[N, V]` logits out of memory), but FSDP2 gathers
    the root's own parameters (embeddings, final norm, LM head: tied ones
    included) in the root's pre-forward hook and reduce-scatters their gradients
    from the backward hooks it puts on the root's outputs. So the root is called
    with `fn` as its forward for this one call (an instance attribute shadows the
    class's forward), and `fn`'s returned tensors carry those hooks."""
    model.forward, model._tc_in_root_call = fn, True
    try:
        return model()
    finally:
        del model.forward
        model._tc_in_root_call = False


# ---------------------------------------------------------------- internals
def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or as is when it is float64 (the reference precision)."""
    return x if x.dtype == torch.float64 else x.float()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _decoder(model):
    """The decoder body (embeddings + layers + final norm, no LM head)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        dec = getattr(model, "base_model", None)
    if dec is None or dec is model:
        raise TypeError(f"{type(model).__name__} has no separate decoder body (get_decoder / base_model)")
    return dec


def _body(model, batch: RolloutBatch, with_hidden: bool):
    """Run the decoder body once over cat(prompt, response).

    Returns (h_final [B, L, H], h_mid [B, L, H] or None, (b_idx [N], t_idx [N], pos [N]))
    where (b_idx, t_idx) enumerate the real response tokens (row-major) and
    pos = P - 1 + t_idx is the position whose hidden state predicts them.
    """
    dev = _device(model)
    dec = _decoder(model)
    inputs = {k: v.to(dev) for k, v in batch.model_inputs().items()}  # each [B, L]

    captured: list[torch.Tensor] = []
    handle = None
    if with_hidden:
        layers = getattr(dec, "layers", None)
        if layers is None:
            raise TypeError(f"{type(dec).__name__} has no `.layers`; cannot hook the second-to-last layer")
        # hidden_states[-2] is the output of layers[-2]; with one layer it is the embedding output
        target = layers[-2] if len(layers) >= 2 else dec.get_input_embeddings()

        def _grab(_mod, _args, output):
            if not captured:  # first call only (a checkpointed recompute would call again)
                captured.append(output[0] if isinstance(output, tuple) else output)

        handle = target.register_forward_hook(_grab)
    # under FSDP2 every rank must run the same layer calls (each one gathers shards): always share there
    h_final = None if with_hidden else _shared_prompt_body(dec, batch, inputs, always=is_fsdp(model))
    try:
        if h_final is None:
            h_final = dec(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                position_ids=inputs["position_ids"],
                use_cache=False,
            ).last_hidden_state  # [B, L, H]
    finally:
        if handle is not None:
            handle.remove()

    P = batch.prompt_ids.shape[1]
    mask = batch.response_mask.to(dev) > 0  # [B, T]
    b_idx, t_idx = mask.nonzero(as_tuple=True)  # [N], [N]
    pos = t_idx + (P - 1)  # [N]
    return h_final, (captured[0] if with_hidden else None), (b_idx, t_idx, pos)


def _shared_prompt_body(dec, batch: RolloutBatch, inputs: dict[str, torch.Tensor], always: bool = False) -> torch.Tensor | None:
    """`[B, L, H]` final hidden states computed with each distinct prompt run once, or None when
    fewer than half the rows share a prompt (unless `always`: FSDP2, where a choice that
    depends on a rank's own rows would make ranks run different numbers of layer calls, each
    a collective gather, and deadlock).

    The G rows of a group repeat one prompt, and prompts are usually longer than responses, so
    most of a full `[B, L]` pass recomputes identical prompt states. Here the decoder runs the U
    distinct prompts `[U, P]` into a KV cache, the cache is copied to the B rows (`index_select`,
    differentiable: gradients of the G copies add up in the shared prompt states), and the
    responses `[B, T]` attend to it. Same values as the full pass up to float rounding; decoder
    FLOPs drop from B*L to U*P + B*T tokens.
    """
    from transformers import DynamicCache

    if getattr(dec, "gradient_checkpointing", False) and dec.training:
        return None  # HF turns the KV cache off under activation checkpointing: no cache to share
    P = batch.prompt_ids.shape[1]
    ids, attn, pos = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]  # [B, L] each
    key = torch.cat([ids[:, :P], attn[:, :P]], dim=1)  # [B, 2P]: a prompt and its padding
    uniq, inv = torch.unique(key, dim=0, return_inverse=True)  # [U, 2P], [B]
    if 2 * uniq.shape[0] > key.shape[0] and not always:
        return None
    u_mask = uniq[:, P:]  # [U, P]
    cache = DynamicCache(config=dec.config)
    h_prompt = dec(
        input_ids=uniq[:, :P], attention_mask=u_mask, position_ids=(u_mask.cumsum(-1) - 1).clamp(min=0),
        past_key_values=cache, use_cache=True,
    ).last_hidden_state  # [U, P, H]
    if cache.get_seq_length() != P:  # the model declined to fill the cache: use the plain pass
        return None
    cache.batch_select_indices(inv)  # every layer's K, V: [U, heads, P, d] -> [B, heads, P, d]
    h_resp = dec(
        input_ids=ids[:, P:], attention_mask=attn, position_ids=pos[:, P:], past_key_values=cache, use_cache=True,
    ).last_hidden_state  # [B, T, H]
    return torch.cat([h_prompt.index_select(0, inv), h_resp], dim=1)  # [B, L, H]


def _logit_transform(model) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcapping) that the model applies after its LM head."""
    cfg = getattr(model, "config", None)
    scale = getattr(cfg, "logit_scale", None) if cfg is not None else None
    softcap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
    return (float(scale) if scale is not None else 1.0), (float(softcap) if softcap else None)


class _TargetLogprob(torch.autograd.Function):
    """lp = z[tgt] - logsumexp(z) for the rows of z `[n, V]`; also returns lse `[n]`.

    Same value and gradient as `log_softmax(z).gather(tgt)`, but the backward
    pass builds dlp/dz = onehot(tgt) - softmax(z) in a single `[n, V]` buffer
    (autograd's gather + logsumexp backward allocate about three), which keeps
    the checkpointed chunk's backward peak at ~2 x `[n, V]` (saved z + grad).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, tgt: torch.Tensor):
        lse = torch.logsumexp(z, dim=-1)  # [n]
        lp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - lse  # [n]
        ctx.save_for_backward(z, tgt, lse)
        ctx.mark_non_differentiable(lse)
        return lp, lse

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_lse: torch.Tensor | None):
        z, tgt, lse = ctx.saved_tensors
        g = g.unsqueeze(-1)  # [n, 1]
        # d lp / d z = onehot(tgt) - softmax(z);   grad_z = g * that
        grad = (z - lse.unsqueeze(-1)).exp_().mul_(-g)  # [n, V] = -g * softmax(z)
        grad.scatter_add_(-1, tgt.unsqueeze(-1), g)
        return grad, None


def _chunk_stats(
    h: torch.Tensor,
    tgt: torch.Tensor,
    head: torch.nn.Module,
    temperature: float,
    scale: float,
    softcap: float | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `tgt` and entropy for one chunk of rows.

    h: [n, H] hidden states, tgt: [n] ids -> (logprob [n] float32, entropy [n] float32,
    detached; empty if not with_entropy).
    """
    z = _at_least_f32(head(h))  # [n, V] logits, upcast from bf16
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    if temperature != 1.0:
        z = z / temperature
    lp, lse = _TargetLogprob.apply(z, tgt)  # [n], [n] (lse carries no grad)
    if not with_entropy:
        return lp, lp.new_zeros(0)
    with torch.no_grad():
        # H = -sum p log p = logsumexp(z) - sum_v p_v z_v   (one [n, V] temporary)
        pz = (z - lse.unsqueeze(-1)).exp_().mul_(z)  # [n, V] p * z
        ent = lse - pz.sum(-1)  # [n]
    return lp, ent
