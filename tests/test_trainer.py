import copy
import json

import pytest
import torch

from tests.conftest import tiny_overrides
from tokencredit.config import load_config
from tokencredit.trainer import Trainer


def _metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_smoke_every_parameter_changes(digits_file, tmp_path):
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "smoke", "probes.flip.every": 1}))
    tr = Trainer(cfg)
    before = copy.deepcopy(tr.model.state_dict())
    summary = tr.train()
    rows = _metrics(tr.run_dir)
    assert summary["steps"] == 2 and len(rows) == 2
    # precondition: the seeded run has at least one mixed group (else no gradient at all)
    assert sum(r["update_pos_rows"] for r in rows) > 0
    for name, p in tr.model.state_dict().items():
        assert not torch.equal(before[name], p), f"{name} did not change"
    # the flip probe ran and its fractions add up
    r = rows[-1]
    # each fraction is a float32 mean of 0/1 flags (one rounding, <= 6e-8); the sum of three is within 2e-7 of 1
    assert r["flip_all_boosted"] + r["flip_all_suppressed"] + r["flip_all_stable"] == pytest.approx(1.0)
    assert (tr.run_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert (tr.run_dir / "config.yaml").is_file() and (tr.run_dir / "summary.json").is_file()


# update sets of at most 16 rows from 32-row rollout batches: the buffer holds rows across steps
RB_QB = {"batching.planner": "query_preserved", "batching.reward_balance.tau": 0.25, "batching.reward_balance.update_rows": 16}
DS = {"rollout.dynamic_sampling": True, "rollout.max_gen_rounds": 3}


@pytest.mark.parametrize("arm", ["plain", "qb_rb", "ds_qb_rb"])
def test_resume_reaches_the_same_weights(digits_file, tmp_path, arm):
    arms = {"plain": {}, "qb_rb": RB_QB, "ds_qb_rb": {**RB_QB, **DS}}
    extra = {"train.steps": 4, "output.save_every": 2, "probes.flip.every": 1, **arms[arm]}
    a = Trainer(load_config(None, tiny_overrides(digits_file, tmp_path, **extra, **{"output.run_name": "a"})))
    a.train()
    # run b is "killed" after step 2 (it only gets 2 steps), then resumed to 4
    b_cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{**extra, "train.steps": 2, "output.run_name": "b"}))
    Trainer(b_cfg).train()
    cfg4 = load_config(tmp_path / "b" / "config.yaml", ["train.steps=4"])
    b = Trainer(cfg4, run_dir=tmp_path / "b", resume=True)
    assert b.rollout_step == 2
    b.train()
    for (n, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), n
    ra, rb = _metrics(a.run_dir), _metrics(b.run_dir)
    assert [r["reward_mean"] for r in ra] == [r["reward_mean"] for r in rb]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    if arm != "plain":  # the buffer held rows across the checkpoint and released them identically
        assert [r.get("rb_size") for r in ra] == [r.get("rb_size") for r in rb]
        assert any(r.get("rb_size", 0) > 0 for r in ra[:2])
    if arm == "ds_qb_rb":  # the prompt cursor came back with the checkpoint
        assert a.prompt_cursor == b.prompt_cursor >= 16
        assert [r["ds_gen_rounds"] for r in ra] == [r["ds_gen_rounds"] for r in rb]


def test_micro_batch_size_and_checkpointing_do_not_change_the_update(digits_file, tmp_path):
    states = []
    for mbs, gc in ((2, False), (16, True)):
        cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"train.steps": 1, "train.micro_batch_size": mbs, "output.run_name": f"m{mbs}",
                                                                         "model.gradient_checkpointing": gc}))
        tr = Trainer(cfg)
        tr.train()
        states.append(tr.model.state_dict())
        assert _metrics(tr.run_dir)[0]["update_pos_rows"] > 0
    # float32 path difference: micro-batch 2 vs 16 reorders the gradient sums; after 2 Adam steps of ~lr = 1e-3
    # the weights differ by <= 1.5e-7 here (also under AVX2 kernels); 1e-6 (+ rtol 1e-5 * |w| ~ 7e-7) is 5e-4 of the step
    for n in states[0]:
        assert torch.allclose(states[0][n], states[1][n], atol=1e-6), n


