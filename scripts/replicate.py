"""Small-scale replication of the cancellation paper's probe findings on SmolLM2 (issue 15;
results: docs/results/replication.md).

    python scripts/replicate.py                       # every part, --size full, seed 0 -> replication/
    python scripts/replicate.py --size small --seed 1 --out replication-s1
    make replicate SIZE=small SEED=1
    python scripts/replicate.py --smoke   # tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py)

Parts, in order; each writes OUT/<part>.json and is skipped when that file exists, so a
killed study continues where it stopped (delete a file to redo its part):

  base   `tokencredit train` on the ablation task (built-in arithmetic level 2, held-out
         accuracy ~30% at start, so groups are mixed; docs/results/batching_ablation.md) for
         --base-steps rollout steps: its last checkpoint is the state every probe starts
         from, with an AdamW state that has seen the run's optimizer steps (App. D.3:
         a fresh Adam's first step is close to sign descent, so a used state is the default).
  batch  one rollout batch of max(budgets) prompts x 8 at that checkpoint (the run's next
         prompts, probes/context.py sample_batch) with dynamic sampling (only prompts whose
         rewards differ), saved as OUT/rollouts.safetensors; the smaller budgets are its
         first k groups (nested: the same rows, more of them).
  flip   claims 1, 2 and 5: for every budget x update, the polarity probe (Alg. 2: the update
         with A and with A+ = A 1[A>0] from the same state; probes/polarity.py) on the
         budget's rows: boosted / suppressed / stable fractions of A>0 and A<0 rows'
         tokens after one update, their sign agreement, category masses (Fig. 4), each
         with a 95% bootstrap interval over prompts (tokens of one rollout are correlated).
         Updates: AdamW from the checkpoint's optimizer state at lr 1e-6 (the paper's) and
         2e-5 (ours), and plain SGD on Eq. 2 at lr 0.1 (App. D.2).
  fresh  the same probe with updates that carry no earlier batch: a fresh AdamW at lr 1e-6
         (its first step is close to sign descent, App. D.3) and SGD at lr 1e-3 (a small step).
  momentum  the AdamW step on the middle budget with the batch's A and with A = 0: how much
         of a step from a used optimizer state is the earlier batches' momentum.
  masking  claim 3: the masking probe (Table 1; probes/masking.py) at the saved state, SGD lr
         0.1, every reading, on the smallest budget (LM-head and full, without and with the
         pair condition) and the largest (LM-head only); Boost Rates with a bootstrap over
         prompts. Each run is kept as OUT/masking_<name>.json as it finishes.
  agreement  App. D.1: sign agreement of Delta log p, full vs LM-head-only SGD step, at lr
         1e-4 ... 1e-1 on the smallest budget.
  value  claim 4: the base run continued one training step (16 prompts x 8, per-token flip
         records), then the value probe (probes/value.py) on --value-tokens tokens (equal
         boosted / suppressed x A>0 / A<0) with --value-M continuations per branch, every
         estimator (direct, Eq. 20, A_M), gaps with a bootstrap over prompts, top-k% entropy.
Then OUT/flip_budget.png (claims 1 and 2), OUT/masking.png (claim 3), OUT/value_gap.png
(claim 4).

Size knob: --size full = budgets 4, 16, 64 prompts (x 8 rollouts), value M = 32 on 96 tokens
(seed 0 on 2 cores: base 5, batch 8, flip 35, fresh 19, momentum 5, masking 11, agreement 7,
value 23 minutes); small = 2, 4, 8 prompts, M = 4 on 8 tokens (the pipeline's smoke).

Simplifications: one state (one checkpoint), one batch per seed; a budget's update is one
optimizer step on all its rows (the trainer would split it into mini-batches); the same
eps as the flip probe (1e-6) decides "stable".
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"small": (2, 4, 8), "full": (4, 16, 64)}
UPDATES = {  # name -> (update, lr, optimizer state: "saved" = the checkpoint's, "fresh" = a new AdamW)
    "adamw_lr1e-6": ("adamw", 1e-6, "saved"),
    "adamw_lr2e-5": ("adamw", 2e-5, "saved"),
    "sgd_lr0.1": ("sgd", 0.1, None),
}
# part `fresh`: arms without earlier batches' momentum. A fresh AdamW's first step is
# lr * g / (|g| + eps), close to sign descent (App. D.3); SGD at lr 1e-3 is the batch's own
# gradient at a step small enough to be near first order (SGD 0.1 is not, see replication.md).
FRESH = {
    "adamw_fresh_lr1e-6": ("adamw", 1e-6, "fresh"),
    "sgd_lr1e-3": ("sgd", 1e-3, None),
}
TASK = ["data.difficulty=2", "rollout.n=8", "eval.num_problems=0", "probes.flip.every=0"]


# ------------------------------------------------------------------ parts
def part_base(out: Path, args) -> dict:
    run = out / "base"
    cmd = [sys.executable, "-m", "tokencredit", "train", *TASK, f"train.steps={args.base_steps}", f"train.seed={args.seed}",
           f"output.root={out}", "output.run_name=base", "output.progress=false", "output.save_final=false",
           f"model.threads={args.threads}", *args.override]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"base run failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"command": " ".join(cmd[1:]), "run": str(run), "wall_s": round(time.perf_counter() - t, 1),
            "reward_mean": [r["reward_mean"] for r in rows if "reward_mean" in r],
            "optimizer_steps": json.loads((run / "summary.json").read_text())["optimizer_steps"]}


def _context(out: Path, args, budget: int):
    from tokencredit.probes.context import load_model_into, resolve_context

    # dynamic sampling (DAPO; the 80/20 paper's setup): `budget` prompts whose 8 rewards are not all
    # equal, so every prompt of a budget moves the update and A>0 / A<0 rows exist at every budget
    ds = ["rollout.dynamic_sampling=true", "rollout.max_gen_rounds=4"]
    ctx = resolve_context(run=str(out / "base"), overrides=[f"rollout.prompts_per_step={budget}", "rollout.n=8", *ds],
                          threads=args.threads, out=str(out / "probe"))
    return load_model_into(ctx)


def _first_groups(full, k: int):
    """(rows of the first k groups of `full` in sampling order, how many groups that is):
    budgets are nested, the same rows and more of them."""
    gids = full.group_id.tolist()
    keep = set(list(dict.fromkeys(gids))[:k])
    return full.select([i for i, g in enumerate(gids) if g in keep]), len(keep)


def part_batch(out: Path, args) -> dict:
    from tokencredit.batch import save_batch
    from tokencredit.probes.context import sample_batch

    budget = max(SIZES[args.size])
    ctx = _context(out, args, budget)
    t = time.perf_counter()
    batch, m = sample_batch(ctx, args.seed)
    save_batch(batch, out / "rollouts")
    return {"prompts": int(batch.group_id.unique().numel()), "rows": len(batch), "reward_mean_sampled": m["reward_mean"],
            "reward_mean": float(batch.reward.mean()), "sample_s": round(time.perf_counter() - t, 1),
            "mixed_groups": int(sum(len(set(batch.reward[batch.group_id == g].tolist())) > 1 for g in batch.group_id.unique())),
            "checkpoint": str(ctx.checkpoint), "temperature": ctx.temperature}


def part_flip(out: Path, args) -> dict:
    return _flip_runs(out, args, UPDATES)


def part_fresh(out: Path, args) -> dict:
    return _flip_runs(out, args, FRESH)


def _flip_runs(out: Path, args, updates: dict) -> dict:
    from tokencredit.batch import load_batch
    from tokencredit.probes.bootstrap import flip_fractions_ci
    from tokencredit.probes.categories import category_mass
    from tokencredit.probes.polarity import polarity_probe
    from tokencredit.update import LossSpec

    full = load_batch(out / "rollouts")
    ctx = _context(out, args, max(SIZES[args.size]))
    cfg, state = ctx.cfg, ctx.optimizer_state
    res: dict = {"optimizer_state_steps": int(ctx.state.get("optim_steps", -1)), "runs": []}
    for budget in SIZES[args.size]:
        batch, n_prompts = _first_groups(full, budget)
        if n_prompts < budget:
            print(f"  budget {budget}: the batch holds only {n_prompts} prompts", flush=True)
        for name, (update, lr, opt_state) in updates.items():
            kw = {}
            if update == "adamw":
                kw = dict(optimizer_state=state if opt_state == "saved" else None, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                          grad_clip=cfg.train.grad_clip, spec=LossSpec.from_config(cfg, with_kl=False))
            t = time.perf_counter()
            table, summ = polarity_probe(ctx.model, batch, update=update, lr=lr, temperature=ctx.temperature,
                                         chunk_tokens=cfg.model.chunk_tokens, micro_rows=args.micro_rows, **kw)
            stats = flip_fractions_ci(table, batch.group_id.numpy(), seed=args.seed)  # bootstrap over prompts
            cats = category_mass(table, ctx.tokenizer, weight="boosted")
            res["runs"].append({"budget": budget, "prompts": n_prompts, "update": name, "lr": lr, "optimizer_state": opt_state, "rows": len(batch), "tokens": summ["tokens"],
                                "rows_pos": summ["rows_pos"], "rows_neg": summ["rows_neg"], "rows_zero": summ["rows_zero"],
                                "stats": stats, "categories": {k: {c: v[c] for c in ("math", "format", "reasoning")}
                                                               for k, v in cats.items() if k != "shift"},
                                "seconds": round(time.perf_counter() - t, 1)})
            s = stats["grpo"]
            print(f"  budget {budget:3d} x 8, {name:13s}: A>0 boosted {s['pos']['boosted'][0]:.3f}, A<0 boosted "
                  f"{s['neg']['boosted'][0]:.3f}, A+ agreement {stats['sign_agreement'][0]:.3f} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    return res


def part_momentum(out: Path, args) -> dict:
    """How much of an AdamW step from a used state is this batch's: the same step with every
    advantage set to 0 still moves the weights (first moment of earlier batches, weight
    decay). On the middle budget: mean |Delta log p| and the moved-token share of the step
    with the batch's A and with A = 0, and how often their signs agree."""
    import copy

    from tokencredit.batch import load_batch
    from tokencredit.model.forward import forward_rows
    from tokencredit.probes.polarity import adamw_update
    from tokencredit.update import LossSpec

    full = load_batch(out / "rollouts")
    ctx = _context(out, args, max(SIZES[args.size]))
    cfg = ctx.cfg
    budget = SIZES[args.size][1]
    batch, _ = _first_groups(full, budget)
    kw = dict(temperature=ctx.temperature, chunk_tokens=cfg.model.chunk_tokens, micro_rows=args.micro_rows)
    mask = batch.response_mask > 0

    def logprob(m):
        return forward_rows(m, batch, with_entropy=False, **kw)["logprob"][mask]  # [N]

    before = logprob(ctx.model)
    res: dict = {"budget": budget, "rows": len(batch), "tokens": int(mask.sum()), "runs": []}
    for name, (update, lr, opt_state) in UPDATES.items():
        if update != "adamw" or opt_state != "saved":
            continue
        fn = adamw_update(lr, optimizer_state=ctx.optimizer_state, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                          grad_clip=cfg.train.grad_clip, spec=LossSpec.from_config(cfg, with_kl=False), **kw)
        d = {}
        for arm, adv in (("batch", batch.advantage), ("zero_advantage", torch.zeros_like(batch.advantage))):
            m = copy.deepcopy(ctx.model)
            fn(m, batch, adv.clone())
            d[arm] = logprob(m) - before
            del m
        res["runs"].append({"update": name, "lr": lr,
                            **{f"mean_abs_{k}": float(v.abs().mean()) for k, v in d.items()},
                            **{f"moved_{k}": float((v.abs() > 1e-6).double().mean()) for k, v in d.items()},
                            "sign_agreement": float((torch.sign(d["batch"]) == torch.sign(d["zero_advantage"])).double().mean())})
        print(f"  {name}: mean |d| batch {res['runs'][-1]['mean_abs_batch']:.2e}, A=0 {res['runs'][-1]['mean_abs_zero_advantage']:.2e}, "
              f"sign agreement {res['runs'][-1]['sign_agreement']:.3f}", flush=True)
    return res


