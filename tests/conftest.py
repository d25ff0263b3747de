import json

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model ops: one intra-op thread avoids OpenMP stalls on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def digits_file(tmp_path):
    """A data file the tiny random char-level model sometimes answers right: single
    digit answers, scored on the last number of the response."""
    rows = [{"prompt": f"Say the digit {d}.", "answer": str(d)} for d in range(10)] * 2
    p = tmp_path / "digits.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def tiny_overrides(data_file, run_root, **extra):
    base = {
        "model.name": "tiny-random",
        "data.train": str(data_file),
        "train.steps": 2,
        "rollout.prompts_per_step": 4,
        "rollout.n": 8,
        "rollout.max_new_tokens": 6,
        "train.mini_batch_size": 2,
        "train.micro_batch_size": 8,
        "train.lr": 1e-3,
        "eval.num_problems": 0,
        "batching.planner": "random",
        "batching.reward_balance.tau": "null",
        "probes.flip.every": 0,
        "output.root": str(run_root),
        "output.progress": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
