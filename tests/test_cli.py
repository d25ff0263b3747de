import json
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides
from tokencredit.cli import main


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in ("train.lr", "rollout.n", "batching.planner", "batching.reward_balance.tau", "token_weights.method", "probes.flip.every"):
        assert key in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train.lrr=1"], "unknown key 'train.lrr'"),
        (["model.name=no-such/model-xyz", "output.root=/tmp/tc-cli-test"], "no-such/model-xyz"),
        (["--resume", "/nonexistent/run"], "not a run directory"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, needle, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_malformed_data_row_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n{not json\n")
    rc = main(["train", *tiny_overrides(bad, tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bad.jsonl:2" in err and "\n" not in err


def test_train_runs_and_prints_summary(digits_file, tmp_path, capsys):
    rc = main(["train", *tiny_overrides(digits_file, tmp_path, **{"train.steps": 1, "output.run_name": "cli"})])
    out = capsys.readouterr().out
    assert rc == 0 and f"run directory: {tmp_path / 'cli'}" in out.splitlines()


def test_probe_polarity_fresh_optimizer_ignores_the_checkpoints_state(digits_file, tmp_path, capsys):
    """--fresh-optimizer: the AdamW step starts from a new state, not the checkpoint's; the
    deltas differ from the saved-state step's and the summary names the state used."""
    import pyarrow.parquet as pq

    assert main(["train", *tiny_overrides(digits_file, tmp_path, **{"train.steps": 1, "output.run_name": "r"})]) == 0
    run = tmp_path / "r"
    deltas, texts = {}, {}
    for arm, extra in (("saved", []), ("fresh", ["--fresh-optimizer"])):
        out = tmp_path / arm
        capsys.readouterr()
        assert main(["probe", "polarity", "--run", str(run), "--update", "adamw", "--lr", "1e-3", "--seed", "1",
                     "--threads", "1", "--out", str(out), *extra]) == 0
        texts[arm] = (out / "polarity_summary.txt").read_text()
        deltas[arm] = pq.read_table(out / "polarity_tokens.parquet").column("delta_grpo").to_pylist()
    assert "optimizer state from the checkpoint" in texts["saved"] and "momentum" in texts["saved"]
    assert "fresh optimizer state" in texts["fresh"] and "momentum" not in texts["fresh"]
    assert len(deltas["saved"]) == len(deltas["fresh"]) and deltas["saved"] != deltas["fresh"]


def _files(root):
    return {p for p in root.rglob("*") if p.is_file()}


def test_probe_context_samples_the_trainers_first_rollout(digits_file, tmp_path, monkeypatch):
    """`tokencredit probe ... --run RUN_DIR` samples, without a Trainer, exactly the batch
    the trainer's first rollout step draws (same prompts, group ids, responses), applies
    --threads, and writes nothing outside --out."""
    import torch

    from tokencredit.cli import build_parser
    from tokencredit.config import dump_config, load_config
    from tokencredit.probes.context import load_context
    from tokencredit.trainer import Trainer

    cfg = load_config(None, tiny_overrides(digits_file, tmp_path / "root"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    threads = torch.get_num_threads()
    before = _files(tmp_path)
    try:
        args = build_parser().parse_args(["probe", "polarity", "--run", str(run), "--seed", "3", "--threads", "1"])
        with monkeypatch.context() as m:
            m.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("the probe context built a Trainer"))
            ctx = load_context(args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    new = _files(tmp_path) - before
    assert {p.relative_to(run) for p in new} == {Path("probes/batch.safetensors"), Path("probes/batch.json")}
    assert ctx.out == run / "probes" and ctx.checkpoint is None and ctx.temperature == cfg.rollout.logprob_temperature

    trainer = Trainer(cfg, run_dir=tmp_path / "trainer")
    try:
        torch.manual_seed(3)
        batch, _ = trainer.rollout()
    finally:
        trainer.verifier.close()
    b = ctx.batch
    assert b.prompt_text == batch.prompt_text and b.answer == batch.answer
    for k in ("group_id", "prompt_index", "policy_version", "response_ids", "reward", "advantage"):
        assert torch.equal(getattr(b, k), getattr(batch, k)), k
    assert b.group_id.unique().tolist() == list(range(cfg.rollout.prompts_per_step))  # the first step's stream positions


def test_probe_context_threads_apply_with_a_saved_batch(tmp_path):
    import torch

    from tokencredit.batch import save_batch
    from tokencredit.cli import build_parser
    from tokencredit.model import load_model
    from tokencredit.probes.context import load_context
    from tokencredit.rollout.hf import generate_hf

    _, tok = load_model("tiny-random")
    model, _ = load_model("tiny-random")
    torch.manual_seed(0)
    b = generate_hf(model, tok, ["Say 1."], n=2, temperature=1.0, top_p=1.0, max_new_tokens=3, answers=["1"])
    b.advantage = torch.tensor([1.0, -1.0])
    path = save_batch(b, tmp_path / "b")
    threads = torch.get_num_threads()
    try:
        args = build_parser().parse_args(["probe", "coupling", "--model", "tiny-random", "--batch", str(path),
                                          "--out", str(tmp_path / "out"), "model.threads=1"])
        ctx = load_context(args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ctx.batch.response_ids, b.response_ids) and ctx.source["batch"] == str(path)
    assert not (tmp_path / "out").exists()  # nothing sampled, nothing written


def test_probe_value_takes_run_and_overrides(tmp_path, monkeypatch, capsys):
    import tokencredit.probes.value as value
    from tokencredit.cli import build_parser

    args = build_parser().parse_args(["probe", "value", "--run", str(tmp_path), "--step", "2", "--threads", "1",
                                      "rollout.top_p=0.9", "model.device=cpu"])
    assert args.run == str(tmp_path) and args.step == 2 and args.overrides == ["rollout.top_p=0.9", "model.device=cpu"]
    seen = {}
    gap = {"gap": 0.0, "lo": 0.0, "hi": 0.0, "n_boosted": 1, "n_suppressed": 1, "mean_boosted": 0.0, "mean_suppressed": 0.0}

    def fake(run_dir, step, **kw):
        seen.update(kw, run_dir=run_dir, step=step)
        return {"path": tmp_path / "v.jsonl", "written": 0, "skipped": 0, "checkpoint": "x", "gap": gap,
                "by_sign": {"pos": gap, "neg": gap}, "entropy_topk": [], "repeat": []}

    monkeypatch.setattr(value, "run_value_probe", fake)
    assert main(["probe", "value", "--run", str(tmp_path), "--step", "2", "--threads", "1", "rollout.top_p=0.9", "--no-progress"]) == 0
    assert seen["run_dir"] == str(tmp_path) and seen["step"] == 2
    assert seen["overrides"] == ["rollout.top_p=0.9"] and seen["threads"] == 1
    # the run directory is no longer positional: one clear line, exit 2
    capsys.readouterr()
    assert main(["probe", "value", str(tmp_path), "--step", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--run RUN_DIR is required" in err and f"--run {tmp_path}" in err and "\n" not in err


def test_standalone_commands_refuse_torchrun(monkeypatch, capsys):
    """Only `train` is data-parallel: a probe (or eval/export/report) started under
    torchrun stops with one line before any model loads, instead of N copies racing."""
    from tokencredit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["export", "/nonexistent-run"]) == 2
    err = capsys.readouterr().err
    assert "runs in one process" in err and "WORLD_SIZE=2" in err and len(err.strip().splitlines()) == 1
