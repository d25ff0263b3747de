"""Every file in configs/ plans one rollout step as its own header says, and the
config rules of the reward-balanced buffer (issue: RB semantics)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tokencredit.algo.advantages import group_advantages
from tokencredit.algo.token_weights import training_advantages
from tokencredit.batch import RolloutBatch
from tokencredit.batching import PLANNERS
from tokencredit.config import ConfigError, load_config
from tokencredit.trainer import build_buffer, rows_per_minibatch

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))
PLAN = re.compile(r"^# plan @ (\d+)% pass rate: (\d+) update rows, (\d+) optimizer steps? per rollout step", re.M)


def synthetic_step(prompts: int, n: int, pass_rate: float) -> RolloutBatch:
    """prompts x n rows; group g has round((g+1) q n) - round(g q n) correct rows, so
    the batch's pass rate is q up to rounding and no group is all-equal at 0 < q n < n-1."""
    B, T = prompts * n, 4
    correct = [round((g + 1) * pass_rate * n) - round(g * pass_rate * n) for g in range(prompts)]
    reward = torch.tensor([1.0 if i < c else 0.0 for c in correct for i in range(n)])
    return RolloutBatch(
        prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
        response_ids=torch.ones(B, T, dtype=torch.long), response_mask=torch.ones(B, T),
        group_id=torch.arange(prompts).repeat_interleave(n), reward=reward,
    )


def plan_one_step(cfg, pass_rate: float) -> tuple[int, int]:
    """(update rows, optimizer steps) of one rollout step, wired as the trainer wires it."""
    batch = synthetic_step(cfg.rollout.prompts_per_step, cfg.rollout.n, pass_rate)
    adv = group_advantages(batch.reward, batch.group_id, cfg.algo.adv_estimator, cfg.algo.adv_eps)
    batch.advantage = training_advantages(cfg.token_weights.method, adv, batch.reward, cfg.token_weights.lam)
    update = batch
    buffer = build_buffer(cfg)
    if buffer is not None:
        buffer.add(batch, 0)
        update, _ = buffer.pop_update_set(0)
        if update is None:
            return 0, 0
    plan = PLANNERS.get(cfg.batching.planner)(update.group_id, update.advantage, update.response_lengths,
                                              rows_per_minibatch(cfg), torch.Generator().manual_seed(0))
    assert sorted(i for mb in plan for i in mb) == list(range(len(update)))
    return len(update), len(plan)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_header_states_its_plan(path):
    claims = PLAN.findall(path.read_text())
    assert any(q == "40" for q, _, _ in claims), f"{path} states no '# plan @ 40% pass rate' line"
    cfg = load_config(path)
    for q, rows, steps in claims:
        assert plan_one_step(cfg, int(q) / 100) == (int(rows), int(steps)), f"{path.name} @ {q}%"


def test_paper_config_takes_four_optimizer_steps_when_balanced():
    cfg = load_config(next(p for p in CONFIGS if p.name == "paper_qwen.yaml"))
    assert cfg.rollout.prompts_per_step * cfg.rollout.n == 1024
    assert plan_one_step(cfg, 0.5) == (1024, 4)


def test_old_target_rows_key_gives_one_clear_line(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("batching:\n  reward_balance:\n    target_rows: 16\n")
    for args in ((f, []), (None, ["batching.reward_balance.target_rows=16"])):
        with pytest.raises(ConfigError, match="target_rows was removed.*update_rows") as e:
            load_config(*args)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["psr", "nsr", "positive_only", "negative_only"])
def test_single_polarity_methods_are_refused_with_rb(method):
    with pytest.raises(ConfigError, match=f"token_weights.method={method} trains on one advantage sign.*tau=null"):
        load_config(None, [f"token_weights.method={method}", "batching.reward_balance.tau=0.25"])
    load_config(None, [f"token_weights.method={method}", "batching.reward_balance.tau=null"])  # fine without RB
    load_config(None, ["token_weights.method=w_reinforce", "batching.reward_balance.tau=0.25"])  # both signs: fine


def test_embedded_default_rb_binds_below_a_quarter():
    """4 x 8 at tau 0.25: a batch of 1-2 of 8 correct per group is cut to a balanced subset;
    with n = 4 the same tau would release every mixed group (RB only drops all-equal groups)."""
    cfg = load_config(None, [])
    rows, steps = plan_one_step(cfg, 0.15)  # groups 1, 1, 2, 1 of 8 correct
    assert (rows, steps) == (8, 1)
    cfg4 = load_config(None, ["rollout.n=4", "rollout.prompts_per_step=8", "train.mini_batch_size=4"])
    assert plan_one_step(cfg4, 0.25) == (32, 2)  # groups 1 of 4: each is balanced alone
