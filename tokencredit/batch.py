"""RolloutBatch: the one data structure every step of training is a function of.

One row per response. Token tensors are response-aligned `[B, T]` (right-padded);
prompts are left-padded `[B, P]` so `cat(prompt_ids, response_ids)` is a valid
causal-LM input. Per-row metadata is `[B]` tensors or Python lists of length B.

`response_mask` marks tokens that were *sampled* (real response tokens, EOS
included); prompt, padding and anything forced are 0. Every per-token function in
the package takes this mask and never lets padding leak into a mean, a quantile
or an SVD.

Optional fields are filled by later stages of the pipeline (see DESIGN.md):
reward -> advantage -> old_logprob / entropy / hidden -> token_weight.

On disk (`save_batch` / `load_batch`): PATH.safetensors holds the tensors,
PATH.json the pad id and the list fields; every probe command writes and reads
this pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

# fields that are [B, T] token tensors (right-padded) or [B, T, H]
_TOKEN_FIELDS = ("response_ids", "response_mask", "old_logprob", "sample_logprob", "entropy", "token_weight", "ratio_weight", "hidden")
# fields that are [B, P] prompt tensors (left-padded)
_PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
# fields that are [B] per-row tensors
_ROW_FIELDS = ("group_id", "reward", "advantage", "policy_version", "prompt_index")
# fields that are python lists of length B
_LIST_FIELDS = ("prompt_text", "response_text", "answer", "finished")


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] long/bool, 1 = real prompt token
    response_ids: torch.Tensor  # [B, T] long, right-padded
    response_mask: torch.Tensor  # [B, T] float, 1 = sampled response token
    group_id: torch.Tensor  # [B] long, rows of one prompt share it
    pad_id: int = 0
    reward: torch.Tensor | None = None  # [B] float
    advantage: torch.Tensor | None = None  # [B] float
    policy_version: torch.Tensor | None = None  # [B] long, policy step that sampled the row
    prompt_index: torch.Tensor | None = None  # [B] long, index of the row's prompt in the training data
    old_logprob: torch.Tensor | None = None  # [B, T] float, policy at update start
    sample_logprob: torch.Tensor | None = None  # [B, T] float, from the sampler
    entropy: torch.Tensor | None = None  # [B, T] float
    token_weight: torch.Tensor | None = None  # [B, T] float, multiplies A per token
    ratio_weight: torch.Tensor | None = None  # [B, T] float, multiplies the clipped term (importance correction)
    hidden: torch.Tensor | None = None  # [B, T, H] float, second-to-last layer (ResRL)
    prompt_text: list[str] = field(default_factory=list)
    response_text: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # response ended with EOS

    # ------------------------------------------------------------------ shape
    def __post_init__(self):
        B = self.response_ids.shape[0]
        for name in _PROMPT_FIELDS + _TOKEN_FIELDS + _ROW_FIELDS:
            v = getattr(self, name)
            if v is not None and v.shape[0] != B:
                raise ValueError(f"RolloutBatch.{name} has {v.shape[0]} rows, expected {B}")
        for name in _LIST_FIELDS:
            v = getattr(self, name)
            if v and len(v) != B:
                raise ValueError(f"RolloutBatch.{name} has {len(v)} rows, expected {B}")

    def __len__(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> torch.Tensor:
        """[B] long: number of real response tokens per row."""
        return self.response_mask.sum(-1).long()

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Full causal-LM input: `input_ids`, `attention_mask`, `position_ids`, all [B, P+T].

        Position ids count real tokens only, so left padding does not shift them
        (the same convention HF `generate` uses for left-padded batches).
        """
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attn = torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos}

    # ------------------------------------------------------------- selection
    def select(self, rows: Sequence[int] | torch.Tensor) -> "RolloutBatch":
        """Rows `rows` (in that order) as a new batch; token tensors are trimmed to
        the longest kept response/prompt so a mini-batch never carries dead columns."""
        idx = torch.as_tensor(list(rows) if not isinstance(rows, torch.Tensor) else rows, dtype=torch.long)
        kw: dict[str, Any] = {"pad_id": self.pad_id}
        for f in fields(self):
            name = f.name
            if name == "pad_id":
                continue
            v = getattr(self, name)
            if name in _LIST_FIELDS:
                kw[name] = [v[i] for i in idx.tolist()] if v else []
            elif v is None:
                kw[name] = None
            else:
                kw[name] = v.index_select(0, idx.to(v.device))
        out = RolloutBatch(**kw)
        return out._trim()

    def _trim(self) -> "RolloutBatch":
        if len(self) == 0:
            return self
        T = int(self.response_mask.sum(-1).max().item()) if self.response_mask.numel() else 0
        T = max(T, 1)
        P = int(self.prompt_mask.sum(-1).max().item())
        P = max(P, 1)
        for name in _TOKEN_FIELDS:
            v = getattr(self, name)
            if v is not None and v.shape[1] > T:
                setattr(self, name, v[:, :T].contiguous())
        for name in _PROMPT_FIELDS:
            v = getattr(self, name)
            if v.shape[1] > P:
                setattr(self, name, v[:, -P:].contiguous())
        return self

    def to(self, device: torch.device | str) -> "RolloutBatch":
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                setattr(self, f.name, v.to(device))
        return self

    # --------------------------------------------------------------- concat
    @staticmethod
    def concat(batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        """Stack batches row-wise, padding prompts on the left and responses on the
        right. Optional fields survive only if every batch has them."""
        batches = [b for b in batches if len(b) > 0]
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one non-empty batch")
        if len(batches) == 1:
            return batches[0]
        pad_id = batches[0].pad_id
        P = max(b.prompt_ids.shape[1] for b in batches)
        T = max(b.response_ids.shape[1] for b in batches)
        kw: dict[str, Any] = {"pad_id": pad_id}
        for f in fields(RolloutBatch):
            name = f.name
            if name == "pad_id":
                continue
            vals = [getattr(b, name) for b in batches]
            if name in _LIST_FIELDS:
                kw[name] = sum((list(v) for v in vals), []) if all(vals) else []
                continue
            if any(v is None for v in vals):
                kw[name] = None
                continue
            if name in _PROMPT_FIELDS:
                fill = pad_id if name == "prompt_ids" else 0
                vals = [_pad_to(v, P, left=True, value=fill) for v in vals]
            elif name in _TOKEN_FIELDS:
                fill = pad_id if name == "response_ids" else 0
                vals = [_pad_to(v, T, left=False, value=fill) for v in vals]
            kw[name] = torch.cat(vals, dim=0)
        return RolloutBatch(**kw)

    # ------------------------------------------------------------- persist
    def state_dict(self) -> dict[str, Any]:
        """Tensors and lists only (safetensors/json friendly)."""
        out: dict[str, Any] = {"pad_id": self.pad_id}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "pad_id" and v is not None:
                out[f.name] = v
        return out

    @staticmethod
    def from_state_dict(d: dict[str, Any]) -> "RolloutBatch":
        return RolloutBatch(**d)


def save_batch(batch: RolloutBatch, path: str | Path) -> Path:
    """RolloutBatch -> PATH.safetensors (tensors) + PATH.json (pad_id, lists); returns the .safetensors path."""
    from safetensors.torch import save_file

    p = Path(path).with_suffix(".safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = batch.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(p))
    p.with_suffix(".json").write_text(json.dumps(meta))
    return p


def load_batch(path: str | Path) -> RolloutBatch:
    """Inverse of `save_batch`; PATH may name either file or the common stem."""
    from safetensors.torch import load_file

    p = Path(path)
    st, js = p.with_suffix(".safetensors"), p.with_suffix(".json")
    if not st.is_file() or not js.is_file():
        raise FileNotFoundError(f"batch {path}: need {st.name} and {js.name} side by side (written by `tokencredit probe ...`)")
    d: dict[str, Any] = dict(load_file(str(st)))
    d.update(json.loads(js.read_text()))
    return RolloutBatch.from_state_dict(d)


def _pad_to(x: torch.Tensor, n: int, left: bool, value: float) -> torch.Tensor:
    """Pad dim 1 of `x` ([B, L, ...]) to length n on the left or right."""
    extra = n - x.shape[1]
    if extra <= 0:
        return x
    pad_shape = (x.shape[0], extra) + tuple(x.shape[2:])
    pad = torch.full(pad_shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)
