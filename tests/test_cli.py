import json

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
