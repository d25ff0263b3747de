"""Core pieces without a Trainer: the prompt set, the rollout backend registry and
rollout step, the token-weight registry's config params, run-directory I/O and
the batch file format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tokencredit.config import ConfigError, load_config


# ------------------------------------------------------------------ prompt set
def test_prompt_stream_is_a_pure_function_of_seed_and_position(digits_file):
    from tokencredit.data.promptset import build_prompt_set
    from tokencredit.model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = load_config(None, [f"data.train={digits_file}", "train.seed=3"])
    ps = build_prompt_set(cfg, tok)
    assert len(ps) == 20
    n = len(ps)
    # epoch e is randperm(n) under seed * 1_000_003 + e
    order = [torch.randperm(n, generator=torch.Generator().manual_seed(3 * 1_000_003 + e)).tolist() for e in (0, 1)]
    assert ps.indices(0, n + 5) == order[0] + order[1][:5]
    assert build_prompt_set(cfg, tok).indices(18, 4) == ps.indices(18, 4)  # resume: same positions, same prompts
    assert ps.questions[ps.indices(0, 1)[0]].startswith("Say the digit")
    unshuffled = build_prompt_set(load_config(None, [f"data.train={digits_file}", "data.shuffle=false"]), tok)
    assert unshuffled.indices(19, 3) == [19, 0, 1]
    ev = build_prompt_set(cfg, tok, "eval")  # held-out arithmetic, seed train.seed + 10_007, never shuffled
    from tokencredit.data import arithmetic_problems

    assert len(ev) == 32 and ev.answers == [p.answer for p in arithmetic_problems(32, seed=3 + 10_007, difficulty=1)]
    assert len(build_prompt_set(load_config(None, [f"data.train={digits_file}", "eval.num_problems=0"]), tok, "eval")) == 0
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        build_prompt_set(load_config(None, [f"data.train={digits_file}", "data.max_prompt_tokens=1"]), tok)


# --------------------------------------------------------------- rollout step
def test_rollout_step_without_a_trainer(digits_file):
    from tokencredit.data.promptset import build_prompt_set
    from tokencredit.model import load_model
    from tokencredit.rollout import HFSampler, make_sampler, rollout_step

    cfg = load_config(None, [f"data.train={digits_file}", "model.name=tiny-random", "rollout.prompts_per_step=3",
                             "rollout.n=2", "rollout.max_new_tokens=4"])
    model, tok = load_model("tiny-random")
    ps = build_prompt_set(cfg, tok)
    sampler = make_sampler(model, tok, cfg)
    assert isinstance(sampler, HFSampler)
    calls = []

    def verifier(texts, answers, prompts, extras):  # a plain callable: reward 1 for the first row of each group
        calls.append(list(prompts))
        return [float(i % 2 == 0) for i in range(len(texts))], {}

    torch.manual_seed(0)
    out = rollout_step(sampler, ps, verifier, cfg, cursor=5, policy_version=7)
    b = out.batch
    idx = ps.indices(5, 3)
    assert out.cursor == 8 and b.group_id.tolist() == [5, 5, 6, 6, 7, 7]  # group id = stream position
    assert b.prompt_index.tolist() == [i for i in idx for _ in range(2)] and (b.policy_version == 7).all()
    assert calls == [[ps.questions[i] for i in idx for _ in range(2)]]
    # GRPO on (1, 0): +-1/sqrt(2), moved 1.4e-6 by the std's eps 1e-6 and 4e-8 by float32 storage (was the 4-digit
    # literal 0.7071 with abs 1e-3)
    assert b.advantage.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)] * 3, abs=1e-5)
    assert out.tokens == b.num_tokens and out.metrics["reward_mean"] == 0.5
    with pytest.raises(ValueError, match="itself"):
        sampler.sync_weights(torch.nn.Linear(1, 1), 1)


def test_unknown_rollout_backend_is_one_config_line():
    with pytest.raises(ConfigError, match="rollout.backend 'nope' is unknown; valid: auto, hf, vllm"):
        load_config(None, ["rollout.backend=nope"])


# ------------------------------------------------------- token-weight registry
def test_a_new_token_weight_method_is_one_registration():
    """Registering a method (with its config params) is all it takes: config
    validation, the params the trainer passes and the dispatcher all see it."""
    from tokencredit.algo.token_weights import TOKEN_WEIGHT_METHODS, compute_token_weights, method_params, register_method

    @register_method("test_scaled", lambda tw: {"scale": tw.top})
    def _scaled(inp, scale: float = 1.0, threshold: float = 0.5):
        return inp["mask"] * scale, inp["advantage"], {"test_threshold": threshold}

    try:
        cfg = load_config(None, ["token_weights.method=test_scaled", "token_weights.top=0.25", "reward.correct_threshold=0.7"])
        params = method_params(cfg.token_weights, cfg.reward.correct_threshold)
        assert params == {"scale": 0.25, "threshold": 0.7}
        mask = torch.ones(2, 3)
        w, adv, st = compute_token_weights("test_scaled", mask=mask, advantage=torch.tensor([1.0, -1.0]), **params)
        assert torch.equal(w, mask * 0.25) and st["test_threshold"] == 0.7
    finally:
        TOKEN_WEIGHT_METHODS._items.pop("test_scaled")
    assert method_params(load_config(None, ["token_weights.method=forking", "token_weights.top=0.3"]).token_weights, 0.5) == {"top": 0.3}
    assert method_params(load_config(None, ["token_weights.method=nsr", "batching.reward_balance.tau=null"]).token_weights, 0.6) == {"threshold": 0.6}


def test_config_help_lists_the_registries():
    from tokencredit.config import Config

    fields = Config.model_fields
    method_help = fields["token_weights"].annotation.model_fields["method"].description
    backend_help = fields["rollout"].annotation.model_fields["backend"].description
    assert "forking_random" in method_help and "resrl" in method_help and "hf" in backend_help


# --------------------------------------------------------------- run-dir I/O
def test_jsonl_nan_torn_tail_and_repair(tmp_path):
    from tokencredit.rundir import append_jsonl, read_jsonl

    p = tmp_path / "sub" / "m.jsonl"
    append_jsonl(p, [{"a": 1.0, "b": float("nan"), "c": [1.0, float("inf")], "d": {"e": float("-inf")}}])
    append_jsonl(p, [{"a": 2}])
    assert p.read_text().splitlines()[0] == json.dumps({"a": 1.0, "b": None, "c": [1.0, None], "d": {"e": None}})
    with open(p, "a") as f:
        f.write('{"a": 3, "b"')  # killed mid-write
    assert [r["a"] for r in read_jsonl(p)] == [1.0, 2]
    assert '"b"' in p.read_text().splitlines()[-1]  # not repaired unless asked
    read_jsonl(p, repair=True)
    append_jsonl(p, [{"a": 4}])
    assert [r["a"] for r in read_jsonl(p)] == [1.0, 2, 4]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_parquet_is_atomic_and_round_trips(tmp_path):
    from tokencredit.rundir import read_parquet, read_table, write_parquet

    p = write_parquet(tmp_path / "probes" / "x.parquet", {"row": [0, 1], "delta": [0.5, -1.0]})
    assert read_parquet(p) == {"row": [0, 1], "delta": [0.5, -1.0]}
    assert read_table(p) == [{"row": 0, "delta": 0.5}, {"row": 1, "delta": -1.0}]
    assert [f.name for f in p.parent.iterdir()] == ["x.parquet"]  # no temporary left behind


def test_batch_file_round_trip(tmp_path):
    from tokencredit.batch import RolloutBatch, load_batch, save_batch

    b = RolloutBatch(prompt_ids=torch.tensor([[1, 2]]), prompt_mask=torch.ones(1, 2, dtype=torch.long),
                     response_ids=torch.tensor([[3, 4, 0]]), response_mask=torch.tensor([[1.0, 1.0, 0.0]]),
                     group_id=torch.tensor([9]), pad_id=0, advantage=torch.tensor([0.5]), response_text=["ab"],
                     ratio_weight=torch.tensor([[1.0, 0.5, 0.0]]))
    path = save_batch(b, tmp_path / "batch")
    c = load_batch(path.with_suffix(".json"))
    assert torch.equal(c.ratio_weight, b.ratio_weight) and c.response_text == ["ab"] and int(c.group_id[0]) == 9
    with pytest.raises(FileNotFoundError, match="side by side"):
        load_batch(tmp_path / "nothing")


def test_vllm_backend_without_vllm_is_one_line(monkeypatch):
    """backend=vllm and vLLM missing: one ConfigError naming the install command;
    auto on a CPU model is hf."""
    import tokencredit.rollout.vllm as v
    from tokencredit.model.tiny import build_tiny
    from tokencredit.rollout import HFSampler, make_sampler

    model, tok = build_tiny()
    monkeypatch.setattr(v, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match=r"vLLM is not installed; install it with make install-vllm"):
        make_sampler(model, tok, load_config(None, ["rollout.backend=vllm"]))
    assert isinstance(make_sampler(model, tok, load_config(None, ["rollout.backend=auto"])), HFSampler)
