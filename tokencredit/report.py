"""`tokencredit report RUN_DIR`: PNG figures and one self-contained report.html.

What it does
    Reads what a run directory holds and draws what it can:

    figure (figures/*.png)        data it needs                         paper
    ----------------------------  ------------------------------------  ---------
    reward_accuracy.png           metrics.jsonl reward_mean / eval_accuracy
    flip_fractions.png            metrics.jsonl flip_{pos,neg,all}_*     Fig. 1
    timing.png                    metrics.jsonl time_*_s
    coupling_cells[_X].png        probes/coupling*.parquet|jsonl         Fig. 2
    token_categories[_X].png      probes/categories*.json                Fig. 4
    value_gap_step_N.png          probes/value_step_N.jsonl              Fig. 5a
    value_entropy_step_N.png      same, with "entropy"                   Fig. 5b
    value_repeat_step_N.png       same, with "delta_repeat"              Fig. 11

    Every figure is optional: a figure whose data is absent is listed under
    "not drawn" with the reason, never an error. report.html embeds every PNG
    as a base64 data URI and shows config.yaml and summary.json, so the one
    file can be mailed or archived alone.

Input formats defined here
    * coupling: either *pair rows* (one row per sampled token pair, the columns
      of `tokencredit.probes.coupling.coupling_pairs`): same_token (bool),
      both_low_conf (bool) and any of hh, phi, contrib (float), optionally
      oversampled (bool); or *cell rows* (one row per Fig. 2 cell, the output
      of `coupling_cells` with its key in a "cell" column): cell (str, e.g.
      "same_token&low_conf") and any of hh_mean, phi_mean, contrib_abs_mean,
      frac_uniform. Parquet or JSON lines.
    * categories: a JSON object {"grpo": {"math": m, "format": f,
      "reasoning": r}, "positive_only": {...}} of boosted-mass shares, as
      written by `tokencredit.probes.categories.write_category_json`.
    * value: the JSON lines of `tokencredit probe value` (see
      tokencredit/probes/value.py): per token at least kind ("boosted" |
      "suppressed"), sign ("pos" | "neg"), value; optionally entropy and
      delta_repeat (list).

Simplifications
    Matplotlib's Agg canvas is used directly (no pyplot, no global backend
    state). Value statistics reuse the pure helpers of probes/value.py
    (bootstrap 95% CI, 1000 replicates, seed 0).

Try it
    tokencredit report runs/my-run          # -> runs/my-run/report.html
    python -c "from tokencredit.report import make_report; print(make_report('runs/my-run'))"
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from tokencredit.rundir import read_jsonl, read_table

log = logging.getLogger("tokencredit.report")

SUBSETS = (("pos", "A > 0"), ("neg", "A < 0"), ("all", "all rows"))
FLIP_KINDS = (("boosted", "tab:green"), ("suppressed", "tab:red"), ("stable", "tab:gray"))
COUPLING_CELLS = ("same_token&low_conf", "same_token&not_low_conf", "diff_token&low_conf", "diff_token&not_low_conf")
CATEGORIES = ("math", "format", "reasoning")


# ----------------------------------------------------------------------------
# reading (files: tokencredit.rundir.read_jsonl / read_table)
# ----------------------------------------------------------------------------


def _num(v: Any) -> float:
    """float(v), NaN for None / non-numbers."""
    try:
        return float(v) if v is not None and not isinstance(v, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan


def _series(rows: list[dict], key: str, step_rows_only: bool = False) -> tuple[list[float], list[float]]:
    """(steps, values) of rows that have a numeric `key` and a "step"."""
    xs, ys = [], []
    for r in rows:
        if key in r and "step" in r and math.isfinite(_num(r[key])):
            if step_rows_only and "reward_mean" not in r:
                continue
            xs.append(_num(r["step"]))
            ys.append(_num(r[key]))
    return xs, ys


# ----------------------------------------------------------------------------
# figures: each returns a matplotlib Figure, or a str saying why it is not drawn
# ----------------------------------------------------------------------------


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _steps_axis(ax, unit_interval: bool = False) -> None:
    """Integer ticks on a rollout-step x axis; y in [0, 1] for rates."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if unit_interval:
        ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])


