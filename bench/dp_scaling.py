"""Data-parallel scaling on one machine: 1 process x T threads vs N processes x
T/N threads (torchrun, gloo on CPU / NCCL on GPU), the same global batch and
steps, generated tokens per second of the whole loop side by side.

    python bench/dp_scaling.py                      # SmolLM2, 1x2 threads vs 2x1 thread (fsdp2 and ddp), 3 steps
    python bench/dp_scaling.py --nproc 4 --threads 4 --modes fsdp2 --steps 5 key=value ...
    python bench/dp_scaling.py --smoke              # tiny model, 1 step, a few tokens, still 2 processes; for CI (tests/test_scripts_smoke.py)

Each arm is `python -m torch.distributed.run --nproc_per_node N -m tokencredit train`
with the embedded default (plus --steps and any key=value overrides); the
rate is the run's summary `tokens_per_s` (tokens generated over the loop's
wall time, rank 0's clock). Results: docs/results/dp_scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# --smoke: the tiny random model and a few tokens (still 2 processes x 1 thread beside 1 x 2)
SMOKE_OVERRIDES = ["model.name=tiny-random", "rollout.max_new_tokens=4", "probes.flip.every=0", "train.dist_timeout_s=120"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm(nproc: int, threads: int, steps: int, overrides: list[str], root: Path, mode: str = "fsdp2") -> dict:
    name = f"dp{nproc}{mode}"
    shutil.rmtree(root / name, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "-m", "tokencredit", "train",
           f"train.steps={steps}", f"model.threads={threads}", "eval.num_problems=0", "output.save_final=false", "output.progress=false",
           f"output.root={root}", f"output.run_name={name}", f"train.data_parallel={mode}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"arm {nproc}x{threads} failed:\n{r.stderr[-3000:]}")
    s = json.loads((root / name / "summary.json").read_text())
    return {"nproc": nproc, "threads": threads, "mode": mode if nproc > 1 else "-", "tokens_per_s": s["tokens_per_s"], "loop_s": s["wall_s"], "process_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel arms")
    ap.add_argument("--threads", type=int, default=2, help="threads in all: 1 x threads vs nproc x threads/nproc")
    ap.add_argument("--steps", type=int, default=3, help="training steps per arm")
    ap.add_argument("--modes", default="fsdp2,ddp", help="train.data_parallel of the data-parallel arms, comma-separated")
    ap.add_argument("overrides", nargs="*", help="key=value for every arm (e.g. rollout.prompts_per_step=8)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         f"--steps 1 {' '.join(SMOKE_OVERRIDES)} (still --nproc 2; runs go to a temp dir as always)")
    args = ap.parse_args()
    if args.smoke:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(steps=1)
        args = ap.parse_args()
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    root = Path(tempfile.mkdtemp(prefix="dp-scaling-"))
    print(f"dp scaling: {platform.machine()}, {args.threads} threads in all, {args.steps} steps, overrides {args.overrides or 'none'}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    one = arm(1, args.threads, args.steps, args.overrides, root)
    many = [arm(args.nproc, max(1, args.threads // args.nproc), args.steps, args.overrides, root, m) for m in args.modes.split(",")]
    for a in (one, *many):
        print(f"{a['nproc']} process(es) x {a['threads']} thread(s) {a['mode']}: {a['tokens_per_s']:.1f} tok/s, loop {a['loop_s']:.1f} s, "
              f"process wall {a['process_s']:.1f} s")
    for a in many:
        print(f"ratio ({args.nproc} x {a['threads']} {a['mode']}) / (1 x {one['threads']}): {a['tokens_per_s'] / one['tokens_per_s']:.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
