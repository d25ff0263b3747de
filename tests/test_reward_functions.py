"""Pluggable rewards (reward.functions): specs, weights, failures, time limits,
extra data columns, the correctness threshold, and a tiny training run."""

import json
import logging
import textwrap
import time

import pytest
import torch

from tests.conftest import tiny_overrides
from tokencredit.algo.token_weights import polarity_advantages, sign_mask_advantages, training_advantages
from tokencredit.config import ConfigError, load_config
from tokencredit.data import load_problems
from tokencredit.evaluate import _problem_record
from tokencredit.rewards.functions import RewardFunctions, RewardSpecError, merge_stats, parse_spec

USER_CODE = textwrap.dedent(
    """
    import time

    def parity(responses, answers, prompts, **extra):
        return [len(r) % 2 for r in responses]

    def boom(responses, answers, prompts):
        raise RuntimeError("reward server down")

    def sleepy(responses, answers, prompts):
        if prompts[0] == "hang":
            time.sleep(30)
        return [1.0] * len(responses)

    def short(responses, answers, prompts):
        return [1.0] * (len(responses) - 1)

    def text(responses, answers, prompts):
        return "1.0"

    def nan(responses, answers, prompts):
        return [float("nan")] * len(responses)

    def by_level(responses, answers, prompts, level):
        # only the column it names is passed (no **kwargs)
        return [float(x) for x in level]

    def echo_keys(responses, answers, prompts, **extra):
        # 1.0 when the row's 'source' column reached it, and the prompt is the raw question
        return [float(s == "book" and p.startswith("Say")) for s, p in zip(extra["source"], prompts)]

    def alternating(responses, answers, prompts, **extra):
        return [1.0 if i % 2 else 0.6 for i in range(len(responses))]

    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def user_file(tmp_path):
    p = tmp_path / "my_rewards.py"
    p.write_text(USER_CODE)
    return p


# ------------------------------------------------------------------ specs


def test_parse_spec_accepts_the_three_forms_and_rejects_the_rest():
    assert parse_spec("math_verify") == ("math_verify", None, "math_verify")
    assert parse_spec("pkg.mod:score") == ("score", "pkg.mod", "score")
    assert parse_spec("some/dir/r.py:fn") == ("fn", "some/dir/r.py", "fn")
    for bad in ("", "math", "pkg.mod", "pkg.mod:", ":fn", "pkg.mod:1fn", "a-b.c:fn", "dir/r.txt:fn"):
        with pytest.raises(RewardSpecError):
            parse_spec(bad)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["reward.functions=[math_verify, not a spec]"], "'reward.functions': item 1"),
        (["reward.functions=[math_verify, r.py:fn]", "reward.weights=[1.0]"], "'reward.weights': 1 weights for 2"),
        (["reward.functions=[a.py:fn, b.mod:fn]"], "'reward.functions': two functions named 'fn'"),
        (["reward.functions=[]"], "'reward.functions': empty"),
        (["reward.timeout_s=0"], "'reward.timeout_s'"),
    ],
)
def test_bad_reward_config_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert key in msg and "\n" not in msg, msg


def test_reward_config_defaults_and_single_spec():
    cfg = load_config(None, [])
    assert cfg.reward.functions == ["math_verify"] and cfg.reward.weights is None and cfg.reward.correct_threshold == 0.5
    cfg = load_config(None, ["reward.functions=rewards.py:brevity"])
    assert cfg.reward.functions == ["rewards.py:brevity"]


@pytest.mark.parametrize("fn, why", [("missing", "has no attribute 'missing'"), ("NOT_CALLABLE", "not a function")])
def test_unloadable_function_fails_at_start_naming_the_spec(user_file, fn, why):
    rf = RewardFunctions([f"{user_file}:{fn}"])
    with pytest.raises(ValueError) as e:
        rf.start()
    msg = str(e.value)
    assert msg.startswith(f"reward.functions: cannot load '{user_file}:{fn}'") and why in msg and "\n" not in msg, msg


def test_trainer_start_rejects_a_missing_file_before_loading_the_model(digits_file, tmp_path):
    from tokencredit.trainer import Trainer

    spec = str(tmp_path / "nope.py") + ":fn"
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"reward.functions": f"[{spec}]"}))
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        Trainer(cfg)
    assert f"cannot load '{spec}'" in str(e.value) and "no file" in str(e.value) and "\n" not in str(e.value)
    assert time.monotonic() - t0 < 30


# ------------------------------------------------------------------ calls

RESPONSES = [r"so \boxed{4}", "4.", "5", "none"]  # lengths 12, 2, 1, 4; math-verify vs gold 4: 1, 1, 0, 0
ANSWERS = ["4"] * 4


def test_custom_function_combined_with_math_verify_by_weights(user_file):
    with RewardFunctions(["math_verify", f"{user_file}:parity"], weights=[1.0, 0.5]) as rf:
        rewards, stats = rf(RESPONSES, ANSWERS, ["q"] * 4)
    # parity = len % 2 = 0, 0, 1, 0 -> 1 + 0, 1 + 0, 0 + 0.5, 0 + 0
    assert rewards == [1.0, 1.0, 0.5, 0.0]
    assert stats == {
        "reward/math_verify/mean": 0.5, "reward/math_verify/failures": 0.0,
        "reward/parity/mean": 0.25, "reward/parity/failures": 0.0,
    }


def test_default_weights_are_one_each(user_file):
    with RewardFunctions(["math_verify", f"{user_file}:parity"]) as rf:
        rewards, _ = rf(RESPONSES, ANSWERS, ["q"] * 4)
    assert rewards == [1.0, 1.0, 1.0, 0.0]


def test_raising_function_scores_zero_and_counts_a_warning(user_file, caplog):
    with RewardFunctions(["math_verify", f"{user_file}:boom"], weights=[1.0, 2.0]) as rf:
        with caplog.at_level(logging.WARNING, logger="tokencredit"):
            rf(RESPONSES, ANSWERS, ["q"] * 4)
            rewards, stats = rf(RESPONSES, ANSWERS, ["q"] * 4)
    assert rewards == [1.0, 1.0, 0.0, 0.0]  # math-verify still counts; boom gives 0
    assert stats["reward/boom/failures"] == 2.0 and stats["reward/boom/mean"] == 0.0
    assert stats["reward/math_verify/failures"] == 0.0
    warned = [r.getMessage() for r in caplog.records if "boom" in r.getMessage()]
    assert len(warned) == 2 and "reward server down" in warned[1] and "(2 so far)" in warned[1]


def test_hanging_function_is_cut_at_the_timeout_and_restarted(user_file):
    with RewardFunctions([f"{user_file}:sleepy", f"{user_file}:parity"], timeout_s=1.0) as rf:
        t0 = time.monotonic()
        rewards, stats = rf(RESPONSES, ANSWERS, ["hang"] * 4)
        elapsed = time.monotonic() - t0
        assert elapsed < 10, elapsed
        assert rewards == [0.0, 0.0, 1.0, 0.0]  # sleepy's rows 0; parity unaffected
        assert stats["reward/sleepy/failures"] == 1.0 and stats["reward/parity/failures"] == 0.0
        # the killed worker is replaced: the next call is answered
        rewards, stats = rf(RESPONSES, ANSWERS, ["ok"] * 4)
        assert rewards == [1.0, 1.0, 2.0, 1.0] and stats["reward/sleepy/failures"] == 1.0


@pytest.mark.parametrize("fn", ["short", "text", "nan"])
def test_wrong_length_or_type_scores_zero_and_counts(user_file, fn, caplog):
    with RewardFunctions([f"{user_file}:{fn}"]) as rf:
        with caplog.at_level(logging.WARNING, logger="tokencredit"):
            rewards, stats = rf(RESPONSES, ANSWERS, ["q"] * 4)
    assert rewards == [0.0] * 4 and stats[f"reward/{fn}/failures"] == 1.0
    assert any(f"reward function {fn} failed" in r.getMessage() for r in caplog.records)


def test_extra_columns_are_passed_by_name(user_file):
    with RewardFunctions([f"{user_file}:by_level", f"{user_file}:echo_keys"]) as rf:
        rewards, stats = rf(["a", "b"], ["1", "1"], ["Say one", "Say two"], {"level": [2, 3], "source": ["book", "web"]})
    assert rewards == [2.0 + 1.0, 3.0 + 0.0]
    assert stats["reward/by_level/mean"] == 2.5 and stats["reward/echo_keys/mean"] == 0.5


def test_merge_stats_weights_means_by_rows_and_keeps_last_counts():
    parts = [(4, {"reward/f/mean": 1.0, "reward/f/failures": 1.0}), (12, {"reward/f/mean": 0.0, "reward/f/failures": 2.0})]
    assert merge_stats(parts) == {"reward/f/mean": 0.25, "reward/f/failures": 2.0}


def test_load_problems_keeps_extra_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"problem": "Q?", "answer": 3, "level": 2, "tests": ["a"]}) + "\n")
    (prob,) = load_problems(p)
    assert prob.prompt == "Q?" and prob.answer == "3" and prob.extra == {"level": 2, "tests": ["a"]}


# ------------------------------------------------------------------ correctness threshold


def test_threshold_decides_correct_rows_for_sample_polarity():
    r = torch.tensor([0.3, 0.7, 1.0, 1.2])
    assert polarity_advantages(r, "psr").tolist() == [0.0, 1.0, 1.0, 1.0]  # old default 0.5
    assert polarity_advantages(r, "psr", threshold=1.0).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert polarity_advantages(r, "nsr", threshold=1.0).tolist() == [-1.0, -1.0, 0.0, 0.0]
    a = torch.tensor([-1.0, -0.5, 0.5, 1.0])
    assert sign_mask_advantages(a, r, "positive", threshold=1.0).tolist() == [0.0, 0.0, 0.5, 1.0]
    assert training_advantages("negative_only", a, r, threshold=1.0).tolist() == [-1.0, -0.5, 0.0, 0.0]


def test_eval_record_uses_the_threshold():
    rec = _problem_record("p", "4", [0.2, 0.6, 1.1], [1, 1, 1], [True] * 3, ["a", "b", "c"], 3, threshold=1.0)
    assert rec["correct"] == [0, 0, 1] and rec["c"] == 1
    assert _problem_record("p", "4", [0.2, 0.6, 1.1], [1, 1, 1], [True] * 3, ["a", "b", "c"], 3)["c"] == 2


# ------------------------------------------------------------------ in training


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_training_logs_each_reward_function(digits_file, tmp_path, user_file, one_thread):
    from tokencredit.trainer import Trainer

    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{
        "output.run_name": "rf", "reward.functions": f"[math_verify, {user_file}:parity]", "reward.weights": "[1.0, 0.5]"}))
    tr = Trainer(cfg)
    tr.train()
    rows = [r for r in _metrics(tr.run_dir) if "reward_mean" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["reward/parity/failures"] == 0 and r["reward/math_verify/failures"] == 0
        assert 0.0 <= r["reward/parity/mean"] <= 1.0
        # reward_mean is the combined reward: mean(1 * math + 0.5 * parity)
        # exact: rewards are multiples of 0.5 over 32 rows, so the float32 sums and / 32 are exact; abs 1e-6 is slack
        assert r["reward_mean"] == pytest.approx(r["reward/math_verify/mean"] + 0.5 * r["reward/parity/mean"], abs=1e-6)
    assert any(0.0 < r["reward/parity/mean"] < 1.0 for r in rows), "responses of both parities"


def test_trainer_uses_correct_threshold_for_sample_polarity(digits_file, tmp_path, user_file, one_thread):
    """Rewards 0.6 / 1.0 alternate; psr with threshold 0.8 trains only the 1.0 rows
    (under the old rule reward > 0.5 every row would be positive)."""
    from tokencredit.trainer import Trainer

    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{
        "output.run_name": "thr", "train.steps": 1, "reward.functions": f"[{user_file}:alternating]",
        "reward.correct_threshold": 0.8, "token_weights.method": "psr"}))
    tr = Trainer(cfg)
    tr.train()
    (row,) = [r for r in _metrics(tr.run_dir) if "reward_mean" in r]
    assert row["reward_mean"] == pytest.approx(0.8)  # float32 mean of 0.6 / 1.0: float32(0.6) is off rel 1.6e-8 < rel 1e-6
    assert row["update_pos_rows"] == 16 and row["update_neg_rows"] == 0 and row["update_rows"] == 32
