"""Small-scale replication of the cancellation paper's probe findings on SmolLM2 (issue 15;
results: docs/results/replication.md).

    python scripts/replicate.py                       # every part, --size full, seed 0 -> replication/
    python scripts/replicate.py --size small --seed 1 --out replication-s1
    make replicate SIZE=small SEED=1

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
  momentum  the AdamW step on the middle budget with the batch's A and with A = 0: how much
         of a step from a used optimizer state is the earlier batches' momentum.
Then OUT/flip_budget.png (claims 1 and 2) is drawn from flip.json.

Size knob: --size full = budgets 4, 16, 64 prompts (x 8 rollouts; ~50 min on 2 cores),
small = 2, 4, 8 (a few minutes; the CI-sized smoke of the pipeline).

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
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"small": (2, 4, 8), "full": (4, 16, 64)}
UPDATES = {  # name -> (update, lr)
    "adamw_lr1e-6": ("adamw", 1e-6),
    "adamw_lr2e-5": ("adamw", 2e-5),
    "sgd_lr0.1": ("sgd", 0.1),
}
TASK = ["data.difficulty=2", "rollout.n=8", "eval.num_problems=0", "probes.flip.every=0"]


# ------------------------------------------------------------------ parts
def part_base(out: Path, args) -> dict:
    run = out / "base"
    cmd = [sys.executable, "-m", "tokencredit", "train", *TASK, f"train.steps={args.base_steps}", f"train.seed={args.seed}",
           f"output.root={out}", "output.run_name=base", "output.progress=false", "output.save_final=false",
           f"model.threads={args.threads}"]
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
        for name, (update, lr) in UPDATES.items():
            kw = {}
            if update == "adamw":
                kw = dict(optimizer_state=state, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                          grad_clip=cfg.train.grad_clip, spec=LossSpec.from_config(cfg, with_kl=False))
            t = time.perf_counter()
            table, summ = polarity_probe(ctx.model, batch, update=update, lr=lr, temperature=ctx.temperature,
                                         chunk_tokens=cfg.model.chunk_tokens, micro_rows=args.micro_rows, **kw)
            stats = flip_fractions_ci(table, batch.group_id.numpy(), seed=args.seed)  # bootstrap over prompts
            cats = category_mass(table, ctx.tokenizer, weight="boosted")
            res["runs"].append({"budget": budget, "prompts": n_prompts, "update": name, "lr": lr, "rows": len(batch), "tokens": summ["tokens"],
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
    for name, (update, lr) in UPDATES.items():
        if update != "adamw":
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


def figures(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flip = json.loads((out / "flip.json").read_text())
    fig, axes = plt.subplots(1, len(UPDATES), figsize=(4.2 * len(UPDATES), 3.6), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), UPDATES):
        runs = [r for r in flip["runs"] if r["update"] == name]
        x = [r["budget"] for r in runs]
        for var, sub, kind, style in (("grpo", "pos", "boosted", "C0-o"), ("grpo", "neg", "boosted", "C3-o"),
                                      ("positive_only", "pos", "boosted", "C0--s"), ("positive_only", "neg", "boosted", "C3--s")):
            v = np.array([r["stats"][var][sub][kind] for r in runs])  # [k, 3]
            ax.errorbar(x, v[:, 0], yerr=[v[:, 0] - v[:, 1], v[:, 2] - v[:, 0]], fmt=style, capsize=3,
                        label=f"{'A' if var == 'grpo' else 'A+'} update, {'A>0' if sub == 'pos' else 'A<0'} rows")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(b) for b in x])
        ax.set_title(name)
        ax.set_xlabel("prompts in the update (x 8 rollouts)")
        ax.axhline(0.5, color="grey", lw=0.5)
    np.atleast_1d(axes)[0].set_ylabel("fraction of tokens boosted")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle("Token flips after one update vs the update's batch (95% CI, bootstrap over prompts)")
    fig.tight_layout()
    fig.savefig(out / "flip_budget.png", dpi=120)


def _ci(v: list[float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def tables(outs: list[Path]) -> str:
    """Markdown tables of flip.json of one or more study directories (one per seed)."""
    lines = []
    for out in outs:
        flip = json.loads((out / "flip.json").read_text())
        batch = json.loads((out / "batch.json").read_text())
        from tokencredit.batch import load_batch

        rows = load_batch(out / "rollouts")
        lines += [f"### {out.name}: seed {flip['args']['seed']}, reward of the saved batch {float(rows.reward.mean()):.3f}, "
                  f"{batch['mixed_groups']} mixed groups of {batch['prompts']}, optimizer state after "
                  f"{flip['optimizer_state_steps']} steps", "",
                  "| prompts x 8 | update | A>0 boosted | A>0 suppressed | A<0 boosted | A<0 suppressed | "
                  "A+: A>0 boosted | A+: A<0 boosted | sign agreement A vs A+ | rows +/-/0 |",
                  "|---:|---|---|---|---|---|---|---|---|---|"]
        for r in flip["runs"]:
            g, p = r["stats"]["grpo"], r["stats"]["positive_only"]
            lines.append(f"| {r['budget']} | {r['update']} | {_ci(g['pos']['boosted'])} | {_ci(g['pos']['suppressed'])} | "
                         f"{_ci(g['neg']['boosted'])} | {_ci(g['neg']['suppressed'])} | {_ci(p['pos']['boosted'])} | "
                         f"{_ci(p['neg']['boosted'])} | {_ci(r['stats']['sign_agreement'])} | "
                         f"{r['rows_pos']}/{r['rows_neg']}/{r['rows_zero']} |")
        lines += ["", "Boosted mass by token category (Fig. 4), GRPO vs positive-only:", "",
                  "| prompts x 8 | update | GRPO math / format / reasoning | A+ math / format / reasoning |", "|---:|---|---|---|"]
        for r in flip["runs"]:
            c = r["categories"]
            f = lambda d: " / ".join(f"{d[k]:.3f}" for k in ("math", "format", "reasoning"))  # noqa: E731
            lines.append(f"| {r['budget']} | {r['update']} | {f(c['grpo'])} | {f(c['positive_only'])} |")
        lines.append("")
    return "\n".join(lines)


PARTS = {"base": part_base, "batch": part_batch, "flip": part_flip, "momentum": part_momentum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full", help="budgets: full = 4/16/64 prompts, small = 2/4/8")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base run, the batch and the bootstrap")
    ap.add_argument("--out", default=None, help="output directory (default replication-<size>-s<seed>)")
    ap.add_argument("--base-steps", type=int, default=16, help="rollout steps of the base run (16: the ablation's length, train reward ~0.3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--micro-rows", type=int, default=16, help="rows per forward/backward (memory only)")
    ap.add_argument("--parts", default="base,batch,flip,momentum", help="comma-separated parts to run (others are skipped)")
    ap.add_argument("--tables", nargs="+", metavar="DIR", help="only print the markdown tables of finished study directories")
    args = ap.parse_args()
    if args.tables:
        print(tables([Path(d) for d in args.tables]))
        return
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
