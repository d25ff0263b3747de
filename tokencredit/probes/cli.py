"""`tokencredit probe polarity|masking|coupling|value`: probes of one update on one batch
(value: Monte Carlo token values over a run's flip records, tokencredit/probes/value.py).

What it does
    polarity  Alg. 2 / Fig. 1(d): the GRPO update and the positive-only update
              (A+ = A * 1[A > 0]) from the same state, Delta log p of both on the
              full batch (tokencredit/probes/polarity.py). Also writes the Fig. 4
              category masses of the two updates.
    masking   Table 1 / App. D.1: Boost Rate and Mean Boost of the four mask sets
              for the LM-head-only and the full-parameter SGD step (lr 0.1), in
              four readings (all signs, A>0 copies, A<0 copies, sign-aligned),
              and their sign agreement (tokencredit/probes/masking.py).
    coupling  Fig. 2: output-layer coupling cells from sampled token pairs
              (tokencredit/probes/coupling.py), plus the predicted-shift split
              into self / same-token / different-token terms (Eq. 9).

Input (one of)
    --run RUN_DIR        the run's config.yaml and its latest checkpoint (or
                         --checkpoint DIR); a fresh rollout batch is sampled with
                         the run's settings, as the trainer samples (prompts of the
                         rollout step after the checkpoint, seed --seed; no Trainer
                         is built), and saved as OUT/batch.safetensors + OUT/batch.json.
    --checkpoint DIR     alone: RUN_DIR is DIR/../.. when that holds config.yaml.
    --model NAME         a raw model (alias, directory, cached hub id) with the
                         default config; --out is then required.
    --batch FILE         a saved batch (FILE.safetensors + FILE.json, written by
                         any probe command) instead of sampling: run all three
                         probes on the same batch this way.
    key=value ...        config overrides (as for `tokencredit train`).
    --threads N, --device D   torch threads (default model.threads), device
                         (default model.device). All of this is resolved once, for
                         every probe, in tokencredit/probes/context.py.

Output (OUT = --out, default RUN_DIR/probes)
    polarity_tokens.parquet, polarity.jsonl, polarity_summary.txt, categories_polarity.json
    masking_candidates.parquet, masking_tokens.parquet, masking.jsonl, masking_summary.json, masking_summary.txt
    coupling_pairs.parquet, coupling_cells.jsonl, coupling_summary.txt
    Each *_summary.txt is the one-screen summary the command also prints.
    `tokencredit report RUN_DIR` draws coupling_*.{parquet,jsonl} (Fig. 2) and
    categories_polarity.json (Fig. 4).

Simplifications
    The polarity update is one optimizer step on the whole batch (the trainer
    may split a rollout batch into mini-batches); see polarity.py. Nothing
    outside OUT is written.

Try it
    tokencredit probe masking --run runs/my-run --candidates 64 --full-candidates 8
    tokencredit probe polarity --run runs/my-run --batch runs/my-run/probes/batch.safetensors
    tokencredit probe coupling --model tiny-random --out /tmp/probes rollout.max_new_tokens=16
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import sys
import time
from typing import Any

import torch

from tokencredit.probes.context import ProbeContext, load_context
from tokencredit.rundir import write_jsonl, write_parquet
from tokencredit.update import LossSpec

log = logging.getLogger("tokencredit.probes")


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


def _header(ctx: ProbeContext, title: str) -> list[str]:
    b = ctx.batch
    adv = b.advantage
    lines = [
        title,
        f"command: tokencredit {' '.join(shlex.quote(a) for a in sys.argv[1:])}" if sys.argv and "tokencredit" in sys.argv[0] else "",
        f"date {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        f"model {ctx.source['model']}" + (f", checkpoint {ctx.source['checkpoint']}" if ctx.source.get("checkpoint") else ", no checkpoint"),
        f"batch: {ctx.source.get('batch')}",
        f"  {len(b)} rows ({int((adv > 0).sum())} A>0, {int((adv < 0).sum())} A<0, {int((adv == 0).sum())} A=0), "
        f"{b.num_tokens} response tokens" + (f", reward mean {float(b.reward.mean()):.3f}" if b.reward is not None else "")
        + f", temperature {ctx.temperature:g}",
    ]
    return [x for x in lines if x]


def _finish(ctx: ProbeContext, name: str, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / f"{name}_summary.txt").write_text(text)
    print(text, end="")
    print(f"written to {ctx.out}/ ({name}_*)")


def _track(ctx: ProbeContext, name: str, numbers: dict[str, Any]) -> None:
    """Send a probe's summary numbers (nested dicts of numbers; keys probe/NAME/...) to
    the trackers configured for the probed run (output.report_to in its config.yaml).
    A tracker that fails costs a warning, never the probe's results (already on disk)."""
    run = ctx.source.get("run")
    if not run:
        return
    from tokencredit.tracking import send_run_summary

    try:
        sent = send_run_summary(run, numbers, prefix=f"probe/{name}/")
    except Exception as e:
        log.warning("probe %s: summary numbers not sent to the run's trackers (%s)", name, e)
        return
    if sent:
        print(f"probe {name}: summary numbers sent to {sent} tracker(s) of {run}")


