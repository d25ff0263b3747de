"""The one probe context: what every probe (polarity, masking, coupling, value)
resolves before it measures anything.

    --run RUN_DIR                 the run's config.yaml (+ key=value overrides)
    --checkpoint DIR              weights and trainer state; alone, RUN_DIR = DIR/../..
                                  when that holds config.yaml; default: the run's
                                  latest (the value probe picks its own, per step)
    --model NAME                  a raw model with the default config (or the run's)
    --threads N / model.threads   torch intra-op threads, applied on every path
    --device / model.device       "auto" = cuda when available (model.resolve_device)
    temperature                   rollout.logprob_temperature: the sampling
                                  temperature, 1.0 when sampling is greedy
    --out DIR                     default RUN_DIR/probes; the only place written to

`resolve_context` does only that (no model); `load_context` (polarity,
masking, coupling) also loads the model, the checkpoint state and a batch:
either `--batch FILE` (tokencredit.batch.load_batch) or one rollout step sampled
the way the trainer samples it, without a Trainer: the run's prompt set
(data/promptset.py), its rollout backend (rollout.make_sampler) and verifier
(reward.functions), `rollout_step` from the checkpoint's prompt cursor (the
prompts of the rollout step after the checkpoint) at its policy version, torch
seeded with --seed first. The batch is saved as OUT/batch.safetensors +
OUT/batch.json.

Try it:
    ctx = resolve_context(run="runs/my-run", overrides=["rollout.n=4"])
    ctx = load_context(args)   # args of `tokencredit probe polarity|masking|coupling`
    ctx.model, ctx.batch, ctx.temperature, ctx.out
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger("tokencredit.probes")


@dataclass
class ProbeContext:
    cfg: Any  # tokencredit.config.Config, overrides applied
    run: Path | None  # run directory (config.yaml), None with --model alone
    checkpoint: Path | None  # weights to load; None = cfg.model.name as is
    out: Path  # output directory
    device: torch.device
    temperature: float  # of every log-prob and entropy the probes compute
    model: Any = None  # set by load_model_into / load_context
    tokenizer: Any = None
    batch: Any = None  # RolloutBatch, set by load_context
    state: dict[str, Any] = field(default_factory=dict)  # the checkpoint's trainer state ({} without one)
    source: dict[str, Any] = field(default_factory=dict)  # model / run / checkpoint / batch, for summaries

    @property
    def optimizer_state(self) -> dict | None:
        return self.state.get("optimizer")


def resolve_context(
    *,
    run: str | Path | None = None,
    checkpoint: str | Path | None = None,
    model: str | None = None,
    overrides: Sequence[str] = (),
    threads: int | None = None,
    device: str | None = None,
    out: str | Path | None = None,
    latest: bool = True,
    what: str = "probe",
) -> ProbeContext:
    """Config, run, checkpoint, out, device and temperature; applies the thread
    count. latest: with a run and no --checkpoint / --model, use the run's latest
    checkpoint (else leave `checkpoint` None for the caller to choose). `what`
    names the command in error messages."""
    from tokencredit.checkpoint import latest_checkpoint
    from tokencredit.config import ConfigError, load_config
    from tokencredit.model import resolve_device

    run = Path(run) if run else None
    ck = Path(checkpoint) if checkpoint else None
    if ck is not None and not ck.is_dir():
        raise FileNotFoundError(f"--checkpoint {ck}: no such directory")
    if run is None and ck is not None and (ck.parent.parent / "config.yaml").is_file():
        run = ck.parent.parent
    if run is not None:
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"--run {run}: not a run directory (no config.yaml)")
        cfg = load_config(run / "config.yaml", list(overrides))
        if model:
            cfg.model.name = model
    elif model:
        cfg = load_config(None, list(overrides) + [f"model.name={model}"])
    else:
        raise ConfigError(f"{what}: give --run RUN_DIR, --checkpoint DIR or --model NAME")
    if out:
        out = Path(out)
    elif run is not None:
        out = run / "probes"
    else:
        raise ConfigError(f"{what}: --out DIR is required with --model (there is no run directory)")
    if latest and ck is None and run is not None and not model:
        ck = latest_checkpoint(run / "checkpoints")
        if ck is None:
            log.warning("%s: %s has no checkpoint; using the run's initial model %s", what, run, cfg.model.name)
    n = threads or cfg.model.threads
    if n:
        torch.set_num_threads(int(n))
    source: dict[str, Any] = {"model": cfg.model.name, "run": str(run) if run else None, "checkpoint": str(ck) if ck else None}
    return ProbeContext(cfg, run, ck, out, resolve_device(device or cfg.model.device), cfg.rollout.logprob_temperature,
                        source=source)


def load_model_into(ctx: ProbeContext) -> ProbeContext:
    """ctx.model / ctx.tokenizer (cfg.model.name on ctx.device, eval mode) with
    ctx.checkpoint's weights loaded and its trainer state in ctx.state."""
    from tokencredit.checkpoint import load_checkpoint
    from tokencredit.model import load_model

    from tokencredit.model.precision import check_compute_dtype, master_dtype, set_compute_dtype

    # as the trainer: fp32 master weights (the probes' optimizer steps), forwards in model.dtype
    compute = check_compute_dtype(ctx.cfg.model.dtype, ctx.device)
    model, tok = load_model(ctx.cfg.model.name, dtype=master_dtype(compute), device=str(ctx.device))
    set_compute_dtype(model, compute)
    ctx.state = load_checkpoint(ctx.checkpoint, model) if ctx.checkpoint is not None else {}
    model.eval()
    ctx.model, ctx.tokenizer = model, tok
    return ctx


