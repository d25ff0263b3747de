"""Cost of token weighting on the embedded default: the same run (same seed,
same prompts) with `token_weights.method=none` and with each method given,
side by side in one process, one after the other.

    python bench/token_weight_overhead.py --steps 4 --methods resrl,forking [key=value ...]
    python bench/token_weight_overhead.py --smoke   # tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py)

Reports per-step means over steps 2..N (step 1 pays warm-up) of the whole step,
the pre-update forward (ResRL needs second-to-last-layer hidden states, which
the rollout-time forward does not keep), the weighting itself, and the ratio
to the `none` run. Runs are identical up to the first update, after which the
policies (and so the sampled responses) differ; compare per-token costs too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

from tokencredit.config import load_config
from tokencredit.trainer import Trainer


# --smoke: the tiny random model, a few tokens; no reward-balanced buffer, so the one rollout step also updates
# (the tiny model's rewards are all 0, and the buffer would hold every zero-advantage row back)
SMOKE_OVERRIDES = ["model.name=tiny-random", "model.threads=1", "rollout.max_new_tokens=4", "probes.flip.every=0",
                   "batching.reward_balance.tau=null"]


def run(method: str, steps: int, extra: list[str], root: str) -> list[dict]:
    cfg = load_config(None, [f"token_weights.method={method}", f"train.steps={steps}", "eval.num_problems=0",
                             "output.progress=false", "output.save_every=0", f"output.root={root}", f"output.run_name={method}", *extra])
    tr = Trainer(cfg)
    tr.train()
    rows = [json.loads(l) for l in (tr.run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if "time_step_s" in r and "pg_loss" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--methods", default="resrl", help="comma-separated methods to compare with none")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         f"--steps 1 {' '.join(SMOKE_OVERRIDES)} (runs go to a temp dir as always)")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    if args.smoke:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(steps=1)
        args = ap.parse_args()
        args.extra = [*SMOKE_OVERRIDES, *args.extra]
    root = tempfile.mkdtemp(prefix="tw-overhead-")
    res = {m: run(m, args.steps, args.extra, root) for m in ["none", *args.methods.split(",")]}
    if not all(res.values()):
        raise SystemExit(f"no update in {[m for m, rows in res.items() if not rows]}: nothing to compare "
                         "(the reward-balanced buffer held every row back? try more --steps or batching.reward_balance.tau=null)")

    def mean(rows, key):
        rows = rows[1:] or rows
        return sum(r.get(key, 0.0) for r in rows) / max(len(rows), 1)

    def per_tok(rows):
        rows = rows[1:] or rows
        return sum(r["time_step_s"] for r in rows) / max(sum(r["update_rows"] * r["response_len_mean"] for r in rows), 1)

    base = mean(res["none"], "time_step_s")
    base_tok = per_tok(res["none"])
    print(f"# token weighting overhead, {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU x{os.cpu_count()}, "
          f"steps={args.steps}, extra={' '.join(args.extra) or '-'}")
    print("| method | step s | pre-update forward s | weighting s | step / none | s per 1k update tokens / none |")
    print("|---|---|---|---|---|---|")
    for m, rows in res.items():
        st = mean(rows, "time_step_s")
        print(f"| {m} | {st:.2f} | {mean(rows, 'time_old_logprob_s'):.2f} | {mean(rows, 'time_token_weights_s'):.3f} | "
              f"{st / base:.3f} | {per_tok(rows) / base_tok:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