def _f(v: float | None, fmt: str) -> str:
    """format(v, fmt), None as NaN (padded like a number)."""
    return format(float("nan") if v is None else float(v), fmt)


# ----------------------------------------------------------------------------
# probe polarity
# ----------------------------------------------------------------------------


def cmd_polarity(args) -> int:
    from tokencredit.probes.polarity import VARIANTS, adamw_update, polarity_probe

    ctx = load_context(args)
    cfg = ctx.cfg
    kw = dict(temperature=ctx.temperature, chunk_tokens=cfg.model.chunk_tokens, micro_rows=args.micro_rows)
    eps = cfg.probes.flip.eps if args.eps is None else args.eps
    if args.update == "sgd":
        lr = 0.1 if args.lr is None else args.lr
        update: Any = "sgd"
        lr_desc = f"SGD lr {lr:g} (no momentum) on Eq. 2"
    else:
        st = None if args.fresh_optimizer else ctx.optimizer_state
        lr = args.lr if args.lr is not None else (None if st is not None else cfg.train.lr)
        update = adamw_update(lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                              spec=LossSpec.from_config(cfg, with_kl=False), optimizer_state=st, **kw)
        eff = lr if lr is not None else st["param_groups"][0]["lr"]
        lr_desc = f"AdamW lr {eff:g}, " + ("optimizer state from the checkpoint" if st is not None else "fresh optimizer state") + \
            ", one step on the whole batch (policy_loss)"
    t0 = time.perf_counter()
    table, summary = polarity_probe(ctx.model, ctx.batch, update=update, lr=lr, eps=eps, **kw)
    dt = time.perf_counter() - t0
    table["token_text"] = [ctx.tokenizer.decode([t]) for t in table["token_id"]]
    write_parquet(ctx.out / "polarity_tokens.parquet", table)
    rows = []
    for v in VARIANTS:
        for sub in ("pos", "neg", "all"):
            s = summary[v]
            rows.append({"variant": v, "subset": sub, **{k: s[f"flip_{sub}_{k}"] for k in ("boosted", "suppressed", "stable", "mean_abs", "tokens")}})
    write_jsonl(ctx.out / "polarity.jsonl", rows + [{"variant": "grpo_vs_positive_only", "sign_agreement": summary["sign_agreement"]}])
    try:
        from tokencredit.probes.categories import category_mass, write_category_json

        base = {k: table[k] for k in ("row", "position", "token_id")}
        cats = category_mass({"grpo": {**base, "delta": table["delta_grpo"]},
                              "positive_only": {**base, "delta": table["delta_positive_only"]}}, ctx.tokenizer)
        write_category_json(ctx.out / "categories_polarity.json", cats)
    except Exception as e:  # categories are a bonus; never lose the probe to them
        log.warning("probe polarity: token categories not written (%s)", e)
        cats = None

    lines = _header(ctx, "Polarity comparison (cancellation paper Alg. 2, Fig. 1(d))")
    lines.append(f"update: {lr_desc}; stable = |Δ log p| <= {eps:g}; {dt:.0f} s")
    if args.update == "adamw" and st is not None:
        lines.append("note: a step from a used AdamW state carries earlier batches' momentum (on SmolLM2 ~70% of the "
                     "displacement, docs/results/replication.md); --fresh-optimizer or --update sgd --lr 1e-3 isolates this batch")
    lines.append("")
    lines.append(f"{'':<15}|{'A > 0 rows':^29}|{'A < 0 rows':^29}|{'all rows':^29}")
    lines.append(f"{'update':<15}|" + "|".join(f"{'boost':>7}{'suppr':>7}{'stable':>7}{'|Δ|':>8}" for _ in range(3)))
    for v, label in (("grpo", "GRPO (A)"), ("positive_only", "positive (A+)")):
        s = summary[v]
        lines.append(f"{label:<15}|" + "|".join(
            f"{s[f'flip_{sub}_boosted']:>7.3f}{s[f'flip_{sub}_suppressed']:>7.3f}{s[f'flip_{sub}_stable']:>7.3f}{s[f'flip_{sub}_mean_abs']:>8.4f}"
            for sub in ("pos", "neg", "all")))
    s = summary["grpo"]
    lines.append(f"{'tokens':<15}|" + "|".join(f"{int(s[f'flip_{sub}_tokens']):>29}" for sub in ("pos", "neg", "all")))
    lines.append(f"sign agreement of Δ log p, GRPO vs positive-only: {summary['sign_agreement']:.3f}")
    if cats:
        lines.append("boosted-mass share (Fig. 4)   " + "  ".join(f"{c}" for c in ("math", "format", "reasoning")))
        for v in VARIANTS:
            lines.append(f"  {v:<27}" + "  ".join(f"{cats[v][c]:>{len(c)}.3f}" for c in ("math", "format", "reasoning")))
    _track(ctx, "polarity", {**summary, "categories": cats or {}})
    _finish(ctx, "polarity", lines)
    return 0


