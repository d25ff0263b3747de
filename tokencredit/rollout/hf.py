"""Rollouts with `transformers.generate`: the default engine on CPU and GPU.

Prompts (already rendered with the chat template) are left-padded, each repeated
`n` times so a group's rows are adjacent, and sampled in chunks of
`gen_batch_size` rows. Responses are cut at the first EOS (EOS kept and
masked in: it is a sampled action), right-padded with the pad id.

Deliberate simplifications: no sampler log-probs are kept (the trainer recomputes
log-probs with its own forward, as verl does by default); sampling randomness
comes from torch's global RNG so a seeded run (and a resumed one) reproduces.
"""

from __future__ import annotations

import torch

from tokencredit.batch import RolloutBatch
from tokencredit.model.forward import full_params, is_fsdp, through_root
from tokencredit.model.precision import HALF, compute_autocast, compute_dtype


HF_CACHES = ("auto", "dynamic", "static")


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a response: the generation config's EOS id(s) and the tokenizer's."""
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return sorted(ids)


def response_mask_from_ids(response_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] generated ids -> ([B, T] float mask up to and including the first EOS,
    [B] bool finished). Tokens after the first EOS are padding."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    # number of EOS seen strictly before position t
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (before == 0).float()
    return mask, is_eos.any(dim=1)


@torch.no_grad()
def _shared_prompt_cache(model, ids: torch.Tensor, am: torch.Tensor):
    """KV cache of every prompt but its last token, computed once per distinct prompt and copied to
    its rows; None when fewer than half the rows share a prompt. `generate` then prefills only the
    last prompt token: the n rows of a group no longer recompute one prompt n times.

    ids, am: [R, P] left-padded prompt rows of one generate call.
    """
    from transformers import DynamicCache

    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        return None
    uniq, inv = torch.unique(torch.cat([ids, am], dim=1), dim=0, return_inverse=True)  # [U, 2P], [R]
    if ids.shape[1] < 2 or 2 * uniq.shape[0] > ids.shape[0]:
        return None
    P = ids.shape[1]
    u_ids, u_mask = uniq[:, : P - 1], uniq[:, P : 2 * P - 1]  # [U, P-1]
    cache = DynamicCache(config=model.config)

    def prefill():
        return dec(input_ids=u_ids, attention_mask=u_mask, position_ids=(u_mask.cumsum(-1) - 1).clamp(min=0),
                   past_key_values=cache, use_cache=True).last_hidden_state

    through_root(model, prefill) if is_fsdp(model) else prefill()
    cache.batch_select_indices(inv)  # [U, ...] -> [R, ...]
    return cache


def _autocast_over_full_precision(model) -> bool:
    """True when `model` computes in bf16/fp16 by autocast over float32 parameters (model/precision.py),
    where transformers' rotary embedding returns float32 keys beside half-precision values."""
    return compute_dtype(model) in HALF and next(model.parameters()).dtype not in HALF


@torch.no_grad()
def generate_hf(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    gen_batch_size: int = 32,
    group_offset: int = 0,
    answers: list[str] | None = None,
    cache: str = "auto",
) -> RolloutBatch:
    """Sample `n` responses for each rendered prompt.

    cache: "dynamic" (transformers' growing DynamicCache; the n rows of a prompt
    share one prefill, see `_shared_prompt_cache`), "static" (a preallocated
    StaticCache of prompt + max_new_tokens per row: no per-step concatenation,
    but every row prefills its own prompt) or "auto": dynamic for a generate
    call whose rows share prompts (groups), static otherwise (dynamic always
    under bf16 autocast over float32 weights, where transformers' rotary
    embedding gives float32 keys beside bf16 values). Measured with
    SmolLM2 on this project's 2-core CPU (bench/rollout_backends.py): 4 prompts
    x 8 rows, 32 new tokens, dynamic 230-250 tok/s vs static 150; 32 MATH-500
    prompts x 1 row, 32 new tokens, static 25.4 vs dynamic 18-20. The same
    tokens under greedy decoding (tests/test_rollout.py); under sampling only
    the order of random draws may differ.

    Returns a RolloutBatch with B = len(prompts) * n rows, group ids
    group_offset + prompt index, rows of one group adjacent.
    """
    if cache not in HF_CACHES:
        raise ValueError(f"cache must be one of {', '.join(HF_CACHES)}, got {cache!r}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(tokenizer, model)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0)  # [B, P]
    prompt_mask = enc["attention_mask"].repeat_interleave(n, dim=0)
    B = prompt_ids.shape[0]
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    # FSDP2 (torchrun): the parameters are gathered once for the whole call (full_params), so decoding
    # steps run no collectives and each rank stops when its own rows are done: no lockstep, and no
    # torch.compile of the sharded root's __call__ (HF compiles static-cache generation on CUDA)
    gen_kwargs["synced_gpus"] = False
    if is_fsdp(model):
        gen_kwargs["disable_compile"] = True
    chunks = []
    was_training = model.training
    model.eval()
    with full_params(model), compute_autocast(model):  # bf16 compute on float32 parameters (model/precision.py)
        for s in range(0, B, gen_batch_size):
            ids = prompt_ids[s : s + gen_batch_size].to(device)
            am = prompt_mask[s : s + gen_batch_size].to(device)
            kv = _shared_prompt_cache(model, ids, am) if cache != "static" else None
            if kv is not None:
                extra = {"past_key_values": kv}
            elif _autocast_over_full_precision(model):  # keys float32, values bf16: only a growing cache holds both
                if cache == "static":
                    raise ValueError("cache='static' under bf16 compute over float32 weights (model.dtype=bfloat16): "
                                     "keys and values come out in different dtypes; use 'dynamic' or 'auto'")
                extra = {}
            else:
                extra = {"cache_implementation": "static"} if cache != "dynamic" else {}
            out = model.generate(input_ids=ids, attention_mask=am, **gen_kwargs, **extra)
            chunks.append(out[:, ids.shape[1] :].cpu())
    if was_training:
        model.train()
    T = max(c.shape[1] for c in chunks)
    response_ids = torch.full((B, max(T, 1)), pad_id, dtype=torch.long)
    row = 0
    for c in chunks:
        response_ids[row : row + c.shape[0], : c.shape[1]] = c
        row += c.shape[0]
    mask, finished = response_mask_from_ids(response_ids, eos_ids)
    # whatever follows the first EOS becomes padding
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    texts = tokenizer.batch_decode([r[m.bool()] for r, m in zip(response_ids, mask)], skip_special_tokens=True)
    group_id = torch.arange(len(prompts)).repeat_interleave(n) + group_offset
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=mask,
        group_id=group_id,
        pad_id=int(pad_id),
        prompt_text=[p for p in prompts for _ in range(n)],
        response_text=texts,
        answer=[a for a in answers for _ in range(n)] if answers is not None else [],
        finished=finished.tolist(),
    )._trim()