def test_resume_before_the_first_checkpoint_starts_over(digits_file, tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "empty", "train.steps": 1}))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')  # the killed run's tail
    tr = Trainer(cfg, run_dir=tmp_path / "empty", resume=True)
    assert "no complete checkpoint yet; starting it from step 0" in capsys.readouterr().out
    assert tr.rollout_step == 0 and (tmp_path / "empty" / "config.yaml").is_file()
    tr.train()
    assert [r["step"] for r in _metrics(tr.run_dir)] == [1]


def test_single_response_groups_warn_that_nothing_trains(digits_file, tmp_path):
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "n1", "rollout.n": 1, "train.mini_batch_size": 1}))
    with pytest.warns(RuntimeWarning, match="rollout.n=1 with algo.adv_estimator=grpo"):
        Trainer(cfg)


@pytest.mark.parametrize("method", ["none", "forking", "w_reinforce", "resrl", "positive_only"])
@pytest.mark.parametrize("buffer", [False, True])
def test_flip_probe_with_lr_zero_sees_every_token_stable(digits_file, tmp_path, method, buffer):
    """Before and after come from one numerical path: a no-op update flips nothing."""
    if buffer and method == "positive_only":
        return  # refused at config validation (single polarity never balances)
    extra = {"output.run_name": f"lr0-{method}-{buffer}", "train.lr": 1e-30, "probes.flip.every": 1, "train.steps": 2,
             "token_weights.method": method, "train.micro_batch_size": 5,
             **({**RB_QB, "batching.reward_balance.tau": 0.1} if buffer else {})}  # the tiny model is right ~3%
    tr = Trainer(load_config(None, tiny_overrides(digits_file, tmp_path, **extra)))
    tr.optimizer.param_groups[0]["lr"] = 0.0
    tr.scheduler.base_lrs = [0.0]
    tr.train()
    rows = [r for r in _metrics(tr.run_dir) if "flip_all_stable" in r]
    assert rows, "precondition: at least one update ran the probe"
    for r in rows:
        assert r["flip_all_stable"] == 1.0 and r["flip_all_boosted"] == 0.0, r


def test_dynamic_sampling_keeps_only_groups_with_signal(digits_file, tmp_path):
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "ds", **DS, "train.steps": 1}))
    tr = Trainer(cfg)
    batch, m = tr.rollout()
    groups = batch.group_id.unique()
    assert 1 <= m["ds_gen_rounds"] <= 3 and tr.prompt_cursor == 4 * m["ds_gen_rounds"]
    assert len(groups) == min(4, m["ds_useful_groups"]) and len(batch) == 8 * len(groups)
    for g in groups:  # every kept group has a nonzero advantage
        # all-equal groups get exact 0; a mixed group of 8 binary rewards has |A| >= 0.35, so 1e-6 only tells 0 from not 0
        assert (batch.advantage[batch.group_id == g].abs() > 1e-6).any()
    assert m["ds_surplus_groups"] == max(0, m["ds_useful_groups"] - 4)
    assert m["ds_short_groups"] == max(0, 4 - m["ds_useful_groups"])


def test_w_reinforce_buffer_keeps_all_equal_groups(digits_file, tmp_path):
    """The buffer sees the advantage that trains: an all-correct group has +lam on every row."""
    from tokencredit.algo.token_weights import training_advantages
    from tokencredit.rollout.step import groups_all_equal
    from tokencredit.trainer import build_buffer

    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "wr", **RB_QB,
                                                                     "token_weights.method": "w_reinforce"}))
    tr = Trainer(cfg)
    batch, _ = tr.rollout()
    assert torch.equal(batch.advantage, training_advantages("w_reinforce", batch.advantage, batch.reward, 0.1))
    expect = torch.where(batch.reward > 0.5, torch.tensor(0.1), torch.tensor(-1.0))
    assert torch.equal(batch.advantage, expect)
    assert groups_all_equal(batch) > 0, "precondition: an all-equal group (GRPO A = 0 there)"
    buf = build_buffer(cfg)
    buf.add(batch, 0)
    _, s = buf.pop_update_set(0)
    assert s["rb_dropped_zero_adv"] == 0 and s["rb_sampled_total"] == len(batch)