# ----------------------------------------------------------------------------
# probe masking
# ----------------------------------------------------------------------------


READING_TITLES = {
    "all": "reading (a) all signs: masked set as drawn; Boost Rate = % with δ > 0 (measures the batch's sign mix of the masked copies)",
    "pos": "reading (b+) masked copies restricted to A > 0; Boost Rate = % with δ > 0",
    "neg": "reading (b-) masked copies restricted to A < 0; Boost Rate = % with δ > 0",
    "aligned": "reading (c) sign-aligned: masked set as drawn; boosted = sign(sum_M A_k)·δ > 0, Mean Boost = mean sign(sum_M A_k)·δ",
}


def cmd_masking(args) -> int:
    from tokencredit.config import ConfigError
    from tokencredit.probes.masking import SET_CONDITIONS, masking_probe

    if args.confidence == "prob" and not 0.0 < args.low_conf <= 1.0:  # fail before loading a model
        raise ConfigError(f"--low-conf {args.low_conf:g}: with --confidence prob it is a probability in (0, 1]")
    if args.confidence == "entropy" and not 0.0 <= args.low_conf < 1.0:
        raise ConfigError(f"--low-conf {args.low_conf:g}: with --confidence entropy it is a quantile in [0, 1)")
    ctx = load_context(args)
    t0 = time.perf_counter()
    tables, summary = masking_probe(
        ctx.model, ctx.batch, n_candidates=args.candidates, n_full=args.full_candidates, threshold=args.low_conf,
        confidence=args.confidence, pair=args.pair, sign_split=not args.no_sign_split,
        lr=args.lr, seed=args.seed, modes=tuple(args.modes), temperature=ctx.temperature,
        chunk_tokens=ctx.cfg.model.chunk_tokens, micro_rows=args.micro_rows, progress=not args.no_progress,
    )
    dt = time.perf_counter() - t0
    summary["time_s"] = dt
    summary["source"] = ctx.source
    write_parquet(ctx.out / "masking_candidates.parquet", tables["candidates"])
    write_parquet(ctx.out / "masking_tokens.parquet", tables["tokens"])
    write_jsonl(ctx.out / "masking.jsonl", summary["table"])
    (ctx.out / "masking_summary.json").write_text(json.dumps(summary, indent=2, default=str))

    lines = _header(ctx, "Masking effect (cancellation paper Table 1) and LM-head vs full sign agreement (App. D.1)")
    lines.append(f"one SGD step, lr {args.lr:g}, no momentum, on J = 1/N sum A_k log pi(o_k) (N = {summary['tokens']} "
                 f"tokens, kept for masked updates); {summary['tokens_in_loss']} tokens in the loss (A != 0)")
    lines.append(f"candidates: {summary['candidates']} (LM head), {summary['full_candidates']} of them also full-parameter, "
                 f"from {summary['eligible_tokens']} eligible; seed {args.seed}; {dt:.0f} s")
    lines.append(f"low confidence: {summary['low_conf_rule']} ({summary['low_conf_tokens']} tokens, "
                 f"{summary['low_conf_candidates']} of the candidates)")
    blk = lambda t: f"{t:^29}"  # noqa: E731
    paired_title = "LM-head, Full's candidates"
    for reading in summary["readings"]:
        lines.append("")
        lines.append(READING_TITLES[reading])
        lines.append(f"{'Masked tokens':<21}|{blk('LM-head')}|{blk('Full')}|{blk(paired_title)}")
        lines.append(f"{'Same  LowConf   |M|':<21}|" + "|".join([f"{'n':>5}{'Boost Rate':>12}{'Mean Boost':>12}"] * 3))
        for r in (r for r in summary["table"] if r["reading"] == reading):
            same, low = SET_CONDITIONS[r["set"]]
            cell = f"{'✓' if same else '-':^5} {'✓' if low else '-':^7} {r['mean_set_size']:>5.1f}"
            parts = []
            for mode in ("lm_head", "full", "lm_head_paired"):
                n = r.get(f"n_{mode}", 0)
                parts.append(f"{n:>5}{_f(100 * r.get(f'boost_rate_{mode}', math.nan), '>11.2f')}%"
                             f"{_f(r.get(f'mean_boost_{mode}', math.nan), '>+12.4f')}")
            lines.append(f"{cell:<21}|" + "|".join(parts))
    lines.append("(n = candidates whose set for that reading has at least one token; |M| = mean size of those sets)")
    lines.append("")
    lines.append("reading (a) split by the sign of the masked set's net weight sum_{k in M} A_k   (n, Boost Rate, Mean Boost)")
    lines.append(f"  {'':<20}" + "|".join(f"{t:^22}" for t in ("LM-head, net A > 0", "LM-head, net A < 0", "Full, net A > 0", "Full, net A < 0")))
    for r in (r for r in summary["table"] if r["reading"] == "all"):
        parts = [f"{r.get(f'n_{m}_{t}', 0):>4}{_f(100 * r.get(f'boost_rate_{m}_{t}', math.nan), '>7.1f')}%"
                 f"{_f(r.get(f'mean_boost_{m}_{t}', math.nan), '>+10.4f')}" for m in ("lm_head", "full") for t in ("netpos", "netneg")]
        lines.append(f"  {r['set']:<20}" + "|".join(parts))
    sa = summary["sign_agreement"]
    lines.append(f"sign agreement of Δ log p, full-parameter vs LM-head-only step (lr {args.lr:g}), all "
                 f"{summary['tokens']} tokens: {_f(sa, '.3f')}")
    lines.append(f"mean |Δ log p| of one step over all tokens: LM-head-only {_f(summary['mean_abs_delta_lm_head'], '.4f')}, "
                 f"full-parameter {_f(summary['mean_abs_delta_full'], '.4f')}")
    _track(ctx, "masking", summary)
    _finish(ctx, "masking", lines)
    return 0