def fig_reward_accuracy(metrics: list[dict]):
    sx, sy = _series(metrics, "reward_mean")
    ex, ey = _series(metrics, "eval_accuracy")
    if not sy and not ey:
        return "metrics.jsonl has no reward_mean or eval_accuracy"
    fig, (a, b) = _figure(2)
    if sy:
        a.plot(sx, sy, "o-", color="tab:blue", ms=3)
        _steps_axis(a, unit_interval=all(0.0 <= v <= 1.0 for v in sy))
    else:
        _empty(a, "no reward logged")
    a.set(title="train reward (mean over the rollout batch)", xlabel="rollout step", ylabel="reward")
    if ey:
        b.plot(ex, ey, "s-", color="tab:purple", ms=4, label="avg@k (accuracy)")
        px, py = _series([r for r in metrics if _num(r.get("eval_k", 1)) > 1], "eval_pass_at_k")
        if py:
            b.plot(px, py, "^--", color="tab:pink", ms=4, label="pass@k")
            b.legend(fontsize=8)
        _steps_axis(b, unit_interval=True)
        if len(set(ex)) == 1:  # one evaluation: a readable axis around it, the value written out
            b.set_xlim(ex[0] - 1, ex[0] + 1)
            b.annotate(f"{ey[-1]:.3f}", (ex[-1], ey[-1]), textcoords="offset points", xytext=(6, 6))
    else:
        _empty(b, "no evaluation logged")
    b.set(title="held-out accuracy", xlabel="rollout step", ylabel="accuracy")
    return fig


def fig_flip_fractions(metrics: list[dict]):
    """Fig. 1: boosted / suppressed / stable fractions by advantage sign over steps."""
    if not any(k.startswith("flip_") for r in metrics for k in r):
        steps = [r for r in metrics if "reward_mean" in r]
        skipped = sum(1 for r in steps if r.get("skipped_update"))
        if steps and skipped == len(steps):
            return (f"no flip probe metrics: none of the {len(steps)} rollout steps ran a policy update "
                    "(skipped_update; e.g. the reward-balanced buffer never released an update set)")
        return "no flip probe metrics (set probes.flip.every > 0)"
    fig, axes = _figure(4, width=3.6)
    for ax, (sub, label) in zip(axes, SUBSETS):
        # a subset with no token reports zeros (flip_{sub}_tokens == 0): not a measurement
        rows = [r for r in metrics if _num(r.get(f"flip_{sub}_tokens", 1)) > 0]
        for kind, color in FLIP_KINDS:
            x, y = _series(rows, f"flip_{sub}_{kind}")
            ax.plot(x, y, "o-", ms=3, color=color, label=kind)
        ax.set(title=f"token flips, {label}", xlabel="rollout step")
        _steps_axis(ax, unit_interval=True)
        if not any(f"flip_{sub}_boosted" in r for r in rows):
            _empty(ax, f"no update had rows with {label}")
    axes[0].set_ylabel("fraction of response tokens")
    axes[2].legend(fontsize=8)
    ax = axes[3]
    for sub, label in SUBSETS:
        rows = [r for r in metrics if _num(r.get(f"flip_{sub}_tokens", 1)) > 0]
        x, y = _series(rows, f"flip_{sub}_mean_abs")
        ax.plot(x, y, "o-", ms=3, label=label)
    ax.set(title="mean |Δ log p|", xlabel="rollout step")
    ax.legend(fontsize=8)
    _steps_axis(ax)
    return fig