# masking (claim 3): which batches, and which runs on each; name -> (budget index, pair, LM-head candidates, full candidates)
MASKING = {
    "small": {"b0": (0, False, 32, 2), "b0_pair": (0, True, 32, 2), "b2_head": (2, False, 64, 0)},
    "full": {"b0": (0, False, 128, 8), "b0_pair": (0, True, 128, 4), "b2_head": (2, False, 256, 0)},
}


def part_masking(out: Path, args) -> dict:
    """Claim 3 (Table 1 under every reading): the masking probe at the saved state on the
    study's batches (smallest budget with and without the pair condition, LM-head and full;
    the largest budget LM-head only), Boost Rates with a bootstrap over prompts, and the
    LM-head vs full sign agreement (App. D.1)."""
    from tokencredit.batch import load_batch
    from tokencredit.probes.bootstrap import boost_rates_ci
    from tokencredit.probes.masking import masking_probe

    full = load_batch(out / "rollouts")
    ctx = _context(out, args, max(SIZES[args.size]))
    res: dict = {"runs": []}
    for name, (bi, pair, n_head, n_full) in MASKING[args.size].items():
        done = out / f"masking_{name}.json"  # each run is kept as it finishes: a killed part resumes at the next run
        if done.exists():
            res["runs"].append(json.loads(done.read_text()))
            continue
        budget = SIZES[args.size][bi]
        batch, n_prompts = _first_groups(full, budget)
        t = time.perf_counter()
        modes = ("lm_head", "full") if n_full else ("lm_head",)
        tables, summ = masking_probe(ctx.model, batch, n_candidates=n_head, n_full=n_full, pair=pair, lr=0.1, seed=args.seed,
                                     modes=modes, temperature=ctx.temperature, chunk_tokens=ctx.cfg.model.chunk_tokens,
                                     micro_rows=args.micro_rows, progress=False)
        ci = boost_rates_ci(tables["candidates"], batch.group_id.numpy(), seed=args.seed)
        run = {"name": name, "budget": budget, "prompts": n_prompts, "rows": len(batch), "pair": pair,
               "seconds": round(time.perf_counter() - t, 1), "ci": ci,
               "summary": {k: v for k, v in summ.items() if k != "table"}, "table": summ["table"]}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(run, indent=1, default=str))
        tmp.replace(done)
        res["runs"].append(run)
        print(f"  {name}: budget {budget}, pair {pair}, {summ['candidates']} candidates ({summ['full_candidates']} full), "
              f"sign agreement {summ['sign_agreement']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    return res


def part_agreement(out: Path, args) -> dict:
    """App. D.1's sign agreement of Delta log p, full-parameter vs LM-head-only SGD step, on the
    smallest budget at several step sizes: the masking part's lr 0.1 is far from first order
    on this model (claim 1), and the paper's Fig. 10 compares standard (small) training steps."""
    from tokencredit.batch import load_batch
    from tokencredit.probes.masking import masking_probe

    full = load_batch(out / "rollouts")
    ctx = _context(out, args, max(SIZES[args.size]))
    batch, n_prompts = _first_groups(full, SIZES[args.size][0])
    res: dict = {"budget": SIZES[args.size][0], "rows": len(batch), "runs": []}
    for lr in (1e-4, 1e-3, 1e-2, 1e-1):
        # one candidate on each path: the agreement is over all tokens and does not depend on the candidates
        _, summ = masking_probe(ctx.model, batch, n_candidates=1, n_full=1, sign_split=False, lr=lr, seed=args.seed,
                                temperature=ctx.temperature, chunk_tokens=ctx.cfg.model.chunk_tokens, micro_rows=args.micro_rows)
        res["runs"].append({"lr": lr, "sign_agreement": summ["sign_agreement"], "mean_abs_delta_lm_head": summ["mean_abs_delta_lm_head"],
                            "mean_abs_delta_full": summ["mean_abs_delta_full"], "tokens": summ["tokens"]})
        print(f"  SGD lr {lr:g}: sign agreement full vs LM-head {summ['sign_agreement']:.3f}, mean |d| head "
              f"{summ['mean_abs_delta_lm_head']:.2e}, full {summ['mean_abs_delta_full']:.2e}", flush=True)
    return res


def part_value(out: Path, args) -> dict:
    """Claim 4 (Fig. 5a/5b): token values of one training update at the saved state.

    The base run is continued for one rollout step (`tokencredit train --resume` on a
    copy whose checkpoints are hard links) of 16 prompts x 8 with the flip probe's
    per-token records on and dynamic sampling (so the step's groups are mixed), 4
    optimizer steps (mini-batches of 4 prompts, the paper's 128 / 32); the value probe then values
    equal numbers of boosted / suppressed tokens of A>0 and A<0 rows of that update with
    M continuations per branch, under the policy that sampled it (the base run's last
    checkpoint), with all three estimators (direct, Eq. 20, A_M) on the same tokens."""
    import os
    import shutil

    from tokencredit.checkpoint import list_checkpoints
    from tokencredit.probes.value import run_value_probe

    base, run = out / "base", out / "value_run"
    last = max(int(p.name.split("_")[1]) for p in list_checkpoints(base / "checkpoints"))
    step = last + 1
    if not (run / "probes" / f"flip_step_{step}.parquet").exists():
        shutil.rmtree(run, ignore_errors=True)
        # checkpoint files are written once and never changed in place: hard links cost no disk
        shutil.copytree(base, run, copy_function=lambda a, b: os.link(a, b) if "/checkpoints/" in a else shutil.copy2(a, b))
        cmd = [sys.executable, "-m", "tokencredit", "train", "--resume", str(run), f"train.steps={step}",
               "probes.flip.every=1", "probes.flip.save_tokens=true", "rollout.dynamic_sampling=true",
               # 16 prompts (a prompt bootstrap needs more than 4), 4 optimizer steps per rollout step as in the
               # paper's 128 / 32
               "rollout.prompts_per_step=16", "train.mini_batch_size=4",
               "output.progress=false", "output.save_every=0", "output.save_final=false", f"model.threads={args.threads}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"value step failed:\n{r.stderr[-3000:]}")
    t = time.perf_counter()
    res = run_value_probe(run, step, n_tokens=args.value_tokens, M=args.value_M, seed=args.seed, threads=args.threads,
                          progress=True)
    res["path"] = str(res["path"])
    return {"step": step, "value_seconds": round(time.perf_counter() - t, 1), **res,
            "prompt_bootstrap": value_tables(run, step, res)}


def value_tables(run: Path, step: int, res: dict, seed: int = 0) -> dict:
    """The value gap of every estimator (on the tokens where all three are defined),
    by row sign and per top-k% entropy subset, each with a 95% interval from a
    bootstrap over prompts (probes/bootstrap.py gap_ci; the probe's own intervals
    resample tokens), and each estimator's median per-token standard error."""
    from tokencredit.probes.bootstrap import gap_ci
    from tokencredit.probes.value import ESTIMATORS, as_float as f
    from tokencredit.rundir import read_jsonl, read_parquet

    cols = read_parquet(run / "probes" / f"flip_step_{step}.parquet")
    prompt_of = {int(r): int(i) for r, i in zip(cols["row"], cols["prompt_index"])}
    recs = read_jsonl(Path(res["path"]))
    recs = [r for r in recs if all(np.isfinite(f(r.get(f"value_{e}"))) for e in ESTIMATORS)]
    g = np.array([prompt_of[int(r["row"])] for r in recs])
    b = np.array([r["kind"] == "boosted" for r in recs])
    sign = np.array([r["sign"] for r in recs])
    ent = np.array([f(r.get("entropy")) for r in recs])
    out: dict = {"tokens": len(recs), "prompts": int(len(set(g.tolist()))), "estimators": {}}
    for e in ESTIMATORS:
        v = np.array([f(r[f"value_{e}"]) for r in recs])
        se = np.array([f(r[f"se_{e}"]) for r in recs])
        d = {"gap": list(gap_ci(v, b, g, seed=seed)), "median_se": float(np.nanmedian(se)),
             "mean_boosted": float(v[b].mean()), "mean_suppressed": float(v[~b].mean()),
             "by_sign": {s_: list(gap_ci(v[sign == s_], b[sign == s_], g[sign == s_], seed=seed)) for s_ in ("pos", "neg")},
             "entropy_topk": []}
        for k, cut in (res.get("entropy_cutoffs") or {}).items():
            sel = ent >= cut
            d["entropy_topk"].append({"k": float(k), "n": int(sel.sum()), "gap": list(gap_ci(v[sel], b[sel], g[sel], seed=seed))})
        out["estimators"][e] = d
    return out


def figures(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_all = [r for part in ("flip", "fresh") if (out / f"{part}.json").exists()
                for r in json.loads((out / f"{part}.json").read_text())["runs"]]
    names = list(dict.fromkeys(r["update"] for r in runs_all))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        runs = [r for r in runs_all if r["update"] == name]
        x = [r["budget"] for r in runs]
        for var, sub, kind, style in (("grpo", "pos", "boosted", "C0-o"), ("grpo", "neg", "boosted", "C3-o"),
                                      ("positive_only", "pos", "boosted", "C0--s"), ("positive_only", "neg", "boosted", "C3--s")):
            v = np.array([r["stats"][var][sub][kind] for r in runs])  # [k, 3]
            ax.errorbar(x, v[:, 0], yerr=[v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]], fmt=style, capsize=3,
                        label=f"{'A' if var == 'grpo' else 'A+'} update, {'A>0' if sub == 'pos' else 'A<0'} rows")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(b) for b in x])
        ax.set_title(name + (" (saved state)" if runs[0].get("optimizer_state", "saved" if "adamw" in name else None) == "saved" else ""))
        ax.set_xlabel("prompts in the update (x 8 rollouts)")
        ax.axhline(0.5, color="grey", lw=0.5)
    np.atleast_1d(axes)[0].set_ylabel("fraction of tokens boosted")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle("Token flips after one update vs the update's batch (95% CI, bootstrap over prompts)")
    fig.tight_layout()
    fig.savefig(out / "flip_budget.png", dpi=120)


