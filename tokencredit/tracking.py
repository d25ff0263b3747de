"""Experiment tracking: the run's metrics rows, as they are written to metrics.jsonl,
also go to TensorBoard and/or Weights & Biases.

What it does
    `output.report_to=[tensorboard,wandb]` (default: none) opens one tracker per
    name when training starts. Every metrics row goes to every tracker: each
    numeric value (int or float; not bool, None, NaN or inf) under its own key,
    at the row's "step" (the rollout step). The numbers of summary.json go to the
    trackers when training ends.

    tensorboard  event files under RUN_DIR/tensorboard/ (torch's SummaryWriter);
                 `tensorboard --logdir runs/` shows every run side by side.
                 Summary numbers are scalars named summary/<key> at the last step.
    wandb        one W&B run per run directory: project output.wandb_project,
                 name = the run directory's name, tags output.wandb_tags, the
                 whole config as the W&B config, files under RUN_DIR/wandb/.
                 The W&B run id is kept in RUN_DIR/wandb_id.txt and passed with
                 resume="allow", so `tokencredit train --resume RUN_DIR`
                 continues the same W&B run. The mode (online, offline,
                 disabled) is whatever the environment says (WANDB_MODE,
                 `wandb offline`); without network use WANDB_MODE=offline and
                 `wandb sync RUN_DIR/wandb/offline-run-*` later. Summary numbers
                 go to the run's summary.

    Numbers computed after training reach the same trackers (`send_run_summary`,
    which reads output.report_to from RUN_DIR/config.yaml): `tokencredit probe
    polarity|masking|coupling --run RUN_DIR` and `tokencredit probe value
    RUN_DIR` as probe/<name>/..., `tokencredit eval --model RUN_DIR` (or
    RUN_DIR/final, RUN_DIR/checkpoints/step_N) as eval/[step_N/]<dataset>/...;
    TensorBoard shows them as summary/... at the run's last logged step.

Deliberate simplifications
    W&B gets the rollout step as a metric named "step" (every other metric is
    plotted against it) rather than as W&B's own step counter: after a resume
    the rollout steps that the killed run logged past its last checkpoint are
    logged again, which W&B's monotonic step counter would drop. TensorBoard
    instead hides them: a resumed writer purges events from the next step on.
    Nothing is logged per optimizer step or per token, only per rollout step.
    TensorBoard is flushed after every row, so a killed run's events match its
    metrics.jsonl; W&B sends from its own service process and finishes the run
    itself when Python exits (an exception marks it failed). Trackers are not
    closed by a crash inside train(): the trainer loop is not wrapped for them.

Try it
    pip install 'tokencredit[tensorboard]'
    tokencredit train output.report_to=[tensorboard] && tensorboard --logdir runs
    WANDB_MODE=offline tokencredit train output.report_to=[wandb] output.wandb_tags=[smoke]
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from tokencredit.config import Config, ConfigError, load_config
from tokencredit.registry import Registry

log = logging.getLogger("tokencredit.tracking")

WANDB_ID_FILE = "wandb_id.txt"
TENSORBOARD_DIR = "tensorboard"


class TrackingError(ConfigError):
    """A tracker that cannot start (missing extra, W&B refused to initialise).
    One line for the user; a ConfigError so the CLI prints it without a traceback."""


class Tracker(Protocol):
    """What the trainer talks to. `row` is a metrics row as in metrics.jsonl."""

    def log(self, row: dict[str, Any], step: int) -> None: ...

    def summary(self, d: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


# name -> factory(cfg, run_dir, resume_step) -> Tracker; resume_step is the rollout
# step training starts from (0 = a fresh run, k = resumed from the checkpoint of step
# k), None when no training follows (summary numbers sent after the run)
TRACKERS: Registry[Callable[[Config, Path, "int | None"], Tracker]] = Registry("tracker")

# name -> the modules a tracker imports, and the extra that installs them
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
}


def numeric_items(row: dict[str, Any]) -> dict[str, float]:
    """The values of `row` a tracker can plot: real numbers that are finite; bools,
    None, NaN, inf, strings, lists and nested dicts are left out."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            continue
        v = float(v)
        if math.isfinite(v):
            out[k] = v
    return out


def flatten_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict -> {"a/b/c": number} for every finite number in it (lists skipped)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_numbers(v, key + "/"))
        else:
            out.update(numeric_items({key: v}))
    return out


def require_extras(names: Iterable[str]) -> None:
    """Import what each named tracker needs; a missing one raises TrackingError with
    one line saying which extra to install. Cheap: call it before loading a model."""
    for name in names:
        modules, extra = EXTRAS[name]
        for mod in modules:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise TrackingError(
                    f"output.report_to includes {name!r} but {mod!r} cannot be imported ({e}); "
                    f"install it with: pip install 'tokencredit[{extra}]'"
                ) from None