def fig_batching(metrics: list[dict]):
    """What trained each rollout step: rows by advantage sign, rows the buffer still
    holds, their age, and the cumulative share of sampled rows that trained."""
    steps = [r for r in metrics if "reward_mean" in r]
    if not any("update_rows" in r or "rb_size" in r for r in steps):
        return "metrics.jsonl has no update_rows / rb_* (no update ran)"
    fig, (a, b) = _figure(2)
    for key, label, color in (("update_pos_rows", "trained, A > 0", "tab:green"), ("update_neg_rows", "trained, A < 0", "tab:red"),
                              ("rb_size", "held in the buffer", "tab:gray")):
        x, y = _series(steps, key)
        if y:
            a.plot(x, y, "o-", ms=3, color=color, label=label)
    drop = [(_num(r["step"]), _num(r.get("rb_dropped_stale", 0)) + _num(r.get("rb_dropped_overflow", 0)))
            for r in steps if "rb_dropped_stale" in r and "step" in r]
    if drop:
        a.plot([x for x, _ in drop], [y for _, y in drop], "x:", ms=4, color="tab:brown", label="dropped stale + overflow (cumulative)")
    a.set(title="rows per rollout step", xlabel="rollout step", ylabel="rows")
    a.legend(fontsize=8)
    _steps_axis(a)
    x, y = _series(steps, "rb_utilisation")
    if y:
        b.plot(x, y, "o-", ms=3, color="tab:blue", label="rb_utilisation (trained / sampled, cumulative)")
        x2, y2 = _series(steps, "rb_mean_age")
        b.plot(x2, y2, "s--", ms=3, color="tab:orange", label="mean age of trained rows (policy versions)")
        b.legend(fontsize=8)
        _steps_axis(b)
    else:
        _empty(b, "reward-balanced buffer off")
    b.set(title="reward-balanced buffer", xlabel="rollout step")
    return fig


def fig_timing(metrics: list[dict]):
    keys = sorted({k for r in metrics for k in r if k.startswith("time_") and k.endswith("_s") and k != "time_step_s"})
    if not keys:
        return "metrics.jsonl has no time_*_s"
    means = []
    for k in keys:
        _, y = _series(metrics, k)
        means.append(sum(y) / len(y) if y else 0.0)
    fig, (ax,) = _figure(1, width=7, height=0.45 * len(keys) + 1.2)
    ax.barh([k[len("time_"):-2] for k in keys], means, color="tab:cyan")
    _, tot = _series(metrics, "time_step_s")
    title = "mean seconds per rollout step"
    if tot:
        title += f" (whole step: {sum(tot) / len(tot):.2f} s)"
    ax.set(title=title, xlabel="seconds")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    return fig