# ----------------------------------------------------------------------------
# probe coupling
# ----------------------------------------------------------------------------


def cmd_coupling(args) -> int:
    from tokencredit.model.forward import lm_head_inputs
    from tokencredit.probes.coupling import coupling_cells, coupling_pairs, predicted_shift
    from tokencredit.probes.lm_head import lm_head_of
    from tokencredit.probes.masking import eq2_weights

    ctx = load_context(args)
    b = ctx.batch
    rows, pos = (b.response_mask > 0).nonzero(as_tuple=True)
    t0 = time.perf_counter()
    h = lm_head_inputs(ctx.model, b, micro_rows=args.micro_rows)[rows, pos].cpu()  # [N, d] final hidden states
    W, bias, tf = lm_head_of(ctx.model, ctx.temperature)  # [V, d], [V] or None (float32 CPU), the model's logit transform
    lm = dict(bias=bias, temperature=tf.temperature, logit_scale=tf.logit_scale, softcap=tf.softcap)
    o = b.response_ids[rows, pos]
    A = eq2_weights(b)[rows, pos]
    gen = torch.Generator().manual_seed(args.seed)
    pairs = coupling_pairs(h, W, o, A, args.confidence, args.pairs, gen, args.low_conf, **lm)
    cells = coupling_cells(pairs)
    shift = predicted_shift(h, W, o, A, args.eta, **lm)
    dt = time.perf_counter() - t0

    cols = {k: v.tolist() for k, v in pairs.items()}
    cols["token_j"], cols["token_k"] = o[pairs["j"]].tolist(), o[pairs["k"]].tolist()
    write_parquet(ctx.out / "coupling_pairs.parquet", cols)
    write_jsonl(ctx.out / "coupling_cells.jsonl", [{"cell": k, **v} for k, v in cells.items()])
    d, st, sm, df = (shift[k] for k in ("delta", "self_term", "same_token", "diff_token"))
    flip = ((torch.sign(d) != torch.sign(st)) & (A != 0)).double()

    lines = _header(ctx, "Output-layer coupling cells (cancellation paper Fig. 2, Eq. 7-10)")
    thr = args.low_conf if args.low_conf is not None else ("0.5" if args.confidence == "prob" else "batch median")
    lines.append(f"{args.pairs} sampled ordered pairs (half among same-token pairs); low confidence: "
                 f"{'prob <' if args.confidence == 'prob' else 'entropy >'} {thr} for both tokens; {dt:.0f} s")
    lines.append("")
    lines.append(f"{'cell':<26}{'% of pairs':>11}{'n':>7}{'<h_j,h_k>':>12}{'phi_jk':>11}{'|A_k K_jk|':>12}")
    for k, v in cells.items():
        lines.append(f"{k:<26}{_f(100 * v['frac_uniform'], '>10.2f')}%{v['n']:>7}{_f(v['hh_mean'], '>12.2f')}"
                     f"{_f(v['phi_mean'], '>11.4f')}{_f(v['contrib_abs_mean'], '>12.3f')}")
    lines.append("")
    lines.append(f"predicted LM-head shift (Eq. 9, eta {args.eta:g}) over {d.numel()} tokens: mean |delta| {d.abs().mean():.2e}; "
                 f"mean |self| {st.abs().mean():.2e}, |same-token| {sm.abs().mean():.2e}, |diff-token| {df.abs().mean():.2e}")
    n_in = int((A != 0).sum())
    lines.append(f"tokens in the loss whose predicted shift has the opposite sign of their own (self) term: "
                 f"{_f(float(flip.sum()) / max(n_in, 1), '.3f')} of {n_in}")
    _track(ctx, "coupling", {"cells": cells, "flip_frac": float(flip.sum()) / max(n_in, 1)})
    _finish(ctx, "coupling", lines)
    return 0