@pytest.mark.parametrize("scope", ["micro-batch", "mini-batch", "rollout-batch"])
def test_every_token_weight_method_runs_in_the_trainer(digits_file, tmp_path, scope):
    from tokencredit.algo.token_weights import TOKEN_WEIGHT_METHODS

    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": f"tw-{scope}", "train.micro_batch_size": 4,
                                                                     "token_weights.scope": scope}))
    tr = Trainer(cfg)
    batch, _ = tr.rollout()
    assert (batch.advantage != 0).any(), "precondition: a mixed group"
    methods = TOKEN_WEIGHT_METHODS.names() if scope == "mini-batch" else ["forking", "resrl"]
    for method in methods:
        tr.cfg.token_weights.method = method
        m = tr.update(copy.deepcopy(batch))
        if method == "none":
            assert "tw_kept_frac" not in m
            continue
        assert 0.0 <= m["tw_kept_frac"] <= 1.0, method
        if method == "forking":
            # top-20% by entropy in each scope: about a fifth of the tokens survive (ties aside)
            assert 0.15 <= m["tw_kept_frac"] <= 0.45
        if method == "resrl":
            assert m["resrl_groups"] + m["resrl_groups_skipped"] >= 1


def test_dynamic_sampling_with_no_signal_stops_at_the_round_cap(digits_file, tmp_path):
    """All rewards equal for every round: the step trains on nothing, says so, and the
    buffer (on) stays empty; nothing crashes and the cursor moved max_gen_rounds rounds."""
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "ds0", **DS, **RB_QB, "train.steps": 2}))
    tr = Trainer(cfg)
    tr.verifier = lambda texts, answers, prompts, extras: ([0.0] * len(texts), {})
    tr.train()
    rows = _metrics(tr.run_dir)
    assert [r["ds_gen_rounds"] for r in rows] == [3, 3] and [r["ds_short_groups"] for r in rows] == [4, 4]
    assert all(r["skipped_update"] == 1.0 for r in rows) and tr.prompt_cursor == 2 * 3 * 4
    assert rows[-1]["rb_dropped_zero_adv"] == 0 and rows[-1]["rb_size"] == 0


def test_resrl_weights_do_not_depend_on_scope_or_planner_cuts(digits_file, tmp_path):
    """ResRL subspaces are per whole group over the update set, however the batch is cut."""
    states = []
    for scope in ("micro-batch", "mini-batch", "rollout-batch"):
        cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{
            "output.run_name": f"resrl-{scope}", "train.steps": 1, "token_weights.method": "resrl", "token_weights.scope": scope,
            "token_weights.resrl_rank": 2, "train.micro_batch_size": 3, "batching.planner": "token_balanced"}))
        tr = Trainer(cfg)
        tr.train()
        m = _metrics(tr.run_dir)[0]
        assert m["resrl_groups"] >= 1, "precondition: a group with both signs"
        states.append(tr.model.state_dict())
    for s in states[1:]:
        for n in s:
            assert torch.equal(states[0][n], s[n]), n


def test_every_phase_reports_wall_and_cpu_seconds_that_add_up(digits_file, tmp_path):
    """time_<phase>_s and cpu_<phase>_s (tokencredit/timing.py) for every phase of a step; the phases are
    disjoint intervals inside the step, so both clocks' parts add up to at most the step's total
    (process CPU time is additive over disjoint intervals, as wall time is)."""
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "clocks", "probes.flip.every": 1,
                                                                     "token_weights.method": "forking"}))
    tr = Trainer(cfg)
    tr.train()
    rows = [r for r in _metrics(tr.run_dir) if "time_step_s" in r]
    phases = ("generate", "reward", "old_logprob", "update", "flip_probe")  # token_weights is inside update
    trained = [r for r in rows if "time_update_s" in r]
    assert trained, "precondition: an update happened"
    for r in trained:
        for p in (*phases, "token_weights", "step"):
            assert r[f"time_{p}_s"] >= 0 and r[f"cpu_{p}_s"] >= 0, p
        for clock in ("time", "cpu"):
            assert sum(r[f"{clock}_{p}_s"] for p in phases) <= r[f"{clock}_step_s"], (clock, r)
        assert r["time_token_weights_s"] <= r["time_update_s"] and r["cpu_token_weights_s"] <= r["cpu_update_s"]
        assert r["cpu_generate_s"] > 0 and r["gen_tokens"] == r["response_len_mean"] * 32  # 4 prompts x 8 rows
    assert sum(r["gen_tokens"] for r in rows) == tr.tokens_generated