def coupling_cell_table(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Pair rows or cell rows (see module docstring) -> {cell: {hh_mean, phi_mean,
    contrib_abs_mean, n, frac_uniform}} for the cells that occur."""
    if rows and "cell" in rows[0]:
        return {str(r["cell"]): {k: _num(v) for k, v in r.items() if k != "cell"} for r in rows}
    out: dict[str, dict[str, float]] = {}
    n_uni = sum(1 for r in rows if not r.get("oversampled", False))
    for cell in COUPLING_CELLS:
        same = cell.startswith("same")
        low = cell.endswith("&low_conf")
        sel = [r for r in rows if bool(r["same_token"]) == same and bool(r["both_low_conf"]) == low]
        d: dict[str, float] = {"n": float(len(sel))}
        d["frac_uniform"] = sum(1 for r in sel if not r.get("oversampled", False)) / n_uni if n_uni else math.nan
        for q in ("hh", "phi", "contrib"):
            xs = [_num(r.get(q)) for r in sel if math.isfinite(_num(r.get(q)))]
            d[f"{q}_mean"] = sum(xs) / len(xs) if xs else math.nan
            d[f"{q}_abs_mean"] = sum(abs(x) for x in xs) / len(xs) if xs else math.nan
        out[cell] = d
    return out


def fig_coupling(rows: list[dict], name: str):
    """Fig. 2: coupling statistics by (same token?) x (both low confidence?)."""
    if not rows:
        return f"{name} is empty"
    table = coupling_cell_table(rows)
    cells = [c for c in COUPLING_CELLS if c in table] + [c for c in table if c not in COUPLING_CELLS]
    panels = [(q, t) for q, t in (("hh_mean", "mean <h_j, h_k>  (Fig. 2a)"), ("phi_mean", "mean φ_jk  (Fig. 2b)"),
                                  ("contrib_abs_mean", "mean |A_k <h_j,h_k> φ_jk|  (Fig. 2c)"))
              if any(math.isfinite(table[c].get(q, math.nan)) for c in cells)]
    if not panels:
        return f"{name}: no hh / phi / contrib columns"
    fig, axes = _figure(len(panels), width=4.2, height=3.8)
    labels = [c.replace("same_token", "same tok").replace("diff_token", "diff tok").replace("&not_low_conf", "\nnot both low-conf")
              .replace("&low_conf", "\nboth low-conf") for c in cells]
    for i, c in enumerate(cells):  # how common the cell is (uniform draws) or how many pairs it holds
        fu, n = table[c].get("frac_uniform", math.nan), table[c].get("n", math.nan)
        labels[i] += f"\n{100 * fu:.1f}% of pairs" if math.isfinite(fu) else (f"\nn = {n:.0f}" if math.isfinite(n) else "")
    colors = ["tab:red" if c.startswith("same") else "tab:blue" for c in cells]
    for ax, (q, title) in zip(axes, panels):
        vals = [table[c].get(q, math.nan) for c in cells]
        ax.bar(range(len(cells)), [v if math.isfinite(v) else 0 for v in vals], color=colors)
        ax.set_xticks(range(len(cells)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
        ax.grid(alpha=0.3, axis="y")
    return fig


def fig_categories(data: dict, name: str):
    """Fig. 4: share of boosted mass per token category, GRPO vs positive-only."""
    # "shift" (difference of shares, written by category_mass) is not a distribution
    series = {k: v for k, v in data.items() if k != "shift" and isinstance(v, dict) and any(c in v for c in CATEGORIES)}
    if not series:
        return f"{name}: no category shares"
    fig, (ax,) = _figure(1, width=6.5)
    w = 0.8 / len(series)
    for i, (label, shares) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(CATEGORIES))]
        ys = [_num(shares.get(c, 0.0)) for c in CATEGORIES]
        bars = ax.bar(xs, ys, width=w, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(CATEGORIES)), ["Math", "Template/format", "Reasoning"])
    ax.set(title="share of boosted mass by token category (Fig. 4)", ylabel="share of Σ max(Δ log p, 0)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return fig


ESTIMATOR_TITLES = {"direct": "direct estimate", "eq20": "Eq. 20", "am": "A_M"}
ESTIMATOR_LABELS = {"direct": "avg0 - avg_alt", "eq20": "(avg0 - avg1) / (1 - p)", "am": "avg0 - avg1"}


def fig_value_gap(records: list[dict], name: str):
    """Fig. 5a: mean value of boosted vs suppressed tokens, by the row's advantage sign."""
    from tokencredit.probes.value import split_gap

    if not any(r.get("value") is not None for r in records):
        return f"{name}: no valued tokens"
    groups = [("pos", "from A > 0 rows"), ("neg", "from A < 0 rows"), ("all", "all")]
    stats = [split_gap([r for r in records if g == "all" or r.get("sign") == g]) for g, _ in groups]
    fig, (a, b) = _figure(2)
    x = range(len(groups))
    a.bar([i - 0.2 for i in x], [_z(s["mean_boosted"]) for s in stats], 0.4, color="tab:green", label="boosted")
    a.bar([i + 0.2 for i in x], [_z(s["mean_suppressed"]) for s in stats], 0.4, color="tab:red", label="suppressed")
    a.set_xticks(list(x), [f"{lab}\n(n={s['n_boosted']}+{s['n_suppressed']})" for (_, lab), s in zip(groups, stats)], fontsize=8)
    est = next((r.get("estimator") for r in records if r.get("estimator")), "eq20")  # files before the direct estimator: Eq. 20
    a.set(title=f"mean token value, {ESTIMATOR_TITLES.get(est, est)} (Fig. 5a)", ylabel=ESTIMATOR_LABELS.get(est, "value"))
    a.axhline(0, color="k", lw=0.5)
    a.legend(fontsize=8)
    gaps = [_z(s["gap"]) for s in stats]
    err = [[max(0.0, _z(s["gap"]) - _z(s["lo"])) for s in stats], [max(0.0, _z(s["hi"]) - _z(s["gap"])) for s in stats]]
    b.bar(list(x), gaps, yerr=err, capsize=4, color="tab:olive")
    b.set_xticks(list(x), [lab for _, lab in groups], fontsize=8)
    b.set(title="value gap: boosted - suppressed", ylabel="gap (95% bootstrap CI)")
    b.axhline(0, color="k", lw=0.5)
    for i, s in enumerate(stats):  # x in data units, y in axes fraction
        if not math.isfinite(s["gap"]):
            b.text(i, 0.5, "n/a", transform=b.get_xaxis_transform(), ha="center", fontsize=9, color="0.4")
        if s["n_boosted"] + s["n_suppressed"] == 0:
            a.text(i, 0.5, "no tokens", transform=a.get_xaxis_transform(), ha="center", fontsize=9, color="0.4")
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    return fig


def fig_value_entropy(records: list[dict], name: str):
    """Fig. 5b: value gap on the top-k% highest-entropy tokens."""
    from tokencredit.probes.value import entropy_topk_gaps

    if not any(math.isfinite(_num(r.get("entropy"))) and r.get("value") is not None for r in records):
        return f"{name}: no entropy column"
    rows = entropy_topk_gaps(records)
    fig, (ax,) = _figure(1, width=6)
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["gap"] for r in rows], "o-", color="tab:olive")
    ax.fill_between(ks, [r["lo"] for r in rows], [r["hi"] for r in rows], alpha=0.25, color="tab:olive")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(title="value gap on the top-k% highest-entropy tokens (Fig. 5b)", xlabel="k (%)", ylabel="gap (95% CI)")
    ax.grid(alpha=0.3)
    return fig


