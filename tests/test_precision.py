"""Mixed precision (tokencredit/model/precision.py): float32 master weights, bf16 compute.

bf16 runs on this CPU (torch autocast), so none of this needs a GPU.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.test_dist import BF16_REL, U_BF16, _fixed_batch, _norm_rel
from tokencredit.config import load_config
from tokencredit.model.precision import (PrecisionError, check_compute_dtype, compute_autocast, compute_dtype, master_dtype,
                                         set_compute_dtype)

U_F32 = 2.0**-24


def _changed_fraction(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """Per 2-D parameter with a gradient: the fraction of its elements with a nonzero gradient
    whose value changed in the step (an element with a zero gradient has no reason to move)."""
    out = {}
    for n, p in model.named_parameters():
        if p.dim() == 2 and p.grad is not None:
            live = p.grad != 0
            assert live.any(), n
            out[n] = float((p.detach() != before[n])[live].float().mean())
    return out


def _trainer(digits_file, tmp_path, name: str, **extra):
    from tokencredit.trainer import Trainer

    return Trainer(load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": name, **extra})))


def test_bf16_run_keeps_float32_masters_and_an_adam_step_at_lr_1e6_moves_every_weight(digits_file, tmp_path):
    """The paper's lr 1e-6 with model.dtype=bfloat16: one AdamW step moves every weight that has a
    gradient (an Adam step is ~lr = 1e-6, far above float32's spacing at 0.02, 2^-29 = 1.9e-9).
    Negative control: the same step on bf16 parameters (the old behaviour) leaves almost all of them
    unchanged: bf16's spacing at 0.02 is 2^-6 * 2^-7 = 1.2e-4, so a 1e-6 step rounds away unless
    |w| < ~2.6e-4 (about 1% of N(0, 0.02) weights)."""
    tr = _trainer(digits_file, tmp_path, "bf16", **{"model.dtype": "bfloat16", "train.lr": 1e-6, "train.warmup_steps": 0,
                                                    "train.mini_batch_size": 4})
    assert compute_dtype(tr.model) == torch.bfloat16
    assert {p.dtype for p in tr.model.parameters()} == {torch.float32}  # master weights
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.update(_fixed_batch())
    assert tr.optim_steps == 1
    assert {v.dtype for st in tr.optimizer.state.values() for v in st.values() if v.is_floating_point() and v.dim()} == {torch.float32}
    fr = _changed_fraction(before, tr.model)
    assert len(fr) >= 14 and min(fr.values()) > 0.99, fr

    # negative control: bf16 master weights, same batch, same step
    from tokencredit.update import LossSpec, micro_batches, optimizer_step

    m16 = copy.deepcopy(tr.model).to(torch.bfloat16)
    m16.load_state_dict({n: v.to(torch.bfloat16) for n, v in before.items()}, strict=False)
    b = _fixed_batch()
    from tokencredit.model.forward import forward_rows

    b.old_logprob = forward_rows(m16, b, micro_rows=16, with_entropy=False)["logprob"]
    snap = {n: p.detach().clone() for n, p in m16.named_parameters()}
    optimizer_step(m16, torch.optim.AdamW(m16.parameters(), lr=1e-6, weight_decay=0.0), micro_batches(b, 16), LossSpec())
    fr16 = _changed_fraction(snap, m16)
    assert max(fr16.values()) < 0.1, fr16  # measured 0.014-0.030 (15 tensors)


def test_bf16_gradient_agrees_with_the_float64_gradient():
    """bf16 compute on float32 masters vs the same model in float64, one policy-gradient backward.
    Bound: BF16_REL = 2 * sqrt(R) * u_bf16 of the gradient's norm (tests/test_dist.py: R bf16 roundings
    on the path add like a random walk). float32 compute, the control: within 2 * 5 * u32 (transformers'
    float32 RMSNorm is the precision floor, as in tests/test_dist.py), and bf16 is measurably not float32
    (> 10 * that), so autocast really ran."""
    from tests.test_update import _batch
    from tokencredit.model.forward import forward_rows
    from tokencredit.model.tiny import build_tiny
    from tokencredit.update import LossSpec, micro_batches, optimizer_step

    torch.set_num_threads(1)
    base = build_tiny(seed=5, hidden=32, layers=2, heads=4, tie=False)[0]
    b = _batch(B=8, T=7, seed=3)
    b.old_logprob = forward_rows(base.double(), b, micro_rows=8, with_entropy=False)["logprob"].float() - 0.05

    def grads(model):
        optimizer_step(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batches(b, 4), LossSpec(), grad_clip=None)
        return {n: p.grad for n, p in model.named_parameters()}

    g64 = grads(copy.deepcopy(base).double())
    g32 = grads(copy.deepcopy(base).float())
    g16 = grads(set_compute_dtype(copy.deepcopy(base).float(), "bfloat16"))
    f32_bound = 2 * 5 * U_F32
    for n in g64:
        assert g16[n].dtype == torch.float32  # gradients of the float32 masters
        assert _norm_rel(g16[n], g64[n]) <= BF16_REL, (n, _norm_rel(g16[n], g64[n]))
        assert _norm_rel(g32[n], g64[n]) <= f32_bound, (n, _norm_rel(g32[n], g64[n]))
    assert max(_norm_rel(g16[n], g32[n]) for n in g64) > 10 * f32_bound  # the bf16 run computed in bf16
    assert BF16_REL == pytest.approx(2 * math.sqrt(38) * U_BF16)


def test_bf16_run_resumes_bit_identically_and_exports_bf16(digits_file, tmp_path):
    """3 steps of bf16 compute straight vs killed after step 1 and resumed: bit-identical float32
    masters (the checkpoint holds them, not a bf16 copy); final/ is in the compute dtype."""
    from safetensors import safe_open

    from tokencredit.trainer import Trainer

    extra = {"model.dtype": "bfloat16", "train.steps": 3, "output.save_every": 1, "probes.flip.every": 1,
             "output.save_final": True}
    a = _trainer(digits_file, tmp_path, "a", **extra)
    a.train()
    _trainer(digits_file, tmp_path, "b", **{**extra, "train.steps": 1}).train()  # "killed" after step 1
    b = Trainer(load_config(tmp_path / "b" / "config.yaml", ["train.steps=3"]), run_dir=tmp_path / "b", resume=True)
    assert b.rollout_step == 1
    b.train()
    assert any(r.get("grad_norm", 0) > 0 for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()))
    for (n, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert pa.dtype == torch.float32 and torch.equal(pa, pb), n
    with safe_open(str(tmp_path / "a" / "checkpoints" / "step_3" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    masters = a.model.state_dict()
    with safe_open(str(tmp_path / "a" / "final" / "model.safetensors"), "pt") as f:
        assert len(f.keys()) >= 15
        for k in f.keys():  # final/ = the masters rounded to bf16 (one rounding each)
            assert f.get_tensor(k).dtype == torch.bfloat16 and torch.equal(f.get_tensor(k), masters[k].to(torch.bfloat16)), k
    assert json.loads((tmp_path / "a" / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_compute_dtype_helpers():
    assert master_dtype("bfloat16") == master_dtype("float32") == master_dtype("bf16") == torch.float32
    assert master_dtype("float64") == torch.float64
    m = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with compute_autocast(m):  # unmarked: no autocast
        assert m(x).dtype == torch.float32
    set_compute_dtype(m, "bfloat16")
    with compute_autocast(m):
        assert m(x).dtype == torch.bfloat16 and m.weight.dtype == torch.float32
    assert check_compute_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("dtype,needle", [("float16", "GradScaler"), ("float64", "CPU reference")])
def test_a_compute_dtype_the_device_cannot_train_in_fails_in_one_line_before_loading(dtype, needle, digits_file, tmp_path):
    device = "cuda" if dtype == "float64" else "cpu"  # float64 is refused on a GPU (checked without one)
    with pytest.raises(PrecisionError, match=needle) as e:
        check_compute_dtype(dtype, device)
    assert str(e.value).startswith(f"model.dtype={dtype}") and "\n" not in str(e.value)
    if dtype == "float16":  # the trainer checks before it loads anything: a model that does not exist is not reached
        with pytest.raises(PrecisionError, match="model.dtype=float16"):
            _trainer(digits_file, tmp_path, "fp16", **{"model.dtype": "float16", "model.name": str(tmp_path / "no-such-model")})


def test_cli_names_model_dtype_in_one_line(digits_file, tmp_path, capsys):
    from tokencredit.cli import main

    rc = main(["train", *tiny_overrides(digits_file, tmp_path, **{"model.dtype": "float16"})])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "model.dtype=float16" in err and "Traceback" not in err, err


def test_probe_context_loads_float32_masters_with_the_compute_dtype(tmp_path):
    from tokencredit.probes.context import load_model_into, resolve_context

    ctx = resolve_context(model="tiny-random", overrides=["model.dtype=bfloat16"], out=tmp_path)
    load_model_into(ctx)
    assert {p.dtype for p in ctx.model.parameters()} == {torch.float32} and compute_dtype(ctx.model) == torch.bfloat16


def test_generation_under_bf16_compute_uses_a_growing_cache_and_refuses_a_static_one():
    """Autocast over float32 weights gives float32 keys (transformers' rotary embedding upcasts) beside bf16
    values: rows without a shared prompt (eval's case) decode with a dynamic cache under "auto"; an explicit
    "static" is refused in one line, by generate_hf and by the config."""
    from tokencredit.config import ConfigError
    from tokencredit.model.tiny import build_tiny
    from tokencredit.rollout.hf import generate_hf

    model, tok = build_tiny(seed=5, hidden=32, layers=2, heads=4, tie=True)
    set_compute_dtype(model, "bfloat16")
    kw = dict(n=1, temperature=0.0, top_p=1.0, max_new_tokens=4, gen_batch_size=8)
    b = generate_hf(model, tok, ["Say 1.", "Say 22."], **kw)  # distinct prompts: auto would pick static in float32
    assert b.response_ids.shape[0] == 2 and b.response_mask.sum() >= 2
    with pytest.raises(ValueError, match="static"):
        generate_hf(model, tok, ["Say 1.", "Say 22."], cache="static", **kw)
    with pytest.raises(ConfigError, match="rollout.hf_cache=static with model.dtype=bfloat16"):
        load_config(None, ["model.dtype=bfloat16", "rollout.hf_cache=static"])
