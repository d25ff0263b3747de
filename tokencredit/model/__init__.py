"""Models: loading (aliases, local dirs, GGUF, cached hub ids; offline only),
chunked per-token forward statistics, and tiny random models for tests.

Try it:
    from tokencredit.model import load_model, forward_tokens
    model, tok = load_model("tiny-random")
"""

from tokencredit.model.forward import forward_rows, forward_tokens, lm_head_inputs, naive_token_logprobs
from tokencredit.model.load import ALIASES, ModelLoadError, load_model, resolve_device, save_model
from tokencredit.model.tiny import build_tiny, build_tiny_tokenizer

__all__ = [
    "ALIASES",
    "ModelLoadError",
    "build_tiny",
    "build_tiny_tokenizer",
    "forward_rows",
    "forward_tokens",
    "lm_head_inputs",
    "load_model",
    "naive_token_logprobs",
    "resolve_device",
    "save_model",
]