def fig_value_repeat(records: list[dict], name: str):
    """Fig. 11: value gap after u repeated updates on the same batch."""
    from tokencredit.probes.value import repeat_gaps

    rows = repeat_gaps(records)
    if not rows:
        return f"{name}: no delta_repeat (run `tokencredit probe value ... --repeat U`)"
    fig, (ax,) = _figure(1, width=6)
    us = [r["update"] for r in rows]
    ax.plot(us, [r["gap"] for r in rows], "o-", color="tab:brown")
    ax.fill_between(us, [r["lo"] for r in rows], [r["hi"] for r in rows], alpha=0.25, color="tab:brown")
    ax.axhline(0, color="k", lw=0.5)
    ax.set(title="value gap over repeated updates on one batch (Fig. 11)", xlabel="updates", ylabel="gap (95% CI)")
    _steps_axis(ax)
    return fig


def _z(v: float) -> float:
    return v if math.isfinite(v) else 0.0


# ----------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------


def _plan(run_dir: Path, metrics: list[dict]) -> list[tuple[str, str, Callable[[], Any]]]:
    """(file stem, caption, builder) for every figure this run could have."""
    plan: list[tuple[str, str, Callable[[], Any]]] = [
        ("reward_accuracy", "Training reward and held-out accuracy", lambda: fig_reward_accuracy(metrics)),
        ("flip_fractions", "Token flips by advantage sign (cancellation paper Fig. 1): fraction of response tokens "
         "whose log-prob rose (boosted), fell (suppressed) or stayed within eps after each update", lambda: fig_flip_fractions(metrics)),
        ("batching", "What trained: rows by advantage sign and rows held by the reward-balanced buffer (cancellation paper Sec. 4); "
         "right: share of nonzero-advantage rows that trained and their age", lambda: fig_batching(metrics)),
        ("timing", "Where the time of a rollout step goes", lambda: fig_timing(metrics)),
    ]
    probes = run_dir / "probes"
    cfiles = sorted(probes.glob("coupling*.parquet")) + sorted(probes.glob("coupling*.jsonl")) if probes.is_dir() else []
    if not cfiles:
        plan.append(("coupling_cells", "Coupling cells (Fig. 2)", lambda: "no probes/coupling*.parquet or .jsonl"))
    for f in cfiles:
        stem = "coupling_cells" if f.stem == "coupling" else f"coupling_cells_{f.stem.removeprefix('coupling').strip('_')}"
        plan.append((stem, f"Coupling by (same token?) x (both low confidence?), Fig. 2, from {f.name}",
                     lambda f=f: fig_coupling(read_table(f), f.name)))
    kfiles = sorted(probes.glob("categories*.json")) if probes.is_dir() else []
    if not kfiles:
        plan.append(("token_categories", "Token categories (Fig. 4)", lambda: "no probes/categories*.json"))
    for f in kfiles:
        stem = "token_categories" if f.stem == "categories" else f"token_categories_{f.stem.removeprefix('categories').strip('_')}"
        plan.append((stem, f"Boosted mass by token category, GRPO vs positive-only (Fig. 4), from {f.name}",
                     lambda f=f: fig_categories(json.loads(f.read_text()), f.name)))
    vfiles = sorted(probes.glob("value*.jsonl"), key=_step_key) if probes.is_dir() else []
    if not vfiles:
        plan.append(("value_gap", "Token value (Fig. 5, Fig. 11)", lambda: "no probes/value*.jsonl (run `tokencredit probe value --run RUN_DIR --step N`)"))
    for f in vfiles:
        tag = f.stem.removeprefix("value").strip("_") or "all"
        recs = _lazy(lambda f=f: read_jsonl(f))
        plan += [
            (f"value_gap_{tag}", f"Counterfactual token value of boosted vs suppressed tokens (Fig. 5a), from {f.name}",
             lambda recs=recs, f=f: fig_value_gap(recs(), f.name)),
            (f"value_entropy_{tag}", f"Value gap on the top-k% highest-entropy tokens (Fig. 5b), from {f.name}",
             lambda recs=recs, f=f: fig_value_entropy(recs(), f.name)),
            (f"value_repeat_{tag}", f"Value gap over repeated updates on the fixed batch (Fig. 11), from {f.name}",
             lambda recs=recs, f=f: fig_value_repeat(recs(), f.name)),
        ]
    return plan