def open_trackers(cfg: Config, run_dir: str | Path, resume_step: int | None = None) -> list[Tracker]:
    """One tracker per name in cfg.output.report_to (empty list when none)."""
    names = list(cfg.output.report_to)
    require_extras(names)
    return [TRACKERS.get(n)(cfg, Path(run_dir), resume_step) for n in names]


def send_run_summary(run_dir: str | Path, numbers_: dict[str, Any], prefix: str = "") -> int:
    """Send summary numbers computed after training (probes, evaluation) to the
    trackers configured in RUN_DIR/config.yaml. `numbers_` may be nested; keys
    become prefix + "a/b". Returns how many trackers received them (0 when the run
    has none configured or has no config.yaml)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return 0
    cfg = load_config(run_dir / "config.yaml")
    if not cfg.output.report_to:
        return 0
    flat = flatten_numbers(numbers_, prefix)
    trackers = open_trackers(cfg, run_dir, resume_step=None)
    for t in trackers:
        t.summary(flat)
        t.close()
    return len(trackers)


def run_dir_of_model(name: str | Path) -> Path | None:
    """The run directory a `--model` argument belongs to: RUN_DIR itself,
    RUN_DIR/final or RUN_DIR/checkpoints/step_N; None for anything else."""
    p = Path(name)
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "config.yaml").is_file() and (cand == p or p.name == "final" or p.parent.name == "checkpoints"):
            return cand
    return None


def send_eval_summary(model: str | Path, summaries: list[dict[str, Any]]) -> int:
    """`tokencredit eval --model RUN_DIR[/final | /checkpoints/step_N]`: send each
    dataset's numbers (avg@k, pass@k, ...) to the run's trackers as
    eval/[step_N/]<dataset>/<key>. A failure is a warning (the results are on
    disk already). Returns how many trackers received them."""
    run = run_dir_of_model(model)
    if run is None:
        return 0
    where = f"{Path(model).name}/" if Path(model).parent.name == "checkpoints" else ""
    try:
        return send_run_summary(run, {s.get("name", str(i)): s for i, s in enumerate(summaries)}, prefix=f"eval/{where}")
    except Exception as e:
        log.warning("eval: summary numbers not sent to the trackers of %s (%s)", run, e)
        return 0


def last_logged_step(run_dir: Path) -> int:
    """The largest "step" in RUN_DIR/metrics.jsonl (0 when there is none)."""
    p = run_dir / "metrics.jsonl"
    step = 0
    if p.is_file():
        for ln in p.read_text().splitlines():
            if ln.strip():
                step = max(step, int(json.loads(ln).get("step", 0) or 0))
    return step


# ------------------------------------------------------------------ TensorBoard
@TRACKERS.register("tensorboard")
class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard/; one scalar per numeric key."""

    def __init__(self, cfg: Config, run_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        # training re-logs every step after resume_step: hide events of a killed run from there on
        # (from step 0 when it starts over: its step-0 evaluation is logged again)
        purge = None if resume_step is None else (resume_step + 1 if resume_step > 0 else 0)
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge)
        self.last_step = 0

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in numeric_items(row).items():
            if k != "step":
                self.writer.add_scalar(k, v, global_step=step)
        self.last_step = max(self.last_step, step)
        self.writer.flush()

    def summary(self, d: dict[str, Any]) -> None:
        step = max(self.last_step, last_logged_step(self.run_dir))
        for k, v in numeric_items(d).items():
            self.writer.add_scalar(f"summary/{k}", v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# ------------------------------------------------------------------------- W&B
def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: read from RUN_DIR/wandb_id.txt, or made
    and saved there on first use (so a resumed run continues the same W&B run)."""
    p = run_dir / WANDB_ID_FILE
    if p.is_file() and p.read_text().strip():
        return p.read_text().strip()
    rid = secrets.token_hex(8)  # W&B ids: lowercase letters and digits
    p.write_text(rid + "\n")
    return rid


@TRACKERS.register("wandb")
class WandbTracker:
    """One W&B run per run directory, resumable by the id in RUN_DIR/wandb_id.txt."""

    def __init__(self, cfg: Config, run_dir: Path, resume_step: int | None = None):
        import wandb

        out = cfg.output
        try:
            self.run = wandb.init(
                project=out.wandb_project, name=run_dir.name, tags=list(out.wandb_tags), dir=str(run_dir),
                id=wandb_run_id(run_dir), resume="allow", config=cfg.model_dump(mode="json"),
            )
        except Exception as e:  # no API key, bad project name, ...: one line, at start
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(
                f"W&B did not start ({first}); log in with `wandb login`, or set WANDB_MODE=offline "
                "(sync later) or remove wandb from output.report_to"
            ) from None
        # every metric is plotted against the rollout step (see the module docstring)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({**numeric_items(row), "step": step})

    def summary(self, d: dict[str, Any]) -> None:
        self.run.summary.update(numeric_items(d))

    def close(self) -> None:
        self.run.finish()
