"""RUN_DIR/final/, `tokencredit export` and what `tokencredit eval --model` loads.

One tiny run (2 rollout steps, a checkpoint after each, held-out eval on) is
trained once for the module; tests that change a run work on a copy of it.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tokencredit.cli import main
from tokencredit.config import load_config
from tokencredit.export import ExportError, export_model, export_run, load_for_eval, resolve_model
from tokencredit.model import build_tiny
from tokencredit.trainer import Trainer

PROMPT = "<|im_start|>user\nSay the digit 3.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("export")
    data = root / "digits.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Say the digit {d}.", "answer": str(d)}) for d in list(range(10)) * 2) + "\n")
    over = tiny_overrides(data, root / "runs", **{"output.run_name": "r", "output.save_every": 1,
                                                  "eval.num_problems": 2, "eval.max_new_tokens": 4})
    tr = Trainer(load_config(None, over))
    summary = tr.train()
    return tr, summary


def _logits(model, tok) -> torch.Tensor:
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _copy_run(trained, tmp_path, drop=()):
    run = tmp_path / "run"
    shutil.copytree(trained[0].run_dir, run)
    for name in drop:
        p = run / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return run


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tokencredit: error:"), err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ final/
def test_final_dir_loads_with_transformers_and_gives_the_same_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tr, summary = trained
    final = tr.run_dir / "final"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (final / f).is_file(), f
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["dtype"] == "float32" and "quantization_config" not in cfg
    assert not list(final.parent.glob(".tmp-*")) and not list(final.parent.glob(".old-*"))

    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert model.dtype == torch.float32
    assert tok(PROMPT, add_special_tokens=False)["input_ids"] == tr.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    got, want = _logits(model, tok), _logits(tr.model, tr.tokenizer)
    assert torch.equal(got, want)
    # the run trained: the exported logits are not the base model's
    assert not torch.allclose(got, _logits(build_tiny()[0], tok), atol=1e-4)  # must differ: training moved logits by up to 0.2

    card = (final / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "- base model: `tiny-random`" in card and "rollout step 2" in card
    assert f"| train reward, first step | {summary['reward_first_step']:.4f} |" in card
    assert f"| train reward, last step | {summary['reward_last_step']:.4f} |" in card
    assert f"| held-out accuracy, start | {summary['eval_accuracy_start']:.4f} |" in card
    assert f"| held-out accuracy, end | {summary['eval_accuracy_end']:.4f} |" in card
    assert "| rollout steps | 2 |" in card and "```yaml\nmodel:\n  name: tiny-random\n" in card


def test_save_final_false_writes_no_final_dir(tmp_path, digits_file, one_thread):
    over = tiny_overrides(digits_file, tmp_path, **{"output.run_name": "nf", "output.save_final": False, "train.steps": 1})
    tr = Trainer(load_config(None, over))
    tr.train()
    assert (tr.run_dir / "summary.json").is_file() and not (tr.run_dir / "final").exists()


# ----------------------------------------------------------------- export
def test_cli_export_step_equals_that_checkpoints_weights(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = trained[0].run_dir
    out = tmp_path / "s1"
    assert main(["export", str(run), "--step", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    sd = AutoModelForCausalLM.from_pretrained(out).state_dict()
    ck1 = load_file(str(run / "checkpoints" / "step_1" / "model.safetensors"))
    ck2 = load_file(str(run / "checkpoints" / "step_2" / "model.safetensors"))
    assert set(ck1) <= set(sd)
    for k, v in ck1.items():
        assert torch.equal(sd[k], v), k
    assert any(not torch.equal(ck1[k], ck2[k]) for k in ck1)  # step 1 and step 2 differ: --step mattered
    card = (out / "README.md").read_text()
    assert "checkpoint step_1 of" in card and "| rollout steps | 1 |" in card


def test_export_default_goes_to_final_and_refuses_to_overwrite_without_force(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = _copy_run(trained, tmp_path)
    before = (run / "final" / "model.safetensors").read_bytes()
    (run / "final" / "marker").write_text("old")
    assert main(["export", str(run)]) == 2
    _one_error_line(capsys, str(run / "final"), "already exists", "--force")
    assert (run / "final" / "marker").is_file()  # untouched

    assert main(["export", str(run), "--force"]) == 0
    assert not (run / "final" / "marker").exists()  # replaced as a whole
    ck2 = load_file(str(run / "checkpoints" / "step_2" / "model.safetensors"))
    sd = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ck2.items())
    assert (run / "final" / "model.safetensors").read_bytes() == before  # the last checkpoint is the final model
    assert "checkpoint step_2 of" in (run / "final" / "README.md").read_text()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_export_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    bare = _copy_run(trained, tmp_path, drop=("checkpoints", "final"))
    assert main(["export", str(bare)]) == 2
    _one_error_line(capsys, "has no checkpoints")
    assert main(["export", str(tmp_path)]) == 2
    _one_error_line(capsys, "no config.yaml")
    assert main(["export", str(trained[0].run_dir), "--step", "7", "--out", str(tmp_path / "x")]) == 2
    _one_error_line(capsys, "no checkpoint step_7", "available steps: 1, 2")
    assert not (tmp_path / "x").exists()


def test_bf16_export_has_bf16_weights_and_leaves_the_model_in_float32(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    tr, _ = trained
    run = tr.run_dir
    out = export_run(run, step=2, out=tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    ck2 = load_file(str(run / "checkpoints" / "step_2" / "model.safetensors"))
    sd = model.state_dict()
    for k, v in ck2.items():
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k

    # export_model converts a copy: the trainer's model stays float32 with the same logits
    want = _logits(tr.model, tr.tokenizer)
    export_model(tr.model, tr.tokenizer, tmp_path / "bf16b", "bfloat16", card_text=None)
    assert {p.dtype for p in tr.model.parameters()} == {torch.float32}
    assert torch.equal(_logits(tr.model, tr.tokenizer), want)
    assert not (tmp_path / "bf16b" / "README.md").exists()


def test_export_model_drops_a_gguf_quantization_config(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = build_tiny()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    assert "quantization_config" in model.config.to_dict()
    out = export_model(model, tok, tmp_path / "m", "float32", card_text="card")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    assert (out / "README.md").read_text() == "card"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, tok, out, "float32")


# ------------------------------------------------------- eval --model X
@pytest.mark.parametrize("kind", ["run", "final", "killed_run", "checkpoint"])
def test_load_for_eval_resolves_runs_finals_and_checkpoints(trained, tmp_path, kind):
    tr, _ = trained
    run = tr.run_dir
    if kind == "run":
        arg, weights, note = run, run / "final" / "model.safetensors", None
    elif kind == "final":
        arg, weights, note = run / "final", run / "final" / "model.safetensors", None
    elif kind == "killed_run":
        arg = _copy_run(trained, tmp_path, drop=("final", "summary.json"))
        weights, note = arg / "checkpoints" / "step_2" / "model.safetensors", "has no final/ model"
    else:
        arg = run / "checkpoints" / "step_1"
        weights, note = arg / "model.safetensors", "using checkpoint step_1"
    model, tok, src = load_for_eval(str(arg))
    assert (src.note is None) if note is None else (note in src.note)
    want = load_file(str(weights))
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in want.items())
    if kind in ("killed_run", "checkpoint"):
        assert src.load == "tiny-random" and src.checkpoint == weights.parent
    else:
        assert src.load == str(run / "final") and src.checkpoint is None


def test_resolve_model_passes_aliases_through_and_rejects_empty_runs(trained, tmp_path):
    assert resolve_model("tiny-random").load == "tiny-random" and resolve_model("tiny-random").checkpoint is None
    bare = _copy_run(trained, tmp_path, drop=("checkpoints", "final"))
    with pytest.raises(ExportError, match="no final/ model and no checkpoint"):
        resolve_model(str(bare))
    stray = tmp_path / "stray"
    shutil.copytree(trained[0].run_dir / "checkpoints" / "step_1", stray)
    with pytest.raises(ExportError, match="base model is unknown"):
        resolve_model(str(stray))


EVAL_ARGS = ["--data", "arithmetic", "--limit", "2", "--n", "1", "--max-new-tokens", "4", "-q"]


def test_cli_eval_on_a_run_uses_final(trained, tmp_path, capsys):
    run = trained[0].run_dir
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "ev"), *EVAL_ARGS]) == 0
    assert "tokencredit:" not in capsys.readouterr().out
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["model"] == str(run) and s["model_loaded"] == str(run / "final")
    assert s["datasets"][0]["num_problems"] == 2


def test_cli_eval_on_a_killed_run_says_it_uses_the_latest_checkpoint(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path, drop=("final", "summary.json"))
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "ev"), *EVAL_ARGS]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tokencredit:")]
    assert len(notes) == 1 and "has no final/ model" in notes[0] and "step_2" in notes[0] and "tiny-random" in notes[0]
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["model_loaded"] == f"{run / 'checkpoints' / 'step_2'} on base model tiny-random"


def test_cli_eval_on_a_run_without_weights_exits_2(trained, tmp_path, capsys):
    bare = _copy_run(trained, tmp_path, drop=("checkpoints", "final"))
    assert main(["eval", "--model", str(bare), "--out", str(tmp_path / "ev"), *EVAL_ARGS]) == 2
    _one_error_line(capsys, "no final/ model and no checkpoint")