def _step_key(p: Path):
    digits = "".join(c if c.isdigit() else " " for c in p.stem).split()
    return (int(digits[-1]) if digits else -1, p.name)


def _lazy(fn):
    cache: list = []

    def get():
        if not cache:
            cache.append(fn())
        return cache[0]

    return get


def make_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every figure the run's data allows into RUN_DIR/figures/ and write
    RUN_DIR/report.html (or `out`). Returns the path of report.html.

    Raises FileNotFoundError if run_dir does not exist or holds none of
    config.yaml, metrics.jsonl, summary.json.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"report: run directory {run_dir} does not exist")
    present = [n for n in ("config.yaml", "metrics.jsonl", "summary.json") if (run_dir / n).is_file()]
    if not present:
        raise FileNotFoundError(f"report: {run_dir} is not a run directory (no config.yaml, metrics.jsonl or summary.json)")
    if importlib.util.find_spec("matplotlib") is None:  # pragma: no cover - depends on the install
        raise ImportError("tokencredit report needs matplotlib: pip install 'tokencredit[plots]'")

    metrics = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    summary = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            log.warning("%s/summary.json is not JSON; ignored", run_dir)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None

    fig_dir = run_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    drawn: list[tuple[str, Path]] = []
    skipped: list[tuple[str, str]] = []
    for stem, caption, build in _plan(run_dir, metrics):
        try:
            fig = build()
        except Exception as e:  # one bad input file must not cost the whole report
            log.warning("figure %s failed: %s", stem, e)
            skipped.append((caption, f"failed: {type(e).__name__}: {e}"))
            continue
        if isinstance(fig, str):
            skipped.append((caption, fig))
            continue
        path = fig_dir / f"{stem}.png"
        fig.savefig(path)
        drawn.append((caption, path))

    out = Path(out) if out is not None else run_dir / "report.html"
    out.write_text(_html(run_dir, config, summary, metrics, drawn, skipped))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


