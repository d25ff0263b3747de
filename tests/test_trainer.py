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
    assert r["flip_all_boosted"] + r["flip_all_suppressed"] + r["flip_all_stable"] == pytest.approx(1.0)
    assert (tr.run_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()
    assert (tr.run_dir / "config.yaml").is_file() and (tr.run_dir / "summary.json").is_file()


RB_QB = {"batching.planner": "query_preserved", "batching.reward_balance.tau": 0.25, "batching.reward_balance.target_rows": 16}


@pytest.mark.parametrize("arm", ["plain", "qb_rb"])
def test_resume_reaches_the_same_weights(digits_file, tmp_path, arm):
    extra = {"train.steps": 4, "output.save_every": 2, "probes.flip.every": 1, **(RB_QB if arm == "qb_rb" else {})}
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
    if arm == "qb_rb":  # the buffer held rows across the checkpoint and released them identically
        assert [r.get("rb_size") for r in ra] == [r.get("rb_size") for r in rb]
        assert any(r.get("rb_size", 0) > 0 for r in ra[:2])


def test_micro_batch_size_and_checkpointing_do_not_change_the_update(digits_file, tmp_path):
    states = []
    for mbs, gc in ((2, False), (16, True)):
        cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"train.steps": 1, "train.micro_batch_size": mbs, "output.run_name": f"m{mbs}",
                                                                         "model.gradient_checkpointing": gc}))
        tr = Trainer(cfg)
        tr.train()
        states.append(tr.model.state_dict())
        assert _metrics(tr.run_dir)[0]["update_pos_rows"] > 0
    for n in states[0]:
        assert torch.allclose(states[0][n], states[1][n], atol=1e-6), n


def test_resume_without_checkpoint_is_a_clear_error(digits_file, tmp_path):
    cfg = load_config(None, tiny_overrides(digits_file, tmp_path, **{"output.run_name": "empty"}))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(cfg, run_dir=tmp_path / "empty", resume=True)


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
