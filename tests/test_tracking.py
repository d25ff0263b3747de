"""output.report_to: TensorBoard event files and W&B (offline) runs carry exactly the
numbers of metrics.jsonl / summary.json; resume continues them; a missing extra is
one line at trainer start."""

import json
import re
import shutil
import sys
import time

import pytest

from tests.conftest import tiny_overrides
from tokencredit.config import ConfigError, load_config
from tokencredit.tracking import TrackingError, flatten_numbers, numeric_items, send_run_summary
from tokencredit.trainer import Trainer


def _rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard itself reads RUN_DIR/tensorboard/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"prompt": f"Say the digit {d}.", "answer": str(d)} for d in range(10)] * 2
    p = tmp_path_factory.mktemp("data") / "digits.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


# ---------------------------------------------------------------- pure helpers
def test_numeric_items_keeps_finite_numbers_only():
    row = {"a": 1, "b": 0.5, "c": None, "d": float("nan"), "e": float("inf"), "f": True, "g": "x", "h": [1.0], "i": {"j": 2}}
    assert numeric_items(row) == {"a": 1.0, "b": 0.5}


def test_flatten_numbers_joins_keys_and_skips_lists():
    d = {"gap": {"gap": 0.25, "lo": None, "n": 3}, "table": [{"x": 1}], "sign_agreement": 0.75, "source": {"run": "r"}}
    assert flatten_numbers(d, "probe/x/") == {"probe/x/gap/gap": 0.25, "probe/x/gap/n": 3.0, "probe/x/sign_agreement": 0.75}


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("value,expected", [
    ("[tensorboard,wandb]", ["tensorboard", "wandb"]),
    ("tensorboard", ["tensorboard"]),
    ("none", []),
    ("[]", []),
    ("[wandb,wandb]", ["wandb"]),
])
def test_report_to_spellings(value, expected):
    assert load_config(None, [f"output.report_to={value}"]).output.report_to == expected


def test_report_to_rejects_unknown_tracker():
    with pytest.raises(ConfigError, match=r"output\.report_to"):
        load_config(None, ["output.report_to=[mlflow]"])


def test_default_is_no_tracker():
    cfg = load_config(None, [])
    assert cfg.output.report_to == [] and cfg.output.wandb_project == "tokencredit" and cfg.output.wandb_tags == []


# ------------------------------------------------------------------ TensorBoard
@pytest.fixture(scope="module")
def tb_run(data_file, tmp_path_factory, one_thread):
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, tiny_overrides(data_file, root, **{
        "output.run_name": "tb", "output.report_to": "[tensorboard]", "probes.flip.every": 1}))
    tr = Trainer(cfg)
    summary = tr.train()
    return tr.run_dir, summary


