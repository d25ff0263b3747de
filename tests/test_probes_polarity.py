"""Tests for tokencredit.probes.polarity (cancellation paper Alg. 2, Fig. 1(d))."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_probes_masking import logprobs, make_batch
from tokencredit.model.tiny import build_tiny
from tokencredit.probes.masking import eq2_weights, sgd_step
from tokencredit.probes.polarity import adamw_update, polarity_probe, positive_only


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny(seed=0)
    return model, tok


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_positive_only_by_hand():
    a = torch.tensor([1.5, -0.5, 0.0, 2.0, -3.0])
    assert torch.equal(positive_only(a), torch.tensor([1.5, 0.0, 0.0, 2.0, 0.0]))
    a2 = torch.tensor([[0.3, -0.2], [-1.0, 4.0]])  # per-token form too
    assert torch.equal(positive_only(a2), torch.tensor([[0.3, 0.0], [0.0, 4.0]]))


@pytest.mark.parametrize("update", ["sgd", "adamw"])
def test_model_unchanged(tiny, update):
    model, tok = tiny
    batch = make_batch(tok)
    before = _state(model)
    table, summary = polarity_probe(model, batch, update=update, lr=0.1 if update == "sgd" else 1e-3)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert len(table["delta_grpo"]) == batch.num_tokens == summary["tokens"]
    assert summary["rows_pos"] == 5 and summary["rows_neg"] == 3
    for v in ("grpo", "positive_only"):
        s = summary[v]
        for sub in ("pos", "neg", "all"):
            tot = s[f"flip_{sub}_boosted"] + s[f"flip_{sub}_suppressed"] + s[f"flip_{sub}_stable"]
            # each fraction is a float32 mean of 0/1 flags (one rounding, <= 6e-8); the sum of three is within 2e-7 of 1
            assert tot == pytest.approx(1.0)
    # the two updates differ when there are negative rows
    assert table["delta_grpo"] != table["delta_positive_only"]


def test_sgd_variant_is_the_eq2_step(tiny):
    """GRPO variant == a literal SGD step with A; positive-only == one with A+ (negatives zeroed)."""
    model, tok = tiny
    batch = make_batch(tok)
    rows, pos = (batch.response_mask > 0).nonzero(as_tuple=True)
    table, _ = polarity_probe(model, batch, update="sgd", lr=0.1)
    before = logprobs(model, batch)
    for col, adv in (("delta_grpo", batch.advantage), ("delta_positive_only", positive_only(batch.advantage))):
        m = copy.deepcopy(model)
        sgd_step(m, batch, eq2_weights(batch, adv), 0.1)
        ref = (logprobs(m, batch) - before)[rows, pos]
        # the probe takes this very step and forward (equal bitwise here); 1e-6 is 2 ulps of |lp| ~ 5, only slack
        assert (torch.tensor(table[col]) - ref).abs().max() < 1e-6
    assert table["advantage_pos"] == [max(a, 0.0) for a in table["advantage"]]


@pytest.mark.parametrize("update", ["sgd", "adamw"])
def test_only_positive_rows_updates_coincide(tiny, update):
    model, tok = tiny
    batch = make_batch(tok, adv=[0.9, 0.0, 0.8, 0.3, 0.7, 0.5, 0.0, 0.2])
    table, summary = polarity_probe(model, batch, update=update, lr=0.1 if update == "sgd" else 1e-3)
    assert table["delta_grpo"] == table["delta_positive_only"]  # exactly
    assert summary["sign_agreement"] == 1.0
    assert summary["grpo"] == summary["positive_only"]
    assert any(abs(d) > 1e-6 for d in table["delta_grpo"])  # the update did something (max 0.07, far above float noise)


def test_adamw_with_optimizer_state_leaves_state_untouched(tiny):
    model, tok = tiny
    batch = make_batch(tok)
    params = [p for p in copy.deepcopy(model).parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    opt.step()
    state = opt.state_dict()
    saved = copy.deepcopy(state)
    table, _ = polarity_probe(model, batch, update=adamw_update(None, optimizer_state=state))
    assert state["param_groups"] == saved["param_groups"]
    k0 = next(iter(state["state"]))
    assert torch.equal(state["state"][k0]["exp_avg"], saved["state"][k0]["exp_avg"])
    assert any(abs(d) > 1e-7 for d in table["delta_grpo"])  # the update did something (max 0.013, far above float noise)


def test_cli_probes_on_a_saved_batch(tiny, tmp_path, capsys):
    """`tokencredit probe polarity|masking|coupling` end to end on the tiny model."""
    import pyarrow.parquet as pq

    from tokencredit.cli import main
    from tokencredit.batch import load_batch, save_batch

    _, tok = tiny
    batch = make_batch(tok)
    path = save_batch(batch, tmp_path / "b")
    back = load_batch(tmp_path / "b.json")
    assert torch.equal(back.response_ids, batch.response_ids) and torch.equal(back.advantage, batch.advantage)
    out = tmp_path / "probes"
    common = ["--model", "tiny-random", "--batch", str(path), "--out", str(out)]
    assert main(["probe", "polarity", *common, "--update", "sgd"]) == 0
    assert main(["probe", "masking", *common, "--no-progress", "--candidates", "4", "--full-candidates", "1"]) == 0
    assert main(["probe", "coupling", *common, "--pairs", "64"]) == 0
    for f in ("polarity_tokens.parquet", "polarity.jsonl", "polarity_summary.txt", "categories_polarity.json",
              "masking_candidates.parquet", "masking_tokens.parquet", "masking.jsonl", "masking_summary.txt",
              "coupling_pairs.parquet", "coupling_cells.jsonl", "coupling_summary.txt"):
        assert (out / f).is_file(), f
    assert pq.read_table(out / "polarity_tokens.parquet").num_rows == batch.num_tokens
    assert pq.read_table(out / "masking_candidates.parquet").num_rows == 4 * 4
    text = capsys.readouterr().out
    assert "Table 1" in text and "Fig. 1(d)" in text and "Fig. 2" in text
    # user errors: one line, exit 2
    assert main(["probe", "masking", "--out", str(out)]) == 2
    assert main(["probe", "masking", "--model", "tiny-random", "--batch", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("update", ["sgd", "adamw"])
def test_micro_rows_reaches_every_pass_and_changes_nothing(tiny, update, monkeypatch):
    """micro_rows cuts every forward and backward of the probe (both updates go
    through update.optimizer_step) and the results do not depend on it."""
    import tokencredit.probes.masking as mk
    import tokencredit.probes.polarity as pol

    model, tok = tiny
    batch = make_batch(tok)
    lr = 0.1 if update == "sgd" else 1e-3
    ref, s_ref = polarity_probe(model, batch, update=update, lr=lr, micro_rows=8)
    steps, fwd = [], []
    step, rows = pol.optimizer_step, pol.forward_rows

    def step_spy(model, opt, micros, spec, **kw):
        steps.append([len(u) for u in micros])
        return step(model, opt, micros, spec, **kw)

    def rows_spy(model, batch, **kw):
        fwd.append(kw["micro_rows"])
        return rows(model, batch, **kw)

    for mod in (pol, mk):
        monkeypatch.setattr(mod, "optimizer_step", step_spy)
        monkeypatch.setattr(mod, "forward_rows", rows_spy)
    got, s_got = polarity_probe(model, batch, update=update, lr=lr, micro_rows=1)
    assert len(steps) == 2 and all(set(n) == {1} for n in steps)  # one step per variant, 1-row micro-batches
    assert fwd and set(fwd) == {1}  # old log-probs, before and after: 1-row passes
    # float32 path difference: 1-row vs 8-row passes (other GEMM shapes and gradient sums); a delta is a difference
    # of float32 log-probs (|lp| ~ 5, ulp 4.8e-7), 1-2 ulps off each: 1e-6 (2 ulps) failed at 1.4e-6, 1e-5 as in the masking tests
    for col in ("old_logprob", "delta_grpo", "delta_positive_only"):
        assert (torch.tensor(got[col]) - torch.tensor(ref[col])).abs().max() < 1e-5, col
    assert s_got["rows_pos"] == s_ref["rows_pos"] and s_got["tokens"] == s_ref["tokens"]
