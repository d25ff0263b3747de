"""Batching ablation: the four arms of the cancellation paper's Table 2 (baseline,
QB, RB, QB+RB), same seeds, same everything else.

Not a test: a small experiment. Each arm is one `tokencredit train --config
configs/batching/ARM.yaml` run (every other option is the embedded default plus
the overrides given here) in its own process. Runs go seed by seed (all arms of
seed 0, then seed 1, ...), so a cut-short ablation still compares arms on the
same seeds; every finished run is appended to RUNS_ROOT/ablation.jsonl and the
report is rewritten, so nothing finished is lost.

    python bench/batching_ablation.py --steps 16 --seeds 0 1 2 data.difficulty=2 eval.num_problems=200 eval.every=8 \
        probes.flip.every=0 batching.reward_balance.max_age=2   # the run of docs/results/batching_ablation.md
    python bench/batching_ablation.py --report-only --runs-root runs   # redraw table + figure from finished runs
    python bench/batching_ablation.py --smoke   # tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py)

Per run: training reward averaged over the last third of the rollout steps,
held-out greedy accuracy at the start, at each eval.every and at the end
(eval.num_problems problems of the built-in task with a seed disjoint from
training), optimizer steps, rows trained / nonzero-advantage rows sampled
(rb_utilisation), mean age of the rows that trained, rows dropped by the buffer,
and the mean over updates of the largest per-group advantage sum inside one
mini-batch (0 when whole groups stay together). Per arm: mean +- sample
standard deviation over seeds. The figure (PNG beside the markdown) draws
held-out accuracy and training reward against rollout steps, mean and
min-max band over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ["baseline", "qb", "rb", "qb_rb"]
ROOT = Path(__file__).resolve().parents[1]
# --smoke: every arm on the tiny random model, a few tokens, a 2-problem eval at start and end
SMOKE_OVERRIDES = ["model.name=tiny-random", "model.threads=1", "rollout.max_new_tokens=4", "eval.num_problems=2",
                   "eval.max_new_tokens=4", "probes.flip.every=0", "output.save_final=false"]


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
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("eval_accuracy") is not None]
    updates = [r for r in steps if "pg_loss" in r]
    last = steps[-1] if steps else {}
    ages = [r["rb_mean_age"] for r in steps if r.get("rb_released_rows", 0) > 0]
    return {
        "run": str(run),
        "reward_tail": sum(r["reward_mean"] for r in tail) / len(tail),
        "reward_curve": [(r["step"], r["reward_mean"]) for r in steps],
        "eval_curve": evals,
        "eval_start": evals[0][1] if evals else float("nan"),
        "eval_end": evals[-1][1] if evals else float("nan"),
        "optim_steps": sum(int(r.get("mb_count", 0)) for r in updates),
        "update_rows": sum(r.get("update_rows", 0) for r in updates),
        "utilisation": last.get("rb_utilisation", float("nan")),
        "mean_age": sum(ages) / len(ages) if ages else float("nan"),
        "dropped": sum(last.get(k, 0) for k in ("rb_dropped_stale", "rb_dropped_overflow")),
        "mb_adv_sum": sum(r.get("mb_max_abs_group_adv_sum", 0.0) for r in updates) / max(len(updates), 1),
        "wall_s": json.loads((run / "summary.json").read_text())["wall_s"],
    }


def _ms(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        for ax, key in zip(axes, ("eval_curve", "reward_curve")):
            steps = sorted({s for r in rs for s, _ in r[key]})
            vals = [[dict(r[key]).get(s) for r in rs] for s in steps]
            mean = [sum(v for v in vs if v is not None) / max(1, sum(v is not None for v in vs)) for vs in vals]
            lo = [min(v for v in vs if v is not None) for vs in vals]
            hi = [max(v for v in vs if v is not None) for vs in vals]
            (line,) = ax.plot(steps, mean, marker="o" if key == "eval_curve" else None, label=f"{arm} (n={len(rs)})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
    axes[0].set(title="held-out greedy accuracy", xlabel="rollout step", ylabel="accuracy")
    axes[1].set(title="training reward (mean of the rollout batch)", xlabel="rollout step", ylabel="reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Batching ablation: mean over seeds, band = min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[dict], out: Path, header: list[str]) -> str:
    lines = header + [
        "",
        "Per arm, mean ± sample std over seeds:",
        "",
        "| arm | seeds | held-out acc start | held-out acc end | train reward (last third) | optimizer steps | rows trained | rb_utilisation | mean age of trained rows | rows dropped (stale+overflow) | mean max group adv sum per mini-batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        rs = [r for r in results if r["arm"] == arm]
        if not rs:
            continue
        col = lambda k: _ms([float(r[k]) for r in rs])  # noqa: E731
        lines.append(f"| {arm} | {len(rs)} | {col('eval_start')} | {col('eval_end')} | {col('reward_tail')} | {col('optim_steps')} | "
                     f"{col('update_rows')} | {col('utilisation')} | {col('mean_age')} | {col('dropped')} | {col('mb_adv_sum')} |")
    lines += ["", "Per run:", "", "| arm | seed | held-out acc (step: acc) | train reward (last third) | optimizer steps | rows trained | wall s |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        ev = ", ".join(f"{s}: {a:.3f}" for s, a in r["eval_curve"])
        lines.append(f"| {r['arm']} | {r['seed']} | {ev} | {r['reward_tail']:.3f} | {r['optim_steps']} | {r['update_rows']:.0f} | {r['wall_s']:.0f} |")
    fig = out.with_suffix(".png")
    try:
        figure(results, fig)
        lines += ["", f"![curves]({fig.name})"]
    except ImportError:
        lines += ["", "(matplotlib missing: no figure; pip install 'tokencredit[plots]')"]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--runs-root", default="runs", help="where the runs go (with --smoke: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "batching_ablation.md"), help="the report (with --smoke: a temp dir)")
    ap.add_argument("--report-only", action="store_true", help="no new runs: redraw from RUNS_ROOT/ablation.jsonl")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "every arm, seed 0, model.name=tiny-random, 4 new tokens, 2 eval problems")
    ap.add_argument("extra", nargs="*", help="extra key=value overrides for every arm")
    args = ap.parse_args()
    if args.smoke:  # smoke sizes become the defaults: flags given explicitly still win
        tmp = Path(tempfile.mkdtemp(prefix="batching-ablation-smoke-"))
        ap.set_defaults(steps=1, seeds=[0], runs_root=str(tmp / "runs"), out=str(tmp / "batching_ablation.md"))
        args = ap.parse_args()
        args.extra = [*SMOKE_OVERRIDES, *args.extra]
    runs_root, out = Path(args.runs_root), Path(args.out)
    log = runs_root / "ablation.jsonl"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    header = [
        "# Batching ablation (cancellation paper Table 2 arms)",
        "",
        f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()} CPU, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; commit {commit or '?'}",
        f"- command: `python bench/batching_ablation.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
        + (f" {' '.join(args.extra)}" if args.extra else "") + "`",
    ]
    if args.report_only:
        results = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        print(report(results, out, header))
        return 0
    runs_root.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    t0 = time.time()
    for seed in args.seeds:
        for arm in args.arms:
            r = {"arm": arm, "seed": seed, **summarize(run_arm(arm, seed, args.steps, runs_root, args.extra))}
            results.append(r)
            with open(log, "a") as f:
                f.write(json.dumps(r) + "\n")
            report(results, out, header + [f"- wall time so far: {time.time() - t0:.0f} s"])
    print(report(results, out, header + [f"- total wall time: {time.time() - t0:.0f} s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
