"""Command line: `tokencredit train|eval|export|probe|report`.

    tokencredit train                                # embedded default (SmolLM2-135M, arithmetic, CPU)
    tokencredit train --config configs/paper_qwen.yaml train.lr=1e-6
    tokencredit train --resume runs/my-run           # continue a killed run
    tokencredit train --help                         # every option with its default and help

Every user error (bad config, missing file, unknown model, malformed data) ends
in one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from pathlib import Path


def _options_epilog() -> str:
    from tokencredit.config import option_help

    lines = ["options (key=value overrides; defaults shown):"]
    for key, default, help_ in option_help():
        lines.append(f"  {key} = {default}")
        for w in textwrap.wrap(help_, 72):
            lines.append(f"      {w}")
    return "\n".join(lines)


def _user_errors():
    from tokencredit.config import ConfigError

    errs: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    try:
        from tokencredit.model import ModelLoadError
        from tokencredit.model.precision import PrecisionError

        errs += [ModelLoadError, PrecisionError]
    except ImportError:
        pass
    try:
        from tokencredit.data import DataError

        errs.append(DataError)
    except ImportError:
        pass
    try:
        from tokencredit.export import ExportError

        errs.append(ExportError)
    except ImportError:
        pass
    return tuple(errs)


def cmd_train(args) -> int:
    from tokencredit.config import load_config

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(args.config or run_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = None
    from tokencredit.trainer import Trainer

    trainer = Trainer(cfg, run_dir=run_dir, resume=bool(args.resume))
    summary = trainer.train()
    if trainer.dist.main:  # under torchrun, rank 0 speaks for the run
        _print_summary(summary, trainer.run_dir)
    return 0


def _print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="tokencredit run summary", show_header=False)
    t.add_column("what")
    t.add_column("value", overflow="fold")  # never truncate the run directory
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    t.add_row("rollout steps", fmt(summary["steps"]))
    t.add_row("train reward: first step -> last step", f"{fmt(summary['reward_first_step'])} -> {fmt(summary['reward_last_step'])}")
    if "eval_accuracy_start" in summary:
        t.add_row("held-out accuracy: start -> end", f"{fmt(summary['eval_accuracy_start'])} -> {fmt(summary['eval_accuracy_end'])}")
    if "optimizer_steps" in summary:
        t.add_row("optimizer steps", fmt(summary["optimizer_steps"]))
    if "rb_utilisation" in summary:
        t.add_row("rows trained / nonzero-advantage rows sampled", fmt(summary["rb_utilisation"]))
    t.add_row("generated tokens / s (whole loop)", fmt(summary["tokens_per_s"]))
    t.add_row("wall time (s)", fmt(summary["wall_s"]))
    t.add_row("run directory", str(run_dir))
    if (run_dir / "final").is_dir():
        t.add_row("final model (transformers / tokencredit eval)", str(run_dir / "final"))
    Console(stderr=False).print(t)
    print(f"run directory: {run_dir}")  # plain line, easy to copy or parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokencredit", description="Critic-free RL for LMs with token-level credit.")
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser(
        "train",
        help="run GRPO training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_options_epilog(),
        description="Train a policy. With no arguments: SmolLM2-135M-Instruct on the built-in arithmetic task, on CPU.",
    )
    tr.add_argument("--config", help="YAML config file (sections as in configs/default.yaml)")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    tr.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    tr.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-5 rollout.n=8")
    tr.set_defaults(func=cmd_train)
    # other commands live beside the code they run; each module exposes add_cli(subparsers)
    import importlib

    for mod in SUBCOMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        m.add_cli(sub)
    return p


# modules that contribute subcommands (`add_cli(subparsers)`; handler via set_defaults(func=...))
SUBCOMMAND_MODULES = ("tokencredit.evaluate", "tokencredit.export", "tokencredit.probes.cli", "tokencredit.report")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "math_verify", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and args.command != "train":  # only training is data-parallel
        if int(os.environ.get("RANK", "0") or 0) == 0:
            print(f"tokencredit: error: `tokencredit {args.command}` runs in one process; run it without torchrun "
                  f"(WORLD_SIZE={world}). Probes inside training (probes.flip) do run under torchrun.", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"tokencredit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokencredit: interrupted (the last checkpoint is intact; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
