"""tokencredit report: figures from hand-written run directories, optional data
skipped, self-contained HTML, clear errors. No model, no training (fast)."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tokencredit.report import coupling_cell_table, make_report  # noqa: E402
from tokencredit.rundir import read_jsonl  # noqa: E402

SUMMARY = {"steps": 3, "reward_first_step": 0.125, "reward_last_step": 0.4375, "tokens_per_s": 123.456,
           "wall_s": 9.87, "eval_accuracy_start": 0.25, "eval_accuracy_end": 0.75}


def _metrics_rows():
    rows = [{"step": 0, "eval_accuracy": 0.25, "eval_len_mean": 5.0}]
    for s in range(1, 4):
        rows.append({
            "step": s, "reward_mean": 0.1 * s, "response_len_mean": 6.0, "entropy_mean": 4.0 - 0.1 * s,
            "time_generate_s": 1.0, "time_update_s": 0.5, "time_step_s": 1.7,
            **{f"flip_{sub}_{k}": v for sub in ("pos", "neg", "all")
               for k, v in (("boosted", 0.4), ("suppressed", 0.35), ("stable", 0.25), ("mean_abs", 0.01 * s), ("tokens", 10.0))},
        })
    rows.append({"step": 3, "eval_accuracy": 0.75, "final": True})
    return rows


def _run_dir(tmp_path, metrics=True, summary=True, config=True):
    d = tmp_path / "run"
    d.mkdir()
    if config:
        (d / "config.yaml").write_text("model:\n  name: tiny-random\ntrain:\n  lr: 0.001  # <b>not html</b>\n")
    if metrics:
        lines = [json.dumps(r) for r in _metrics_rows()]
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 4, \"reward_me")  # half-written tail
    if summary:
        (d / "summary.json").write_text(json.dumps(SUMMARY))
    return d


def _value_records():
    recs = []
    for i in range(40):
        kind = "boosted" if i % 2 == 0 else "suppressed"
        recs.append({"step": 2, "row": i, "position": i % 5, "kind": kind, "sign": "pos" if i % 4 < 2 else "neg",
                     "value": (0.3 if kind == "boosted" else -0.1) + 0.01 * (i % 7), "entropy": 0.1 * i,
                     "delta_repeat": [0.01 if kind == "boosted" else -0.01] * 3})
    return recs


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_minimal_run_dir_draws_metric_figures_and_skips_the_rest(tmp_path):
    d = _run_dir(tmp_path)
    out = make_report(d)
    assert out == d / "report.html"
    figs = sorted(p.name for p in (d / "figures").glob("*.png"))
    assert figs == ["flip_fractions.png", "reward_accuracy.png", "timing.png"]
    page = out.read_text()
    imgs = _images(page)
    assert len(imgs) == 3 and all(b.startswith(b"\x89PNG") for b in imgs)
    # self-contained: no reference to files next to it
    assert "src='figures" not in page and 'src="figures' not in page
    # summary numbers in a table, config shown (escaped)
    for k in SUMMARY:
        assert f"<td>{k}</td>" in page
    assert "0.4375" in page and "123.5" in page and "9.87" in page
    assert "&lt;b&gt;not html&lt;/b&gt;" in page and "tiny-random" in page
    # optional figures listed with their reason
    assert "no probes/coupling" in page and "no probes/value" in page and "no probes/categories" in page


def test_all_optional_figures(tmp_path):
    d = _run_dir(tmp_path)
    probes = d / "probes"
    probes.mkdir()
    pairs = [{"same_token": s, "both_low_conf": lc, "hh": 1.0 + s, "phi": 0.5 * s, "contrib": 0.1 * (s + lc),
              "oversampled": False} for s in (True, False) for lc in (True, False) for _ in range(3)]
    (probes / "coupling_step_2.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(pairs), probes / "coupling.parquet")
    (probes / "categories.json").write_text(json.dumps({"grpo": {"math": 0.3, "format": 0.2, "reasoning": 0.5},
                                                         "positive_only": {"math": 0.3, "format": 0.5, "reasoning": 0.2}}))
    (probes / "value_step_2.jsonl").write_text("\n".join(json.dumps(r) for r in _value_records()) + "\n")
    out = make_report(d)
    figs = {p.name for p in (d / "figures").glob("*.png")}
    assert {"coupling_cells.png", "coupling_cells_step_2.png", "token_categories.png", "value_gap_step_2.png",
            "value_entropy_step_2.png", "value_repeat_step_2.png"} <= figs
    page = out.read_text()
    assert len(_images(page)) == len(figs) == 9
    assert "failed" not in page


def test_value_file_without_optional_columns(tmp_path):
    d = _run_dir(tmp_path)
    (d / "probes").mkdir()
    recs = [{k: v for k, v in r.items() if k not in ("entropy", "delta_repeat")} for r in _value_records()]
    (d / "probes" / "value_step_2.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    page = make_report(d).read_text()
    figs = {p.name for p in (d / "figures").glob("*.png")}
    assert "value_gap_step_2.png" in figs and "value_entropy_step_2.png" not in figs
    assert "no entropy column" in page and "no delta_repeat" in page


def test_only_config_no_metrics(tmp_path):
    d = _run_dir(tmp_path, metrics=False, summary=False)
    page = make_report(d).read_text()
    assert _images(page) == []
    assert "no summary.json" in page and "No figure could be drawn" in page


def test_coupling_cells_from_pairs_and_cells():
    pairs = [{"same_token": True, "both_low_conf": True, "hh": 2.0, "phi": 0.5, "contrib": -1.0},
             {"same_token": True, "both_low_conf": True, "hh": 4.0, "phi": 0.7, "contrib": 3.0},
             {"same_token": False, "both_low_conf": False, "hh": 1.0, "phi": 0.0, "contrib": 0.0, "oversampled": False}]
    t = coupling_cell_table(pairs)
    c = t["same_token&low_conf"]
    assert c["n"] == 2 and c["hh_mean"] == 3.0 and c["contrib_abs_mean"] == 2.0 and c["contrib_mean"] == 1.0
    assert t["diff_token&low_conf"]["n"] == 0
    assert abs(sum(v["frac_uniform"] for v in t.values()) - 1.0) < 1e-12  # float64 count ratios: error ~4e-16
    cells = coupling_cell_table([{"cell": "same_token&low_conf", "hh_mean": 1.5, "n": 7}])
    assert cells == {"same_token&low_conf": {"hh_mean": 1.5, "n": 7.0}}


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        make_report(tmp_path / "empty")


def test_read_jsonl_skips_bad_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n\nnot json\n[1, 2]\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_cli(tmp_path, capsys):
    from tokencredit.cli import main

    d = _run_dir(tmp_path)
    assert main(["report", str(d), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists() and shutil.which("chromium") is None, reason="no Chromium")
def test_renders_in_headless_chromium(tmp_path):
    d = _run_dir(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "check_report_render.py"
    r = subprocess.run([sys.executable, str(script), str(d), "--height", "1200"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (d / "report.png").is_file()


def test_runs_without_any_update_explain_the_missing_flip_figure(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rows = [{"step": s, "reward_mean": 0.0, "skipped_update": 1.0, "time_generate_s": 1.0} for s in (1, 2)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    page = make_report(d).read_text()
    assert "none of the 2 rollout steps ran a policy update" in page
    assert "2 rollout steps in metrics.jsonl, 0 with a policy update" in page


def test_batching_figure_draws_only_with_update_metrics():
    from tokencredit.report import fig_batching

    assert "no update_rows" in fig_batching(_metrics_rows())
    rows = [{"step": s, "reward_mean": 0.3, "update_rows": 16.0, "update_pos_rows": 6.0, "update_neg_rows": 10.0,
             "rb_size": 8.0 * s, "rb_utilisation": 1.0 / s, "rb_mean_age": 0.5, "rb_dropped_stale": 2.0 * s,
             "rb_dropped_overflow": 1.0} for s in (1, 2, 3)]
    fig = fig_batching(rows)
    a, b = fig.axes
    assert [line.get_label() for line in a.get_lines()] == ["trained, A > 0", "trained, A < 0", "held in the buffer",
                                                           "dropped stale + overflow (cumulative)"]
    assert list(a.get_lines()[2].get_ydata()) == [8.0, 16.0, 24.0]
    assert list(a.get_lines()[3].get_ydata()) == [3.0, 5.0, 7.0]
    assert list(b.get_lines()[0].get_ydata()) == [1.0, 0.5, 1 / 3]
    no_buffer = [{k: v for k, v in r.items() if not k.startswith("rb_")} for r in rows]
    assert fig_batching(no_buffer).axes[1].texts[0].get_text() == "reward-balanced buffer off"


def test_held_out_panel_with_one_evaluation_point():
    from tokencredit.report import fig_reward_accuracy

    rows = [{"step": 1, "reward_mean": 0.5}, {"step": 2, "reward_mean": 0.6}, {"step": 2, "eval_accuracy": 0.4, "eval_k": 1}]
    b = fig_reward_accuracy(rows).axes[1]
    assert b.get_xlim() == (1.0, 3.0) and b.texts[0].get_text() == "0.400"
    rows += [{"step": 4, "eval_accuracy": 0.5, "eval_pass_at_k": 0.75, "eval_k": 4}]
    b = fig_reward_accuracy(rows).axes[1]
    assert [line.get_label() for line in b.get_lines()] == ["avg@k (accuracy)", "pass@k"]
    assert list(b.get_lines()[1].get_ydata()) == [0.75]
