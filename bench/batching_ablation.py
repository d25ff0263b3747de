"""Batching ablation on the embedded default: the four arms of the cancellation
paper's Table 2 (baseline, QB, RB, QB+RB), same seeds, same everything else.

Not a test: a small experiment. Each arm is one `tokencredit train --config
configs/batching/ARM.yaml` run (all other options are the embedded default, plus
the overrides given here) in its own process; the script then reads each run's
metrics.jsonl / summary.json and writes a markdown table.

    python bench/batching_ablation.py --steps 12 --seeds 0 --out docs/results/batching_ablation.md

Columns: training reward averaged over the last third of the rollout steps,
held-out greedy accuracy before/after (eval.num_problems problems of the
built-in task with a seed disjoint from training), optimizer updates applied,
rows the buffer dropped, and the mean over updates of the largest per-group
advantage sum inside one mini-batch (0 when whole groups stay together).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ARMS = ["baseline", "qb", "rb", "qb_rb"]
ROOT = Path(__file__).resolve().parents[1]


def run_arm(arm: str, seed: int, steps: int, runs_root: Path, extra: list[str]) -> Path:
    name = f"ablation-{arm}-s{seed}"
    cmd = [
        sys.executable, "-m", "tokencredit.cli", "train", "--config", str(ROOT / "configs" / "batching" / f"{arm}.yaml"),
        f"train.steps={steps}", f"train.seed={seed}", f"output.root={runs_root}", f"output.run_name={name}",
        "output.progress=false", "output.save_every=0", *extra,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return runs_root / name


def summarize(run: Path) -> dict:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in rows if "reward_mean" in r]
    tail = steps[-max(1, len(steps) // 3):]
    evals = [r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None]
    updates = [r for r in steps if "pg_loss" in r]
    last = steps[-1] if steps else {}
    return {
        "reward_tail": sum(r["reward_mean"] for r in tail) / len(tail),
        "eval_start": evals[0] if evals else float("nan"),
        "eval_end": evals[-1] if evals else float("nan"),
        "updates": len(updates),
        "dropped": sum(last.get(k, 0) for k in ("rb_dropped_stale", "rb_dropped_overflow")),
        "mb_adv_sum": sum(r.get("mb_max_abs_group_adv_sum", 0.0) for r in updates) / max(len(updates), 1),
        "wall_s": json.loads((run / "summary.json").read_text())["wall_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "batching_ablation.md"))
    ap.add_argument("extra", nargs="*", help="extra key=value overrides for every arm")
    args = ap.parse_args()
    t0 = time.time()
    results = {}
    for seed in args.seeds:
        for arm in args.arms:
            results[(arm, seed)] = summarize(run_arm(arm, seed, args.steps, Path(args.runs_root), args.extra))
    lines = [
        "# Batching ablation (cancellation paper Table 2 arms) on the embedded default",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()} CPU, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- command: `python bench/batching_ablation.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
        + (f" {' '.join(args.extra)}" if args.extra else "") + "`",
        f"- total wall time: {time.time() - t0:.0f} s",
        "",
        "| arm | seed | train reward (last third) | held-out acc start -> end | updates | rows dropped | mean max group adv sum per mini-batch | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (arm, seed), r in results.items():
        lines.append(
            f"| {arm} | {seed} | {r['reward_tail']:.3f} | {r['eval_start']:.3f} -> {r['eval_end']:.3f} | {r['updates']} | "
            f"{r['dropped']:.0f} | {r['mb_adv_sum']:.3f} | {r['wall_s']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