def test_tensorboard_scalars_equal_metrics_jsonl(tb_run):
    run_dir, summary = tb_run
    rows = _rows(run_dir)
    sc = _scalars(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    # every numeric key of every row is a tag, nothing else except the summary
    keys = {k for r in rows for k in numeric_items(r)} - {"step"}
    assert {t for t in sc if not t.startswith("summary/")} == keys
    assert {"reward_mean", "pg_loss", "grad_norm", "flip_all_boosted", "lr"} <= keys
    for key in ("reward_mean", "pg_loss", "grad_norm", "flip_all_boosted", "time_step_s", "update_rows"):
        expected = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        assert [s for s, _ in sc[key]] == [s for s, _ in expected], key
        for (_, got), (_, want) in zip(sc[key], expected):
            # one float32 rounding in the event file: rel <= 2^-24 = 6e-8 (abs for zeros); rel 1e-6 has 17x
            assert got == pytest.approx(want, rel=1e-6, abs=1e-7), key
    # summary.json's numbers at the last step
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert sc["summary/steps"] == [(2, 2.0)]
    assert sc["summary/reward_last_step"][0][1] == pytest.approx(rows[-1]["reward_mean"], rel=1e-6)  # float32 rounding, as above
    assert sc["summary/optimizer_steps"] == [(2, float(summary["optimizer_steps"]))]


def test_send_run_summary_reaches_tensorboard(tb_run):
    run_dir, _ = tb_run
    sent = send_run_summary(run_dir, {"gap": {"gap": 0.25, "lo": float("nan")}, "table": [1, 2]}, prefix="probe/value_step_2/")
    assert sent == 1
    sc = _scalars(run_dir)
    assert sc["summary/probe/value_step_2/gap/gap"] == [(2, 0.25)]
    assert "summary/probe/value_step_2/gap/lo" not in sc


def test_probe_cli_sends_its_numbers(tb_run, capsys):
    from tokencredit.cli import main

    run_dir, _ = tb_run
    assert main(["probe", "coupling", "--run", str(run_dir), "--pairs", "64"]) == 0
    assert "sent to 1 tracker(s)" in capsys.readouterr().out
    sc = _scalars(run_dir)
    cells = [json.loads(l) for l in (run_dir / "probes" / "coupling_cells.jsonl").read_text().splitlines()]
    assert cells
    for c in cells:
        assert sc[f"summary/probe/coupling/cells/{c['cell']}/n"] == [(2, float(c["n"]))]
    (step, frac), = sc["summary/probe/coupling/flip_frac"]
    assert step == 2 and 0.0 <= frac <= 1.0


def test_value_probe_sends_its_gaps(tb_run, monkeypatch):
    """`tokencredit probe value` hands its gaps to the run's trackers (the probe itself is
    tests/test_value.py's; here a canned result stands in for it)."""
    import tokencredit.probes.value as value
    from tokencredit.cli import main

    run_dir, _ = tb_run
    gap = {"gap": 0.125, "lo": -0.5, "hi": 0.75, "n_boosted": 3, "n_suppressed": 3, "mean_boosted": 0.5, "mean_suppressed": 0.375}
    res = {"path": run_dir / "probes" / "value_step_1.jsonl", "written": 6, "skipped": 0, "checkpoint": "initial model",
           "gap": gap, "by_sign": {"pos": gap, "neg": {**gap, "gap": -0.25}}, "entropy_topk": [], "repeat": []}
    monkeypatch.setattr(value, "run_value_probe", lambda *a, **k: res)
    assert main(["probe", "value", "--run", str(run_dir), "--step", "1", "--no-progress"]) == 0
    sc = _scalars(run_dir)
    assert sc["summary/probe/value_step_1/gap/gap"] == [(2, 0.125)]
    assert sc["summary/probe/value_step_1/by_sign/neg/gap"] == [(2, -0.25)]
    assert sc["summary/probe/value_step_1/gap/n_boosted"] == [(2, 3.0)]


def test_eval_of_a_run_checkpoint_sends_its_numbers(tb_run, data_file, tmp_path):
    from tokencredit.cli import main

    run_dir, _ = tb_run
    out = tmp_path / "ev"
    args = ["eval", "--model", str(run_dir / "checkpoints" / "step_2"), "--data", str(data_file), "--n", "2", "--limit", "3",
            "--max-new-tokens", "4", "--out", str(out), "-q"]
    assert main(args) == 0
    ds = json.loads((out / "summary.json").read_text())["datasets"][0]
    sc = _scalars(run_dir)
    # one float32 rounding of a value in [0, 1]: <= 2^-25 = 3e-8 < abs 1e-7
    assert sc[f"summary/eval/step_2/{ds['name']}/avg@2"] == [(2, pytest.approx(ds["avg@2"], abs=1e-7))]
    assert sc[f"summary/eval/step_2/{ds['name']}/num_problems"] == [(2, 3.0)]


def test_run_dir_of_model(tmp_path):
    from tokencredit.tracking import run_dir_of_model

    run = tmp_path / "r"
    (run / "checkpoints" / "step_4").mkdir(parents=True)
    (run / "final").mkdir()
    (run / "config.yaml").write_text("{}\n")
    assert run_dir_of_model(run) == run
    assert run_dir_of_model(run / "final") == run
    assert run_dir_of_model(run / "checkpoints" / "step_4") == run
    assert run_dir_of_model(run / "checkpoints") is None
    assert run_dir_of_model("tiny-random") is None


def test_tensorboard_resume_hides_the_killed_tail(data_file, tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    over = tiny_overrides(data_file, tmp_path, **{"output.run_name": "r", "output.report_to": "[tensorboard]",
                                                   "train.steps": 3, "output.save_every": 2})
    Trainer(load_config(None, over)).train()
    run = tmp_path / "r"
    # "killed" after logging step 3 but before its checkpoint landed
    shutil.rmtree(run / "checkpoints" / "step_3")
    tr = Trainer(load_config(run / "config.yaml", []), run_dir=run, resume=True)
    assert tr.rollout_step == 2
    tr.train()
    rows = _rows(run)
    sc = _scalars(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # one point per step (the killed run's step 3 and its summary are purged), equal to metrics.jsonl
    assert [s for s, _ in sc["reward_mean"]] == [1, 2, 3]
    assert [v for _, v in sc["reward_mean"]] == pytest.approx([r["reward_mean"] for r in rows], rel=1e-6)  # float32 event file
    assert sc["summary/steps"] == [(3, 3.0)]


# ------------------------------------------------------------------------- W&B
@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """Real wandb in offline mode (no network); wandb.init and run.log are recorded."""
    wandb = pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                 "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(k, v)
    calls: list[dict] = []
    logged: list[dict] = []
    real_init = wandb.init

    def init(**kw):
        calls.append(kw)
        run = real_init(**kw)
        real_log = run.log

        def log(data, *a, **k):
            logged.append(dict(data))
            return real_log(data, *a, **k)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init)
    return calls, logged


def test_wandb_offline_run_and_resume(data_file, tmp_path, wandb_offline, one_thread):
    calls, logged = wandb_offline
    over = tiny_overrides(data_file, tmp_path, **{"output.run_name": "wb", "output.report_to": "[wandb]",
                                                   "output.wandb_project": "tc-test", "output.wandb_tags": "[smoke,tiny]"})
    Trainer(load_config(None, over)).train()
    run = tmp_path / "wb"
    rid = (run / "wandb_id.txt").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{16}", rid)
    assert len(calls) == 1
    kw = calls[0]
    assert (kw["project"], kw["name"], kw["tags"], kw["dir"], kw["id"], kw["resume"]) == ("tc-test", "wb", ["smoke", "tiny"], str(run), rid, "allow")
    assert kw["config"]["output"]["report_to"] == ["wandb"] and kw["config"]["train"]["lr"] == 1e-3
    rows = _rows(run)
    assert [d["step"] for d in logged] == [1, 2]
    for d, r in zip(logged, rows):
        assert d == {k: v for k, v in numeric_items(r).items()}
    offline = sorted((run / "wandb").glob(f"offline-run-*-{rid}"))
    assert len(offline) == 1
    # history and summary reach the offline file (written by wandb's service process: give it a moment)
    wrote, deadline = b"", time.monotonic() + 30
    while not (b"reward_mean" in wrote and b"reward_last_step" in wrote) and time.monotonic() < deadline:
        time.sleep(0.2)
        wrote = (offline[0] / f"run-{rid}.wandb").read_bytes()
    assert b"reward_mean" in wrote and b"reward_last_step" in wrote

    # resume continues the same W&B run: same id, resume="allow", only the new step logged
    tr = Trainer(load_config(run / "config.yaml", ["train.steps=3"]), run_dir=run, resume=True)
    tr.train()
    assert len(calls) == 2 and calls[1]["id"] == rid and calls[1]["resume"] == "allow" and calls[1]["name"] == "wb"
    assert (run / "wandb_id.txt").read_text().strip() == rid
    assert [d["step"] for d in logged[2:]] == [3]
    assert logged[2]["reward_mean"] == _rows(run)[-1]["reward_mean"]
    assert len(list((run / "wandb").glob(f"offline-run-*-{rid}*"))) == 2  # `wandb sync` merges both into run `rid`


def test_wandb_init_failure_is_one_line(data_file, tmp_path, wandb_offline, monkeypatch, one_thread):
    import wandb

    def refuse(**kw):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    monkeypatch.setattr(wandb, "init", refuse)
    tr = Trainer(load_config(None, tiny_overrides(data_file, tmp_path, **{"output.run_name": "x", "output.report_to": "[wandb]"})))
    with pytest.raises(TrackingError) as e:
        tr.train()
    msg = str(e.value)
    assert "\n" not in msg and "api_key not configured" in msg and "WANDB_MODE=offline" in msg
    assert _rows(tmp_path / "x") == []  # nothing trained before the tracker refused


# ---------------------------------------------------------------- missing extra
@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_missing_extra_is_one_line_at_trainer_start(name, data_file, tmp_path, monkeypatch):
    import tokencredit.model

    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    loads = []
    monkeypatch.setattr(tokencredit.model, "load_model", lambda *a, **k: loads.append(a))
    cfg = load_config(None, tiny_overrides(data_file, tmp_path, **{"output.run_name": "m", "output.report_to": f"[{name}]"}))
    with pytest.raises(TrackingError) as e:
        Trainer(cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"pip install 'tokencredit[{name}]'" in msg
    assert loads == [] and not (tmp_path / "m").exists()  # before the model loads or the run directory exists


def test_missing_extra_cli_prints_one_line(data_file, tmp_path, monkeypatch, capsys):
    from tokencredit.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    rc = main(["train", *tiny_overrides(data_file, tmp_path, **{"output.report_to": "[tensorboard]"})])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("tokencredit: error: ") and "pip install 'tokencredit[tensorboard]'" in err[0]