def sample_batch(ctx: ProbeContext, seed: int):
    """One rollout step of the run as the trainer would take it next (no Trainer):
    prompts from the checkpoint's prompt cursor (else rollout_step *
    prompts_per_step; 0 without a checkpoint), rows tagged with its policy
    version, rewards from the run's reward.functions. torch is seeded with `seed`
    just before sampling. Returns (RolloutBatch, rollout metrics)."""
    from tokencredit.data.promptset import build_prompt_set
    from tokencredit.rewards.functions import start_reward_functions
    from tokencredit.rollout import make_sampler, rollout_step

    cfg, st = ctx.cfg, ctx.state
    step = int(st.get("rollout_step", 0))
    cursor = int(st.get("prompt_cursor", step * cfg.rollout.prompts_per_step))
    verifier = start_reward_functions(cfg.reward)
    try:
        prompts = build_prompt_set(cfg, ctx.tokenizer, "train")
        sampler = make_sampler(ctx.model, ctx.tokenizer, cfg, policy_version=int(st.get("policy_version", 0)))
        torch.manual_seed(seed)
        res = rollout_step(sampler, prompts, verifier, cfg, cursor=cursor, policy_version=int(st.get("policy_version", 0)))
    finally:
        verifier.close()
    return res.batch, res.metrics


def load_context(args) -> ProbeContext:
    """The context of `tokencredit probe polarity|masking|coupling` (args of
    probes/cli.py `_common`): model, checkpoint state and a batch with advantages,
    loaded from --batch or sampled (sample_batch) and saved to OUT/batch."""
    from tokencredit.batch import load_batch, save_batch

    ctx = resolve_context(run=args.run, checkpoint=args.checkpoint, model=args.model, overrides=args.overrides,
                          threads=args.threads, device=getattr(args, "device", None), out=args.out)
    batch = load_batch(args.batch) if args.batch else None  # a missing file fails before the model loads
    load_model_into(ctx)
    if batch is not None:
        ctx.source["batch"] = str(args.batch)
    else:
        t0 = time.perf_counter()
        batch, m = sample_batch(ctx, args.seed)
        path = save_batch(batch, ctx.out / "batch")
        step = int(ctx.state.get("rollout_step", 0))
        ctx.source.update({"batch": f"sampled (rollout step {step + 1} prompts, seed {args.seed}), saved to {path}",
                           "reward_mean": m["reward_mean"], "sample_s": round(time.perf_counter() - t0, 1)})
    if batch.advantage is None:
        raise FileNotFoundError(f"--batch {args.batch}: the batch has no advantages")
    ctx.batch = batch
    return ctx
