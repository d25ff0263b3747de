"""Mixed precision as the field does it: float32 master weights, bf16 compute.

`model.dtype` is the *compute* dtype. The parameters the optimizer updates (and
its state, and the checkpoints) are always float32 ("master weights"): an AdamW
step at the paper's lr 1e-6 moves a weight by ~1e-6, while the bf16 spacing at a
weight of 0.02 is 2^-6 * 2^-7 = 1.2e-4, so bf16 master weights would round almost
every update away (tests/test_precision.py: 1.4-3.0% of the elements change,
against > 99% with float32 masters; docs/results/precision.md on SmolLM2).

Where the compute dtype is applied:
    one process, DDP   float32 parameters; every forward (gradient, no-grad,
                       generation) runs under `torch.autocast(dtype)` via
                       `compute_autocast(model)`: matmuls in bf16, reductions
                       (norms, softmax, the loss) in float32
    FSDP2              float32 sharded parameters with
                       `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`
                       (tokencredit/dist.py `shard_model`): gathers and compute in
                       bf16, gradients reduced and stored in float32; the same
                       autocast on top keeps the ops' precision equal to one process
    vLLM, final/       the compute dtype (rollout.vllm_dtype=auto; export casts)

The model carries its compute dtype (`set_compute_dtype`), so every forward of
the package (model/forward.py, the HF sampler, the probes, evaluation) applies it
without a dtype argument threaded through their signatures.

float64 is accepted as a reference precision (master and compute float64, CPU):
tests compare two computation paths in it where float32 summation-order noise
would be larger than the bound worth asserting.

Deliberate simplification: no float16 training. float16 gradients underflow
without loss scaling (a GradScaler), which the trainer does not do; bf16 has
float32's exponent range and needs none.

Try it:
    model, tok = load_model("tiny-random", dtype=master_dtype("bfloat16"))
    set_compute_dtype(model, "bfloat16")
    with compute_autocast(model):
        out = model(**inputs)      # bf16 matmuls, float32 parameters
"""

from __future__ import annotations

import contextlib

import torch

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
HALF = (torch.bfloat16, torch.float16)

_ATTR = "_tc_compute_dtype"


class PrecisionError(ValueError):
    """A compute dtype this device cannot train in; the message names model.dtype."""


def parse(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16 (also float32, float16, float64)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    key = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "fp64": "float64", "double": "float64"}.get(key, key)
    if key not in COMPUTE_DTYPES:
        raise PrecisionError(f"model.dtype={dtype!r} is not a dtype; use one of: {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[key]


def master_dtype(compute: str | torch.dtype) -> torch.dtype:
    """The dtype of the trained parameters, the optimizer state and checkpoints for a
    compute dtype: float64 for float64, else float32."""
    return torch.float64 if parse(compute) == torch.float64 else torch.float32


def check_compute_dtype(compute: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The compute dtype, or PrecisionError (one line naming model.dtype) when training in
    it cannot work on `device`. Call before any model is loaded."""
    dt = parse(compute)
    dev = torch.device(device)
    if dt == torch.float16:
        raise PrecisionError("model.dtype=float16: float16 gradients underflow without loss scaling (a GradScaler), "
                             "which tokencredit does not do; use bfloat16 (same memory, float32's range) or float32")
    if dt == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(dev)
        raise PrecisionError(f"model.dtype=bfloat16: this GPU ({name}) has no bfloat16 support; use float32")
    if dt == torch.float64 and dev.type == "cuda":
        raise PrecisionError("model.dtype=float64 is a CPU reference precision for tests; use bfloat16 or float32 on a GPU")
    return dt


def set_compute_dtype(model: torch.nn.Module, compute: str | torch.dtype) -> torch.nn.Module:
    """Mark `model` to run its forwards in `compute` (its parameters keep their dtype).
    Returns the model."""
    setattr(model, _ATTR, parse(compute))
    return model


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype `model` computes in: its mark, else its parameters' dtype."""
    dt = getattr(model, _ATTR, None)
    return dt if dt is not None else next(model.parameters()).dtype


def compute_autocast(model: torch.nn.Module):
    """The context every forward of `model` runs in: `torch.autocast(compute dtype)`
    when the model computes in bf16/fp16 (its parameters float32, or FSDP2's bf16
    gathers), else a no-op. Nested entries are harmless."""
    dt = getattr(model, _ATTR, None)
    if dt not in HALF:
        return contextlib.nullcontext()
    dev = next(model.parameters()).device.type
    return torch.autocast(device_type=dev, dtype=dt)


def in_compute_dtype(fn):
    """Decorator: run `fn(model, ...)` inside `compute_autocast(model)`."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with compute_autocast(model):
            return fn(model, *args, **kwargs)

    return wrapper
