"""Hugging Face model directories from runs, and which weights a `--model` means.

A finished run ends with `RUN_DIR/final/` (option `output.save_final`, on by
default): config.json, generation_config.json, the tokenizer files,
model.safetensors in the training dtype and a README.md model card (base
model, task, the run's config as YAML, its summary metrics). It is an ordinary
checkpoint: `AutoModelForCausalLM.from_pretrained(RUN_DIR / "final")` and
`AutoTokenizer.from_pretrained` read it with no tokencredit code, and so does
vLLM. A model that was loaded from GGUF is written as plain float weights;
no quantization config is left in config.json.

`tokencredit export RUN_DIR [--step N]` writes the same kind of directory
from any checkpoint `RUN_DIR/checkpoints/step_N/`. It rebuilds the run's base
model (`model.name` in RUN_DIR/config.yaml) and loads that checkpoint's
weights into it. By default the latest checkpoint goes to RUN_DIR/final/ and
`--step N` goes to RUN_DIR/export-step_N/. Every directory is written to a
temporary sibling first and then renamed, so a crash never leaves a partial
model. An existing directory is replaced only with `--force`.

`resolve_model` / `load_for_eval` decide what `tokencredit eval --model X`
loads: a run directory means its final/ model, or its latest checkpoint when
the run stopped before the end; a checkpoint directory means those weights on
the run's base model; anything else is passed to `load_model` as is (an
alias, a model directory, a .gguf file, a cached hub id).

Deliberate simplifications: one file of weights (no sharding); a dtype
change converts a full copy of the model in memory; the card's base-model
metadata names a hub id only for the smollm2 alias and for names that look
like hub ids.

Try it (seconds, random weights):
    tokencredit train model.name=tiny-random train.steps=2 eval.num_problems=0 output.run_name=t
    tokencredit export runs/t --step 2 --dtype bfloat16
    tokencredit eval --model runs/t --data arithmetic --n 2 --limit 4
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from tokencredit.checkpoint import latest_checkpoint, list_checkpoints

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
# hub ids of the built-in aliases that name a published model (for the card's base_model field)
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class ExportError(ValueError):
    """A bad export or model-resolution request; the message alone says why (no traceback needed)."""


# ---------------------------------------------------------------- writing
def export_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    card_text: str | None = None,
    force: bool = False,
) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face model directory at `out_dir`.

    The directory holds config.json, generation_config.json, the tokenizer
    files, model.safetensors in `dtype` (None = the model's own dtype) and,
    when `card_text` is given, README.md. The weights and dtype of `model`
    are never changed (a different dtype is written from a converted copy);
    only a leftover GGUF quantizer is dropped from it, as `load_model` does. The files go to a
    temporary sibling directory that is renamed to `out_dir` at the end. An
    existing `out_dir` raises ExportError unless `force`; with `force` it is
    replaced only after the new directory is complete. Returns `out_dir`.
    """
    from tokencredit.model.load import _parse_dtype, save_model

    out = Path(out_dir)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    target = _parse_dtype(dtype) if dtype is not None else next(model.parameters()).dtype
    src = model
    if any(p.dtype != target for p in model.parameters()):
        src = copy.deepcopy(model).to(dtype=target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    old = out.parent / f".old-{out.name}-{os.getpid()}"
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    try:
        save_model(src, tokenizer, tmp)  # drops a GGUF quantizer: plain float weights
        if card_text is not None:
            (tmp / "README.md").write_text(card_text)
        _fsync_dir(tmp)
        if out.exists():
            os.replace(out, old)  # a non-empty directory cannot be renamed over
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists() and not out.exists():
                os.replace(old, out)  # put the previous export back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _fsync_dir(d: Path) -> None:
    """Flush every file of `d` to disk before the rename makes it visible."""
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def export_final(model: torch.nn.Module, tokenizer: Any, run_dir: str | Path, config_yaml: str, summary: dict,
                 dtype: str | torch.dtype | None = None) -> Path:
    """RUN_DIR/final/ at the end of training: the model in `dtype` (the run's compute
    dtype, model.dtype; None = the parameters' own), with a card from the run's config
    and summary. Replaces an older final/ of the same run (a resumed run ends with its own)."""
    card = model_card(config_yaml, summary_card_metrics(summary), source=f"end of training (rollout step {summary.get('steps')})")
    return export_model(model, tokenizer, Path(run_dir) / "final", dtype=dtype, card_text=card, force=True)


def export_run(
    run_dir: str | Path,
    step: int | None = None,
    out: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Export checkpoint `step` (None = the latest) of the run in `run_dir`.

    The run's base model (`model.name` of RUN_DIR/config.yaml) is loaded on
    CPU in the run's `model.dtype`, the checkpoint's weights are loaded into
    it, and `export_model` writes it in `dtype` (None = the run's
    `model.dtype`) to `out` (default: RUN_DIR/final for the latest
    checkpoint, RUN_DIR/export-step_N for an explicit `step`). Every input
    check (run directory, checkpoint, existing output, dtype) runs before the
    model is loaded. Returns the written directory.
    """
    from tokencredit.model import load_model
    from tokencredit.model.load import _parse_dtype

    run = Path(run_dir)
    cfg = run_config(run)
    ck = _pick_checkpoint(run, step)
    dest = Path(out) if out is not None else (run / "final" if step is None else run / f"export-{ck.name}")
    if dest.exists() and not force:
        raise ExportError(f"{dest} already exists; pass --force to replace it")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ExportError(f"unknown dtype '{dtype}'; use one of: {', '.join(DTYPE_CHOICES)}")
    base, run_dtype = cfg["model"]["name"], cfg["model"]["dtype"]
    model, tok = load_model(base, dtype=run_dtype, device="cpu")
    load_checkpoint_weights(model, ck, base)
    state = json.loads((ck / "state.json").read_text())
    metrics = state_card_metrics(state)
    summary_path = run / "summary.json"
    if summary_path.is_file():  # the finished run's summary, when it describes this very checkpoint
        summary = json.loads(summary_path.read_text())
        if summary.get("steps") == state.get("rollout_step"):
            metrics = summary_card_metrics(summary)
    card = model_card((run / "config.yaml").read_text(), metrics, source=f"checkpoint {ck.name} of {run}")
    return export_model(model, tok, dest, dtype=_parse_dtype(dtype or run_dtype), card_text=card, force=force)


def _pick_checkpoint(run: Path, step: int | None) -> Path:
    cks = list_checkpoints(run / "checkpoints")
    if not cks:
        raise ExportError(f"run directory {run} has no checkpoints (checkpoints/step_N/); nothing to export")
    if step is None:
        return cks[-1]
    for c in cks:
        if c.name == f"step_{step}":
            return c
    have = ", ".join(c.name.removeprefix("step_") for c in cks)
    raise ExportError(f"run directory {run} has no checkpoint step_{step} (available steps: {have})")


def load_checkpoint_weights(model: torch.nn.Module, ckpt_dir: str | Path, base: str = "the base model") -> None:
    """Load `ckpt_dir/model.safetensors` into `model` in place (strict: every
    weight must be present and of the same shape); converts to the model's dtype."""
    from safetensors.torch import load_model as st_load_model

    path = Path(ckpt_dir) / "model.safetensors"
    if not path.is_file():
        raise ExportError(f"checkpoint {ckpt_dir} has no model.safetensors")
    try:
        st_load_model(model, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"checkpoint {ckpt_dir} does not fit {base} (is model.name in config.yaml the model it trained?): {first}") from e


def run_config(run: Path) -> dict:
    """The run's config.yaml as a plain dict with at least model.name and model.dtype.

    Read as raw YAML, not validated: a run written by an older version still
    exports as long as it names its model."""
    p = run / "config.yaml"
    if not run.is_dir():
        raise ExportError(f"{run} is not a directory")
    if not p.is_file():
        raise ExportError(f"{run} is not a run directory (no config.yaml)")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from e
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or not model.get("name"):
        raise ExportError(f"{p} names no model (model.name)")
    model.setdefault("dtype", "float32")
    return cfg


# --------------------------------------------------------------- the card
def summary_card_metrics(summary: dict) -> dict[str, Any]:
    """Card rows from a run's summary.json (the trainer's summary dict)."""
    rows = {
        "rollout steps": summary.get("steps"),
        "train reward, first step": summary.get("reward_first_step"),
        "train reward, last step": summary.get("reward_last_step"),
    }
    if "eval_accuracy_start" in summary:
        rows["held-out accuracy, start"] = summary["eval_accuracy_start"]
        rows["held-out accuracy, end"] = summary["eval_accuracy_end"]
    return rows


def state_card_metrics(state: dict) -> dict[str, Any]:
    """Card rows from a checkpoint's state.json (what was known at that step)."""
    rows = {
        "rollout steps": state.get("rollout_step"),
        "train reward, first step": state.get("first_reward"),
        "train reward, last step": state.get("last_reward"),
    }
    hist = state.get("eval_history") or []
    if hist:
        rows[f"held-out accuracy, step {hist[0][0]}"] = hist[0][1]
        if len(hist) > 1:
            rows[f"held-out accuracy, step {hist[-1][0]}"] = hist[-1][1]
    return rows


def model_card(config_yaml: str, metrics: dict[str, Any], source: str) -> str:
    """README.md text: HF metadata, base model, task, metrics table, config as YAML."""
    cfg = yaml.safe_load(config_yaml) or {}
    m, data = cfg.get("model", {}), cfg.get("data", {})
    algo, tw, bt = cfg.get("algo", {}), cfg.get("token_weights", {}), cfg.get("batching", {})
    base = str(m.get("name", "?"))
    hub_id = ALIAS_HUB_IDS.get(base.lower()) or (base if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not os.path.exists(base) else None)
    train = data.get("train", "?")
    task = f"built-in arithmetic, difficulty {data.get('difficulty', '?')}" if train == "arithmetic" else f"`{train}`"
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [tokencredit, grpo, rlvr]"]
    if hub_id:
        meta.append(f"base_model: {hub_id}")
    meta.append("---")
    lines = [
        *meta,
        "",
        "# Policy trained with tokencredit",
        "",
        f"- base model: `{base}`" + (f" ({hub_id})" if hub_id and hub_id != base else ""),
        f"- task: {task}, verifiable reward",
        f"- algorithm: {algo.get('adv_estimator', '?')} advantages, token weights `{tw.get('method', '?')}`, "
        f"planner `{bt.get('planner', '?')}`",
        f"- weights: {source}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in metrics.items()),
        "",
        "Load it with `AutoModelForCausalLM.from_pretrained(this_dir)` and `AutoTokenizer.from_pretrained(this_dir)`,",
        "or evaluate it with `tokencredit eval --model this_dir`.",
        "",
        "## Training config",
        "",
        "```yaml",
        config_yaml.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------- what --model means
@dataclass(frozen=True)
class ResolvedModel:
    """What a `--model` argument stands for.

    `load` goes to `load_model`; `checkpoint`, when set, is a checkpoint
    directory whose weights are then loaded on top; `note` is one line for
    the user (None when the argument means what it says)."""

    load: str
    checkpoint: Path | None = None
    note: str | None = None

    @property
    def describe(self) -> str:
        return f"{self.checkpoint} on base model {self.load}" if self.checkpoint else self.load


def resolve_model(name: str) -> ResolvedModel:
    """Map a `--model` argument to what to load (nothing is loaded here).

    - a run directory (config.yaml, no config.json): its final/ model; when
      it has none (stopped before the end), its latest checkpoint on the
      run's base model, with a note saying so;
    - a checkpoint directory RUN_DIR/checkpoints/step_N (model.safetensors +
      state.json): those weights on the base model of RUN_DIR;
    - anything else (alias, model directory, .gguf file, cached hub id): as is.
    """
    p = Path(name)
    if not p.is_dir() or (p / "config.json").is_file():
        return ResolvedModel(name)
    if (p / "config.yaml").is_file():
        if (p / "final" / "config.json").is_file():
            return ResolvedModel(str(p / "final"))
        base = run_config(p)["model"]["name"]
        ck = latest_checkpoint(p / "checkpoints")
        if ck is None:
            raise ExportError(f"run directory {p} has no final/ model and no checkpoint (checkpoints/step_N/) to load")
        note = f"{p} has no final/ model (the run stopped before its end): using its latest checkpoint {ck.name} on base model {base}"
        return ResolvedModel(base, ck, note)
    if (p / "model.safetensors").is_file() and (p / "state.json").is_file():
        run = p.parent.parent
        if p.parent.name != "checkpoints" or not (run / "config.yaml").is_file():
            raise ExportError(f"checkpoint {p} is not inside RUN_DIR/checkpoints/ of a run with config.yaml, so its base model is unknown")
        base = run_config(run)["model"]["name"]
        return ResolvedModel(base, p, f"using checkpoint {p.name} of {run} on base model {base}")
    return ResolvedModel(name)  # load_model explains what is missing


def load_for_eval(name: str, dtype: str = "float32", device: str = "cpu"):
    """`(model, tokenizer, ResolvedModel)` for a `--model` argument (see `resolve_model`)."""
    from tokencredit.model import load_model

    src = resolve_model(name)
    model, tok = load_model(src.load, dtype=dtype, device=device)
    if src.checkpoint is not None:
        load_checkpoint_weights(model, src.checkpoint, src.load)
    return model, tok, src


# -------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a Hugging Face model directory from a run's checkpoint",
        description=(
            "Load the run's base model (model.name in RUN_DIR/config.yaml), put a checkpoint's weights in it and "
            "write config, generation config, tokenizer, safetensors weights and a README.md model card, atomically. "
            "transformers' from_pretrained and `tokencredit eval --model DIR` load the result as is."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.yaml, checkpoints/step_N/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: RUN_DIR/final, or RUN_DIR/export-step_N with --step)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="weight dtype of the export (default: the run's model.dtype)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    out = export_run(args.run_dir, step=args.step, out=args.out, dtype=args.dtype, force=args.force)
    print(f"wrote {out}")
    return 0