GLANCE = ("reward_mean", "eval_accuracy", "response_len_mean", "entropy_mean", "flip_pos_boosted", "flip_neg_boosted",
          "flip_all_boosted", "flip_all_suppressed", "grad_norm", "update_rows", "rb_utilisation", "rb_mean_age", "gen_tokens_per_s")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1150px;color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.15em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.6em}
.sub{color:#666;margin-top:4px}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ddd;padding:3px 10px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0 24px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#444;font-size:0.9em;margin-top:4px}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:10px;font-size:0.8em;overflow:auto;max-height:420px}
ul.skip{color:#777;font-size:0.9em}
"""


def _html(run_dir: Path, config: str | None, summary: dict, metrics: list[dict], drawn, skipped) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tokencredit report: {e(run_dir.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>tokencredit report: {e(run_dir.name)}</h1>",
        f"<p class='sub'>{e(str(run_dir.resolve()))} &middot; generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
        "<h2>Summary</h2>",
    ]
    if summary:
        parts.append("<table id='summary'><tr><th>summary.json</th><th>value</th></tr>")
        parts += [f"<tr><td>{e(str(k))}</td><td class='n'>{e(_fmt(v))}</td></tr>" for k, v in summary.items()]
        parts.append("</table>")
    else:
        parts.append("<p>no summary.json (run unfinished?)</p>")
    steps = [r for r in metrics if "reward_mean" in r]
    glance = []
    for k in GLANCE:
        rows = metrics
        if k.startswith("flip_"):  # a subset without tokens logs zeros, not a measurement
            sub = k.split("_")[1]
            rows = [r for r in metrics if _num(r.get(f"flip_{sub}_tokens", 1)) > 0]
        _, ys = _series(rows, k, step_rows_only=(k != "eval_accuracy"))
        if ys:
            glance.append((k, ys[0], ys[-1], sum(ys) / len(ys)))
    if glance:
        n_upd = sum(1 for r in steps if not r.get("skipped_update"))
        parts.append(f"<p>{len(steps)} rollout steps in metrics.jsonl, {n_upd} with a policy update.</p>")
        parts.append("<table id='glance'><tr><th>metric</th><th>first</th><th>last</th><th>mean</th></tr>")
        parts += [f"<tr><td>{e(k)}</td><td class='n'>{_fmt(a)}</td><td class='n'>{_fmt(b)}</td><td class='n'>{_fmt(c)}</td></tr>"
                  for k, a, b, c in glance]
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    if not drawn:
        parts.append("<p>No figure could be drawn from this run's data.</p>")
    for caption, path in drawn:
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{e(path.name)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption><b>{e(path.name)}</b>: {e(caption)}</figcaption></figure>")
    if skipped:
        parts.append("<h2>Not drawn</h2><ul class='skip'>")
        parts += [f"<li>{e(c)}: {e(why)}</li>" for c, why in skipped]
        parts.append("</ul>")
    parts.append("<h2>Configuration (config.yaml)</h2>")
    parts.append(f"<pre id='config'>{e(config)}</pre>" if config is not None else "<p>no config.yaml</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def cmd_report(args) -> int:
    path = make_report(args.run_dir, out=args.out)
    print(path)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write figures and a self-contained report.html for a run directory",
        description="Draw every figure the run's data allows (figures/*.png) and write report.html "
        "(images embedded, config and summary shown). Figures whose data is missing are listed, not errors.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.yaml, metrics.jsonl, probes/ ...)")
    p.add_argument("--out", default=None, help="where to write the HTML (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