def figures_categories(out: Path) -> None:
    """Claim 5 (Fig. 4): boosted mass by token category, GRPO vs positive-only, per update, at
    every budget (one panel per category)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for part in ("flip", "fresh") if (out / f"{part}.json").exists() for r in json.loads((out / f"{part}.json").read_text())["runs"]]
    names = list(dict.fromkeys(r["update"] for r in runs))
    budgets = sorted({r["budget"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
    w = 0.8 / len(names)
    for ax, cat in zip(axes, ("math", "format", "reasoning")):
        for j, name in enumerate(names):
            by_b = {r["budget"]: r for r in runs if r["update"] == name}
            x = np.arange(len(budgets)) + (j - (len(names) - 1) / 2) * w
            g = [by_b[b]["categories"]["grpo"][cat] if b in by_b else np.nan for b in budgets]
            p = [by_b[b]["categories"]["positive_only"][cat] if b in by_b else np.nan for b in budgets]
            bars = ax.bar(x, g, w, label=name)
            ax.scatter(x, p, marker="_", s=120, color="black", zorder=3, label="A+ (positive-only)" if j == 0 else None)
            for bar in bars:
                bar.set_alpha(0.85)
        ax.set_xticks(np.arange(len(budgets)), [f"{b} prompts" for b in budgets])
        ax.set_title(f"{cat} tokens")
    axes[0].set_ylabel("share of boosted mass (bars: GRPO)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(names) + 1, fontsize=8)
    fig.suptitle("Boosted mass by token category (Fig. 4): GRPO (bars) vs positive-only (black marks)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out / "categories.png", dpi=120)


def figures_masking(out: Path) -> None:
    """Claim 3: Boost Rate per mask set, one panel per reading, LM-head and full, with the
    prompt-bootstrap intervals, for the smallest budget without the pair condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads((out / "masking.json").read_text())["runs"]
    readings = ("all", "pos", "neg", "aligned")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
    sets = ("random", "same_token", "low_conf", "same_token&low_conf")
    arms = [(r["name"], m) for r in runs for m in ("lm_head", "full") if any(c["mode"] == m for c in r["ci"])]
    w = 0.8 / max(len(arms), 1)
    for ax, reading in zip(axes, readings):
        for j, (name, mode) in enumerate(arms):
            ci = {c["set"]: c for c in next(r for r in runs if r["name"] == name)["ci"] if c["reading"] == reading and c["mode"] == mode}
            x = np.arange(len(sets)) + (j - (len(arms) - 1) / 2) * w
            v = np.array([ci[k]["boost_rate"] if k in ci else [np.nan] * 3 for k in sets])  # [4, 3]
            run = next(r for r in runs if r["name"] == name)
            label = f"{run['prompts']} prompts{', pair' if run['pair'] else ''}, {'LM-head' if mode == 'lm_head' else 'full'}"
            ax.bar(x, v[:, 0], w, yerr=[v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]], capsize=2, label=label)
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_xticks(np.arange(len(sets)), ["random", "same", "low conf", "same & low"], fontsize=8)
        ax.set_title({"all": "(a) all signs", "pos": "(b+) A>0 copies only", "neg": "(b-) A<0 copies only",
                      "aligned": "(c) sign-aligned"}[reading])
    axes[0].set_ylabel("Boost Rate")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(arms), fontsize=8)
    fig.suptitle("Masking effect (Table 1) under every reading; SGD lr 0.1 from the saved state (95% CI, bootstrap over prompts)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out / "masking.png", dpi=120)


def figures_value(out: Path) -> None:
    """Claim 4: Fig. 5a (gap per estimator, all rows and by row sign) and Fig. 5b (gap on
    the batch's top-k% entropy tokens), 95% intervals from a bootstrap over prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = json.loads((out / "value.json").read_text())
    est = v["prompt_bootstrap"]["estimators"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [e for e in ("direct", "am") if e in est]  # Eq. 20 is orders of magnitude off this scale: printed, not drawn
    for j, (key, label) in enumerate((("all", "all rows"), ("pos", "A>0 rows"), ("neg", "A<0 rows"))):
        g = np.array([est[e]["gap"] if key == "all" else est[e]["by_sign"][key] for e in names])  # [E, 3]
        x = np.arange(len(names)) + (j - 1) * 0.27
        a.bar(x, g[:, 0], 0.27, yerr=[g[:, 0] - g[:, 1], g[:, 2] - g[:, 0]], capsize=2, label=label)
    a.set_xticks(np.arange(len(names)), ["direct: avg0 - avg_alt", "A_M: avg0 - avg1"])
    a.axhline(0, color="grey", lw=0.5)
    a.set_ylabel("value gap (boosted - suppressed)")
    a.set_title(f"Fig. 5a: M = {v['M']}, {v['prompt_bootstrap']['tokens']} tokens", fontsize=10)
    if "eq20" in est:
        q = est["eq20"]["gap"]
        a.text(0.02, 0.97, f"Eq. 20 (off scale): {q[0]:.3g} [{q[1]:.3g}, {q[2]:.3g}]", transform=a.transAxes, va="top", fontsize=7)
    a.legend(fontsize=7, loc="upper right")
    for e in names:
        t = est[e]["entropy_topk"]
        if t:
            k = [r["k"] for r in t]
            g = np.array([r["gap"] for r in t])
            b.errorbar(k, g[:, 0], yerr=[g[:, 0] - g[:, 1], g[:, 2] - g[:, 0]], fmt="-o", capsize=2, label=e)
    b.axhline(0, color="grey", lw=0.5)
    b.set_xlabel("top-k% highest-entropy tokens of the batch (nested subsets)")
    b.set_title("Fig. 5b: gap on the top-k% entropy tokens", fontsize=10)
    b.legend(fontsize=7)
    fig.suptitle("Value gap of boosted vs suppressed tokens (95% CI, bootstrap over prompts)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "value_gap.png", dpi=120)


def _ci(v: list[float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def tables(outs: list[Path]) -> str:
    """Markdown tables of every finished part of one or more study directories (one per seed)."""
    from tokencredit.batch import load_batch

    lines = []
    for out in outs:
        runs = [r for part in ("flip", "fresh") if (out / f"{part}.json").exists() for r in json.loads((out / f"{part}.json").read_text())["runs"]]
        batch = json.loads((out / "batch.json").read_text())
        rows = load_batch(out / "rollouts")
        lines += [f"### {out.name}: seed {batch['args']['seed']}, reward of the saved batch {float(rows.reward.mean()):.3f}, "
                  f"{batch['mixed_groups']} mixed groups of {batch['prompts']}, base run's optimizer steps "
                  f"{json.loads((out / 'base.json').read_text())['optimizer_steps']}", ""]
        if runs:
            lines += ["| prompts x 8 | update | A>0 boosted | A>0 suppressed | A<0 boosted | A<0 suppressed | "
                      "A+: A>0 boosted | A+: A<0 boosted | sign agreement A vs A+ | rows +/-/0 |",
                      "|---:|---|---|---|---|---|---|---|---|---|"]
            for r in runs:
                g, p = r["stats"]["grpo"], r["stats"]["positive_only"]
                lines.append(f"| {r['budget']} | {r['update']} | {_ci(g['pos']['boosted'])} | {_ci(g['pos']['suppressed'])} | "
                             f"{_ci(g['neg']['boosted'])} | {_ci(g['neg']['suppressed'])} | {_ci(p['pos']['boosted'])} | "
                             f"{_ci(p['neg']['boosted'])} | {_ci(r['stats']['sign_agreement'])} | "
                             f"{r['rows_pos']}/{r['rows_neg']}/{r['rows_zero']} |")
            lines += ["", "Boosted mass by token category (Fig. 4), GRPO vs positive-only:", "",
                      "| prompts x 8 | update | GRPO math / format / reasoning | A+ math / format / reasoning |", "|---:|---|---|---|"]
            for r in runs:
                c = r["categories"]
                f = lambda d: " / ".join(f"{d[k]:.3f}" for k in ("math", "format", "reasoning"))  # noqa: E731
                lines.append(f"| {r['budget']} | {r['update']} | {f(c['grpo'])} | {f(c['positive_only'])} |")
            lines.append("")
        if (out / "momentum.json").exists():
            mo = json.loads((out / "momentum.json").read_text())
            lines += [f"Momentum part ({mo['budget']} prompts x 8, AdamW from the saved state; the same step with the batch's A and with A = 0):", "",
                      "| update | mean abs Delta log p, batch A | mean abs Delta log p, A = 0 | moved tokens, A / A = 0 | sign agreement |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['update']} | {r['mean_abs_batch']:.2e} | {r['mean_abs_zero_advantage']:.2e} | "
                      f"{r['moved_batch']:.3f} / {r['moved_zero_advantage']:.3f} | {r['sign_agreement']:.3f} |" for r in mo["runs"]] + [""]
        if (out / "masking.json").exists():
            lines += masking_table(json.loads((out / "masking.json").read_text()))
        if (out / "agreement.json").exists():
            ag = json.loads((out / "agreement.json").read_text())
            lines += [f"Sign agreement of Delta log p, full-parameter vs LM-head-only SGD step ({ag['budget']} prompts, {ag['rows']} rows):", "",
                      "| SGD lr | sign agreement | mean abs Delta, LM-head only | mean abs Delta, full |", "|---:|---:|---:|---:|"]
            lines += [f"| {r['lr']:g} | {r['sign_agreement']:.3f} | {r['mean_abs_delta_lm_head']:.2e} | {r['mean_abs_delta_full']:.2e} |"
                      for r in ag["runs"]] + [""]
        if (out / "value.json").exists():
            lines += value_table(json.loads((out / "value.json").read_text()))
    return "\n".join(lines)


def masking_table(m: dict) -> list[str]:
    lines = []
    for r in m["runs"]:
        s = r["summary"]
        lines += [f"Masking, {r['name']}: {r['prompts']} prompts x 8 ({r['rows']} rows, {s['tokens']} tokens, {s['tokens_in_loss']} in the "
                  f"loss), pair condition {'on' if r['pair'] else 'off'}, low confidence: {s['low_conf_rule']}; {s['candidates']} "
                  f"candidates, {s['full_candidates']} also full-parameter; sign agreement full vs LM-head "
                  f"{s['sign_agreement']:.3f}; {r['seconds']:.0f} s", "",
                  "| reading | set | LM-head n | LM-head Boost Rate | LM-head Mean Boost | Full n | Full Boost Rate | Full Mean Boost |",
                  "|---|---|---:|---|---:|---:|---|---:|"]
        ci = {(c["reading"], c["set"], c["mode"]): c for c in r["ci"]}
        for row in r["table"]:
            cells = []
            for mode in ("lm_head", "full"):
                c = ci.get((row["reading"], row["set"], mode))
                cells += [str(c["n"]), _ci(c["boost_rate"]), f"{c['mean_boost']:+.2e}"] if c else ["0", "-", "-"]
            lines.append(f"| {row['reading']} | {row['set']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def value_table(v: dict) -> list[str]:
    pb = v["prompt_bootstrap"]
    lines = [f"Value probe: rollout step {v['step']} of the continued base run, M = {v['M']} continuations per branch, "
             f"{pb['tokens']} tokens from {pb['prompts']} prompts where all three estimators are defined, "
             f"{v['value_seconds']:.0f} s; intervals: bootstrap over prompts", "",
             "| estimator | gap (boosted - suppressed) | A>0 rows | A<0 rows | mean boosted | mean suppressed | median per-token se |",
             "|---|---|---|---|---:|---:|---:|"]
    for e, d in pb["estimators"].items():
        lines.append(f"| {e} | {_ci(d['gap'])} | {_ci(d['by_sign']['pos'])} | {_ci(d['by_sign']['neg'])} | "
                     f"{d['mean_boosted']:.3f} | {d['mean_suppressed']:.3f} | {d['median_se']:.3f} |")
    lines += ["", "| top-k% entropy | " + " | ".join(pb["estimators"]) + " |", "|---:|" + "---|" * len(pb["estimators"])]
    ks = [t["k"] for t in next(iter(pb["estimators"].values()))["entropy_topk"]]
    for i, k in enumerate(ks):
        cells = [f"{_ci(d['entropy_topk'][i]['gap'])} (n={d['entropy_topk'][i]['n']})" for d in pb["estimators"].values()]
        lines.append(f"| {k:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


PARTS = {"base": part_base, "batch": part_batch, "flip": part_flip, "fresh": part_fresh, "momentum": part_momentum,
         "masking": part_masking, "agreement": part_agreement, "value": part_value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full", help="budgets: full = 4/16/64 prompts, small = 2/4/8")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base run, the batch and the bootstrap")
    ap.add_argument("--out", default=None, help="output directory (default replication-<size>-s<seed>)")
    ap.add_argument("--base-steps", type=int, default=16, help="rollout steps of the base run (16: the ablation's length, train reward ~0.3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--micro-rows", type=int, default=16, help="rows per forward/backward (memory only)")
    ap.add_argument("--parts", default="base,batch,flip,fresh,momentum,masking,agreement,value", help="comma-separated parts to run (others are skipped)")
    ap.add_argument("--value-M", type=int, default=None, help="continuations per branch of the value part (default: full 32, small 4)")
    ap.add_argument("--value-tokens", type=int, default=None, help="tokens valued (default: full 96, small 8)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override of the base run (repeatable; the probes inherit the run's config)")
    ap.add_argument("--tables", nargs="+", metavar="DIR", help="only print the markdown tables of finished study directories")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 1 step, a few tokens, outputs to a temp dir; for CI (tests/test_scripts_smoke.py): "
                         "tiny-random on a small digits data file, --size small, a 1-step base run, every part, then the tables")
    args = ap.parse_args()
    if args.tables:
        print(tables([Path(d) for d in args.tables]))
        return
    if args.smoke:  # smoke sizes become the defaults: flags given explicitly still win
        ap.set_defaults(size="small", base_steps=1, threads=1)
        args = ap.parse_args()
        if args.out is None:
            args.out = tempfile.mkdtemp(prefix="replicate-smoke-")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        digits = Path(args.out) / "digits.jsonl"  # single-digit answers: the random tiny model sometimes gets one right
        digits.write_text("".join(json.dumps({"prompt": f"Say the digit {d}.", "answer": str(d)}) + "\n" for d in range(10)) * 2)
        args.override = ["model.name=tiny-random", f"data.train={digits}", "rollout.max_new_tokens=6", "rollout.prompts_per_step=4",
                         "train.mini_batch_size=2", "train.micro_batch_size=8", "train.lr=1e-3", "batching.planner=random",
                         "batching.reward_balance.tau=null", *args.override]
    torch.set_num_threads(args.threads)
    args.value_M = args.value_M or (32 if args.size == "full" else 4)
    args.value_tokens = args.value_tokens or (96 if args.size == "full" else 8)
    out = Path(args.out or f"replication-{args.size}-s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"replication: {platform.machine()}, size {args.size}, seed {args.seed}, out {out}, {time.strftime('%Y-%m-%d %H:%M')}")
    for name in args.parts.split(","):
        path = out / f"{name}.json"
        if path.exists():
            print(f"{name}: done before ({path})")
            continue
        t = time.perf_counter()
        print(f"{name}: running", flush=True)
        res = PARTS[name](out, args)
        res |= {"date": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.perf_counter() - t, 1), "args": vars(args)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)  # atomic: a part is done only when its file is whole
        print(f"{name}: {res['seconds']:.0f} s", flush=True)
    if (out / "flip.json").exists():
        figures(out)
        figures_categories(out)
    if (out / "masking.json").exists():
        figures_masking(out)
    if (out / "value.json").exists():
        figures_value(out)
    if args.smoke:
        print(tables([out]))
    print(f"replication: finished parts {args.parts} -> {out}")


if __name__ == "__main__":
    main()
