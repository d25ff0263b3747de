import torch

from tokencredit.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from tokencredit.model.tiny import build_tiny


def test_round_trip_with_optimizer_and_rng(tmp_path):
    model, _ = build_tiny(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    state = {"step": 3, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "nested": {"a": [1, 2.5, None]}}
    p = save_checkpoint(tmp_path, 3, model, state)
    other, _ = build_tiny(seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    st = load_checkpoint(p, other)
    for (n1, a), (n2, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    assert st["step"] == 3 and st["nested"] == {"a": [1, 2.5, None]}
    assert torch.equal(st["rng"], state["rng"])
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    opt2.load_state_dict(st["optimizer"])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], opt2.state_dict()["state"][k]["exp_avg"])


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    model, _ = build_tiny()
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, model, {"s": s}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_3"]
    # a crash mid-write leaves only a temp dir or a dir without state.json
    (tmp_path / ".tmp-step_4-123").mkdir()
    (tmp_path / "step_5").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_3"