# ----------------------------------------------------------------------------
# argparse
# ----------------------------------------------------------------------------


def _common(p) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--run", metavar="RUN_DIR", help="run directory: its config.yaml and latest checkpoint")
    g.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (default: the run's latest)")
    g.add_argument("--model", metavar="NAME", help="raw model (alias, directory, cached hub id) instead of a run's")
    g.add_argument("--batch", metavar="FILE", help="saved batch (FILE.safetensors + FILE.json) instead of sampling one")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/probes)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling the batch and for the probe's own draws")
    p.add_argument("--micro-rows", type=int, default=8, help="rows per forward/backward (memory only; results do not depend on it)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: model.threads, else torch's default)")
    p.add_argument("--device", default=None, help="device (default: model.device; auto = cuda when available)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rollout.prompts_per_step=4")


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("probe", help="probes of one update: polarity (Alg. 2), masking (Table 1), coupling (Fig. 2), value (Eq. 20)",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="probe", required=True, metavar="{polarity,masking,coupling,value}")

    pp = sub.add_parser("polarity", help="GRPO vs positive-only update from one state (Alg. 2, Fig. 1(d), Fig. 4)",
                        description="Apply the update with A and with A+ = A*1[A>0] from the same state; write Δ log p of both "
                        "on the full batch, the Fig. 1(d) boosted/suppressed/stable fractions and Fig. 4 category masses.")
    _common(pp)
    pp.add_argument("--update", choices=("adamw", "sgd"), default="adamw",
                    help="adamw: the run's optimizer (state from the checkpoint), one step on the whole batch; sgd: plain SGD on Eq. 2")
    pp.add_argument("--lr", type=float, default=None, help="learning rate (default: adamw = the checkpoint's / train.lr; sgd = 0.1)")
    pp.add_argument("--eps", type=float, default=None, help="|Δ log p| <= eps is stable (default probes.flip.eps)")
    pp.add_argument("--fresh-optimizer", action="store_true",
                    help="adamw: start from a new AdamW state instead of the checkpoint's (its first step is close to sign "
                    "descent, App. D.3; without it the step also carries earlier batches' momentum); lr: --lr, else train.lr")
    pp.set_defaults(func=cmd_polarity)

    pm = sub.add_parser("masking", help="masking effect of four token sets, LM-head vs full (Table 1, App. D.1)",
                        description="Boost Rate and Mean Boost of removing random / same-token / low-confidence / "
                        "same-token&low-confidence tokens from one SGD step, for LM-head-only and full-parameter updates. "
                        "Every set is read four ways: (a) all signs, (b) only its A > 0 / only its A < 0 tokens, "
                        "(c) sign-aligned (boosted = sign(sum_M A_k) * delta > 0); see docs/probes_masking.md.")
    _common(pm)
    pm.add_argument("--candidates", type=int, default=64, help="candidate tokens (LM-head path; cheap)")
    pm.add_argument("--full-candidates", type=int, default=8,
                    help="how many of them also get the full-parameter update (each costs ~1 forward + 8 backward passes over "
                    "the batch, 4 with --no-sign-split)")
    pm.add_argument("--confidence", choices=("prob", "entropy"), default="prob",
                    help="low-confidence measure: prob = old prob below --low-conf; entropy = entropy above the --low-conf "
                    "quantile of the batch's response-token entropies (default: prob)")
    pm.add_argument("--low-conf", type=float, default=0.5,
                    help="low-confidence threshold: a probability in (0, 1] with --confidence prob, a quantile in [0, 1) with "
                    "--confidence entropy (0.8 = the top 20%% entropies); default 0.5")
    pm.add_argument("--pair", action="store_true",
                    help="paper's pair condition (Fig. 2: both tokens low confidence): the low-confidence sets of a candidate "
                    "that is not low confidence itself are empty (default: only the masked tokens are filtered)")
    pm.add_argument("--no-sign-split", action="store_true",
                    help="skip reading (b), the A > 0-only and A < 0-only masked updates (halves the full-parameter cost); "
                    "readings (a) and (c) are always reported")
    pm.add_argument("--lr", type=float, default=0.1, help="SGD step size (paper: 0.1)")
    pm.add_argument("--modes", nargs="+", choices=("lm_head", "full"), default=["lm_head", "full"])
    pm.add_argument("--no-progress", action="store_true", help="no progress bar over the candidates")
    pm.set_defaults(func=cmd_masking)

    pc = sub.add_parser("coupling", help="Fig. 2 coupling cells from sampled token pairs",
                        description="Sample token pairs, compute <h_j,h_k>, phi_jk and A_k K_jk (Eq. 7-8), summarise by "
                        "(same token?) x (both low confidence?); write pairs (parquet) and cells (jsonl).")
    _common(pc)
    pc.add_argument("--pairs", type=int, default=4096, help="sampled ordered pairs")
    pc.add_argument("--confidence", choices=("prob", "entropy"), default="prob", help="low confidence by own prob or entropy")
    pc.add_argument("--low-conf", type=float, default=None, help="threshold (default: prob 0.5 / entropy batch median)")
    pc.add_argument("--eta", type=float, default=0.1, help="step size for the predicted-shift decomposition (Eq. 9)")
    pc.set_defaults(func=cmd_coupling)

    from tokencredit.probes import value

    value.add_cli(sub)  # `tokencredit probe value --run RUN_DIR --step N` (Eq. 20, cancellation paper App. E.2)
