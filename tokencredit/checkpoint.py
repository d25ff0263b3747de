"""Atomic, resumable checkpoints without pickle.

A checkpoint is a directory `checkpoints/step_N/` holding
    model.safetensors       policy weights (tied weights saved once)
    state.safetensors       every other tensor: optimizer moments, RNG states,
                            buffer contents (flattened keys)
    state.json              everything else: step counters, scheduler, optimizer
                            hyper-parameters, metadata (same nested structure;
                            tensors replaced by {"__tensor__": key})
It is written to a temporary sibling directory and renamed into place, so a
crash mid-write never leaves a half checkpoint that `--resume` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested dict/list by references; collect them."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "t"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensors) for k, v in obj.items()} | (
            {"__intkeys__": True} if obj and all(isinstance(k, int) for k in obj) else {}
        )
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        intkeys = obj.get("__intkeys__", False)
        out = {(int(k) if intkeys else k): _unflatten(v, tensors) for k, v in obj.items() if k != "__intkeys__"}
        return out
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep_last: int = 2,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `ckpt_root/step_{step}` atomically; prune older ones beyond keep_last.
    weights: {name: tensor} to store instead of `model`'s own (an FSDP2 model's
    gathered full weights, one name per tied parameter)."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp-step_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if weights is None:
        save_model(model, str(tmp / "model.safetensors"))
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(state, "", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    with open(tmp / "state.json", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into `model` (in place) and return the state dict."""
    st = read_checkpoint(path)
    load_model_weights(path, model)
    return st


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into `model` in place (tied aliases filled in), without
    reading its state: for a caller that already holds `read_checkpoint`'s result."""
    load_model(model, str(Path(path) / "model.safetensors"))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """{name: tensor} of a checkpoint's model.safetensors (tied aliases stored once)."""
    return load_file(str(Path(path) / "model.safetensors"))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state (counters, optimizer, RNG, buffer), without touching a model."""
    p = Path(path)
    missing = [f for f in ("model.safetensors", "state.safetensors", "state.json") if not (p / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {p} is incomplete (missing {', '.join(missing)})")
    tensors = load_file(str(p / "state.safetensors"))
    meta = json.loads((p / "state.json").read_text())
    return _unflatten(meta, tensors)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and d.is_dir() and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    cks = list_checkpoints(root)
    return cks[-1] if cks else None
