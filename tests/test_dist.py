"""One optimizer step on 2 gloo ranks (FSDP2 and replicated + all-reduce) gives the
single-process gradient, for every aggregation mode and denominator: whole groups
per rank, one all-reduced normaliser (tokencredit/dist.py).

How the gradients are compared (why the bounds are what they are), always as
||g_2ranks - g_1process|| / ||g_1process|| per tensor (relative to the tensor's norm, not
element by element, where a near-zero element makes any relative bound meaningless):
- float64 (the exactness check). The two sides cut the rows into different micro-batches
  (other padding lengths, other matmul shapes), so they sum the same terms in another
  order. In float32 that noise reached 1.2e-6 of a tensor's largest element, on the edge
  of a 1e-6 bound and different from CPU to CPU. A float64 model sums in float64 (unit
  roundoff 2^-53), but transformers' Llama RMSNorm computes in float32 whatever the
  model dtype, and its backward rounds the incoming gradient to float32: each of the
  K = 2 * layers + 1 = 5 norms on the path rounds with u32 = 2^-24, and float64
  summation-order differences flip some of those roundings. First-order, the two sides
  then differ by at most 2 * K * u32 = 6e-7 (F64_REL); measured <= 8.1e-8 (the worst
  of ~3,000 tensors), while a per-rank normaliser moves the gradient by > 5e-2
  (negative control below).
- bf16 compute (float32 master weights, model/precision.py). Each side's gradient carries
  bf16 rounding: R roundings along the forward and backward path, each of relative size
  u = 2^-8, add like a random walk, ~sqrt(R) * u of the gradient's norm. BF16_REL below
  is twice that for the tiny model; measured <= 1.4e-2 (FSDP2: its bf16 gathers also
  round the norm weights, which autocast keeps in float32) and <= 0.9e-2 against float64.
"""

from __future__ import annotations

import itertools
import math
import os
import socket

import pytest
import torch

from tokencredit.update import LossSpec

COMBOS = list(itertools.product(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"), ("all", "kept")))

U_F32 = 2.0**-24  # float32 unit roundoff
F64_ROUNDING_NORMS = 2 * 2 + 1  # float32 RMSNorms on the 2-layer tiny model's path (module docstring)
F64_REL = 2 * F64_ROUNDING_NORMS * U_F32  # = 6e-7: ||g2 - g1|| / ||g1|| of a float64 model
U_BF16 = 2.0**-8  # bf16 unit roundoff (8 significand bits)
# roundings along the path of the 2-layer tiny model: per layer q, k, v, o, q@k^T, attn@v, gate, up, down (9),
# plus the LM head; forward and backward each
BF16_ROUNDINGS = 2 * (9 * 2 + 1)
BF16_REL = 2 * math.sqrt(BF16_ROUNDINGS) * U_BF16  # = 0.048: ||g2 - g1|| / ||g1|| (module docstring)


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


def _batch_and_model(dtype: str):
    from tests.test_update import _batch
    from tokencredit.model.forward import forward_rows
    from tokencredit.model.precision import set_compute_dtype
    from tokencredit.model.tiny import build_tiny

    model = build_tiny(seed=5, hidden=32, layers=2, heads=4, tie=False)[0]
    model = model.double() if dtype == "float64" else set_compute_dtype(model, dtype)  # bf16: float32 masters
    b = _batch(B=8, T=7, seed=3)  # 4 groups of 2 rows, ragged lengths, token weights with zeros
    b.old_logprob = forward_rows(model, b, micro_rows=64, with_entropy=False)["logprob"] - 0.05  # ratio != 1
    return b, model


def _step(model, micros, spec, **kw):
    from tokencredit.update import optimizer_step

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights kept, gradients left in .grad
    optimizer_step(model, opt, micros, spec, grad_clip=1e9, **kw)


def _worker(rank: int, world: int, port: int, mode: str, dtype: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    from tokencredit.dist import average_gradients, full_gradients, init_distributed, rank_normaliser, rank_rows, shard_model
    from tokencredit.update import loss_normaliser, micro_batches

    info = init_distributed(timeout_s=120)
    grads = {}
    param_dtype = torch.bfloat16 if dtype == "bfloat16" and mode == "fsdp2" else None  # what the trainer passes
    for agg, den in COMBOS:
        spec = LossSpec(agg=agg, denominator=den)
        for norm in ("global", "per-rank"):  # per-rank: the bug one global normaliser prevents (negative control)
            b, model = _batch_and_model(dtype)
            shard_model(model, mode, param_dtype=param_dtype)
            micros = micro_batches(b.select(rank_rows(b.group_id, info.rank, info.world)), 3)  # this rank's whole groups
            local = loss_normaliser(micros, spec)
            n = rank_normaliser(local, info) if norm == "global" else local
            _step(model, micros, spec, normaliser=n, grad_sync=average_gradients if mode == "ddp" else None)
            grads.update({f"{norm}|{agg}|{den}|{k}": v.contiguous() for k, v in full_gradients(model).items()})
    if info.rank == 0:
        save_file(grads, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_two_ranks_give_the_single_process_gradient(mode, dtype, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tokencredit.update import micro_batches

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.safetensors")
    mp.start_processes(_worker, args=(2, port, mode, dtype, out), nprocs=2, join=True, start_method="spawn")
    got = load_file(out)
    torch.set_num_threads(1)
    worst_control = {}
    for agg, den in COMBOS:
        spec = LossSpec(agg=agg, denominator=den)
        b, model = _batch_and_model(dtype)
        _step(model, micro_batches(b, 8), spec)  # one process, the whole batch
        for name, p in model.named_parameters():
            g, bad = got[f"global|{agg}|{den}|{name}"], got[f"per-rank|{agg}|{den}|{name}"]
            assert g.dtype == p.grad.dtype == (torch.float64 if dtype == "float64" else torch.float32)  # fp32 masters' grads
            bound = F64_REL if dtype == "float64" else BF16_REL
            assert _norm_rel(g, p.grad) <= bound, (mode, agg, den, name, _norm_rel(g, p.grad))
            worst_control[(agg, den)] = max(worst_control.get((agg, den), 0.0), _norm_rel(bad, p.grad))
    # negative control: the ranks' token counts differ (ragged rows), so per-rank token normalisers weigh the
    # ranks' tokens differently and the gradient moves far beyond either bound; seq-mean modes count rows,
    # which this batch splits 4:4, so there a per-rank normaliser happens to equal the global one
    for den in ("all", "kept"):
        assert worst_control[("token-mean", den)] > 0.05 > BF16_REL, (den, worst_control)


def _gen_worker(rank: int, world: int, port: int, out: str) -> None:
    """Under FSDP2 each rank generates and forwards a different amount of work (rank r:
    r + 1 prompts, 3 + 5r new tokens, r + 2 rows): with the parameters gathered once
    (full_params) no decoding step is a collective, so nothing waits for the other rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    from tokencredit.dist import init_distributed, shard_model
    from tokencredit.model.forward import forward_rows
    from tokencredit.model.tiny import build_tiny
    from tokencredit.rollout.hf import generate_hf

    init_distributed(timeout_s=60)
    model, tok = build_tiny(seed=5, hidden=32, layers=2, heads=4, tie=True)
    shard_model(model, "fsdp2")
    b = generate_hf(model, tok, [f"Say {i}." for i in range(rank + 1)], n=2, temperature=0.0, top_p=1.0,
                    max_new_tokens=3 + 5 * rank, gen_batch_size=8, group_offset=0)
    lp = forward_rows(model, b.select(range(rank + 2)), micro_rows=1, with_entropy=False)["logprob"]
    local = model.model.layers[0].self_attn.q_proj.weight.to_local().shape[0]  # resharded after: half the rows
    save_file({"ids": b.response_ids.contiguous(), "lp": lp.contiguous(), "local": torch.tensor([local])}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_generation_and_no_grad_forwards_need_no_lockstep(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tokencredit.model.forward import forward_rows
    from tokencredit.model.tiny import build_tiny
    from tokencredit.rollout.hf import generate_hf

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gen")
    mp.start_processes(_gen_worker, args=(2, port, out), nprocs=2, join=True, start_method="spawn")
    model, tok = build_tiny(seed=5, hidden=32, layers=2, heads=4, tie=True)
    for rank in (0, 1):
        got = load_file(f"{out}.{rank}")
        b = generate_hf(model, tok, [f"Say {i}." for i in range(rank + 1)], n=2, temperature=0.0, top_p=1.0,
                        max_new_tokens=3 + 5 * rank, gen_batch_size=8, group_offset=0)
        assert torch.equal(got["ids"], b.response_ids)  # the unsharded model's greedy tokens
        lp = forward_rows(model, b.select(range(rank + 2)), micro_rows=1, with_entropy=False)["logprob"]
        torch.testing.assert_close(got["lp"], lp, atol=1e-5, rtol=1e-5)
        assert int(got["local"]) == model.model.layers[0].self_attn.q_proj.weight.shape[0] // 2


def test_rank_rows_keeps_groups_whole_and_balances_tokens():
    from tokencredit.dist import rank_rows

    gid = torch.tensor([7, 7, 3, 3, 9, 9, 1, 1])
    assert rank_rows(gid, 0, 2).tolist() == [0, 1, 4, 5] and rank_rows(gid, 1, 2).tolist() == [2, 3, 6, 7]
    assert sorted(rank_rows(gid, 0, 3).tolist() + rank_rows(gid, 1, 3).tolist() + rank_rows(gid, 2, 3).tolist()) == list(range(8))
    assert rank_rows(gid, 4, 5).tolist() == []  # more ranks than groups: an idle rank (zero-weight passes)
    # group tokens: 7 -> 10, 3 -> 2, 9 -> 6, 1 -> 5. Largest first to the lightest rank:
    # 7 -> r0 (10), 9 -> r1 (6), 1 -> r1 (11), 3 -> r0 (12)
    tok = torch.tensor([6, 4, 1, 1, 3, 3, 2, 3])
    assert rank_rows(gid, 0, 2, tokens=tok).tolist() == [0, 1, 2, 3]
    assert rank_rows(gid, 1, 2, tokens=tok).tolist() == [4, 5, 6, 7]


def _torchrun(tmp_path, nproc: int, name: str, steps: int, resume: bool = False, kill_at: int | None = None) -> list[dict]:
    """`torchrun --nproc_per_node nproc -m tokencredit train` on the tiny model; returns
    the run's metrics rows. kill_at: SIGKILL the whole process group as soon as
    checkpoint step_{kill_at} exists (a crash), and return []."""
    import json
    import signal
    import subprocess
    import sys
    import time

    data, rew = tmp_path / "digits.jsonl", tmp_path / "rew.py"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"Say the digit {d}.", "answer": str(d)}) + "\n" for d in range(10)))
        rew.write_text("import hashlib\n\ndef reward(responses, answers, prompts, **kw):\n"
                       "    return [float(int(hashlib.md5((p + r).encode()).hexdigest(), 16) % 3 == 0) for r, p in zip(responses, prompts)]\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # greedy, one response per prompt and W-REINFORCE (advantages without a group baseline), so 1 and 2
    # processes sample the same rows and still train; 6 prompts in mini-batches of 3 split 2:1 over 2 ranks,
    # so a per-rank normaliser would weigh the ranks' rows differently
    run = ["train", "model.name=tiny-random", f"data.train={data}", f"train.steps={steps}", "rollout.prompts_per_step=6",
           "rollout.n=1", "rollout.max_new_tokens=6", "rollout.temperature=0", "train.mini_batch_size=3", "train.micro_batch_size=2",
           "train.lr=1e-3", "eval.num_problems=0", "output.save_every=1", "output.progress=false", "output.save_final=false",
           "batching.reward_balance.tau=null", "batching.planner=query_preserved", "probes.flip.every=1", "model.threads=1",
           "token_weights.method=w_reinforce", "output.rank_logs=true", "train.data_parallel=fsdp2", "train.dist_timeout_s=120",
           f"output.root={tmp_path}", f"output.run_name={name}", f"reward.functions=[{rew}:reward]"]
    if resume:
        run = ["train", "--resume", str(tmp_path / name), f"train.steps={steps}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "-m", "tokencredit", *run]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        target = tmp_path / name / "checkpoints" / f"step_{kill_at}"
        t0 = time.time()
        while not target.is_dir() and proc.poll() is None and time.time() - t0 < 240:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_ranks_train_like_one_and_survive_a_kill(tmp_path):
    """The same run on 1 and 2 processes: the same rollouts and rewards, the same
    first-step gradient norm (one global normaliser), flip statistics over the whole
    update set; a 2-process run killed (SIGKILL) after its first checkpoint and resumed
    ends bit-identical to the uninterrupted one; every rank wrote its own log."""
    from safetensors.torch import load_file

    one = _torchrun(tmp_path, 1, "one", 1)
    two = _torchrun(tmp_path, 2, "two", 3)
    assert one[0]["reward_mean"] == two[0]["reward_mean"]
    assert "grad_norm" in one[0], "precondition: the first step trained"
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5)
    assert two[0]["grad_norm"] != pytest.approx(0.0)
    assert two[0]["flip_all_mean_abs"] == pytest.approx(one[0]["flip_all_mean_abs"], rel=1e-4)  # the whole update set, every rank
    assert sorted(p.name for p in (tmp_path / "two" / "logs").iterdir()) == ["rank_0.log", "rank_1.log"]
    _torchrun(tmp_path, 2, "killed", 3, kill_at=1)
    done = sorted(d.name for d in (tmp_path / "killed" / "checkpoints").iterdir() if d.name.startswith("step_"))
    assert "step_1" in done and "step_3" not in done, done  # killed mid-run, after its first checkpoint
    rows = _torchrun(tmp_path, 2, "killed", 3, resume=True)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the killed run's tail was dropped, no step twice
    a = load_file(str(tmp_path / "two" / "checkpoints" / "step_3" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step_3" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the trainer's update on 2 ranks = 1 process, for every planner x aggregation x token-weight scope
UPDATE_COMBOS = [(pl, agg, scope, "forking", 0.0)
                 for pl in ("query_preserved", "token_balanced", "random", "sign_split")
                 for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
                 for scope in ("mini-batch", "rollout-batch")]
UPDATE_COMBOS += [("query_preserved", "token-mean", "rollout-batch", "resrl", 0.0),  # subspaces per whole group
                  ("random", "token-mean", "mini-batch", "none", 0.1)]  # KL to a replicated reference model
# bf16: no forking. Its top-20% entropy cut is a threshold: under FSDP2 the bf16-gathered norm weights
# move entropies by ~u_bf16, tokens near the cut change sides, and the gradient by ~0.6 (measured); that is
# rounding deciding a discrete choice, not a normaliser error. Every planner x aggregation without it instead.
BF16_UPDATE_COMBOS = [(pl, agg, "mini-batch", "none", 0.0)
                      for pl in ("query_preserved", "token_balanced", "random", "sign_split")
                      for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")] + UPDATE_COMBOS[-2:]


def _update_combos(dtype: str) -> list[tuple]:
    return UPDATE_COMBOS if dtype == "float64" else BF16_UPDATE_COMBOS


def _fixed_batch():
    """16 rows: 4 groups of 4 with ragged responses, mixed-sign advantages, rewards by sign."""
    from tokencredit.batch import RolloutBatch

    g = torch.Generator().manual_seed(11)
    B, P, T = 16, 5, 9
    lens = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).float()  # [B, T]
    adv = torch.randn(B, generator=g)
    return RolloutBatch(
        prompt_ids=torch.randint(10, 90, (B // 4, P), generator=g).repeat_interleave(4, 0), prompt_mask=torch.ones(B, P, dtype=torch.long),
        response_ids=torch.randint(10, 90, (B, T), generator=g) * mask.long(), response_mask=mask,
        group_id=torch.arange(B) // 4 + 100, advantage=adv, reward=(adv > 0).float(),
    )


def _update_grads(tr, combo) -> list[dict[str, torch.Tensor]]:
    """Full gradients of every optimizer step of one `tr.update` on the fixed batch; the
    weights are not changed (the optimizer's step only records)."""
    import warnings

    from tokencredit.batching import PLANNERS
    from tokencredit.config import load_config
    from tokencredit.dist import full_gradients
    from tokencredit.update import LossSpec

    planner, agg, scope, method, kl = combo
    tr.cfg = load_config(None, [f"{k}={v}" for k, v in {
        **tr.base_overrides, "batching.planner": planner, "algo.loss_agg": agg, "token_weights.scope": scope,
        "token_weights.method": method, "token_weights.resrl_rank": 2, "algo.kl_coef": kl}.items()])
    tr.planner, tr.loss_spec = PLANNERS.get(planner), LossSpec.from_config(tr.cfg)
    if kl > 0 and tr.ref_model is None:
        from tokencredit.model import load_model
        from tokencredit.model.precision import set_compute_dtype
        ref = load_model("tiny-random")[0].to(next(tr.model.parameters()).dtype).requires_grad_(False)
        tr.ref_model = set_compute_dtype(ref, tr.cfg.model.dtype)
    got: list[dict[str, torch.Tensor]] = []
    tr.optimizer.step = lambda *a, **k: got.append(full_gradients(tr.model))  # a collective under FSDP2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler notices the replaced step
        tr.update(_fixed_batch())
    return got


def _update_overrides(tmp: str) -> dict:
    import json
    from pathlib import Path

    data = Path(tmp) / "digits.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say the digit {d}.", "answer": str(d)}) + "\n" for d in range(10)))
    return {"model.name": "tiny-random", "data.train": str(data), "rollout.prompts_per_step": 4, "rollout.n": 4,
            "train.mini_batch_size": 2, "train.micro_batch_size": 3, "eval.num_problems": 0, "output.progress": "false",
            "batching.reward_balance.tau": "null", "probes.flip.every": 0, "model.threads": 1, "output.root": tmp,
            "reward.functions": "[math_verify]", "train.dist_timeout_s": 120}  # a deadlock fails in 2 min, not 10


def _update_worker(rank: int, world: int, port: int, mode: str, dtype: str, tmp: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from safetensors.torch import save_file

    from tokencredit.config import load_config
    from tokencredit.trainer import Trainer

    over = _update_overrides(tmp) | {"train.data_parallel": mode, "output.run_name": f"dp{mode}", "model.dtype": dtype}
    tr = Trainer(load_config(None, [f"{k}={v}" for k, v in over.items()]))
    tr.base_overrides = over
    flat = {}
    for i, combo in enumerate(_update_combos(dtype)):
        for s, grads in enumerate(_update_grads(tr, combo)):
            flat.update({f"{i}|{s}|{k}": v.contiguous() for k, v in grads.items()})
    if rank == 0:
        save_file(flat, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_trainer_update_on_two_ranks_equals_one_process(mode, dtype, tmp_path):
    """Every optimizer step of Trainer.update on a fixed batch: the 2-rank gradient equals the
    single-process one for every planner x loss aggregation x token-weight scope (mini-batch,
    rollout-batch), ResRL and a KL term; each step trains on both ranks' groups, with uneven
    micro-batch counts padded by zero-weight passes under FSDP2. float64: relative to the
    tensor's largest element <= F64_REL; bf16 compute (the trainer's mixed precision:
    float32 masters, autocast / FSDP2 MixedPrecisionPolicy): relative norm <= BF16_REL
    (module docstring for both)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tokencredit.config import load_config
    from tokencredit.trainer import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.safetensors")
    mp.start_processes(_update_worker, args=(2, port, mode, dtype, str(tmp_path), out), nprocs=2, join=True, start_method="spawn")
    got = load_file(out)
    torch.set_num_threads(1)
    over = _update_overrides(str(tmp_path)) | {"output.run_name": "one", "model.dtype": dtype}
    tr = Trainer(load_config(None, [f"{k}={v}" for k, v in over.items()]))
    tr.base_overrides = over
    for i, combo in enumerate(_update_combos(dtype)):
        steps = _update_grads(tr, combo)
        assert len(steps) >= 2 and not any(k.startswith(f"{i}|{len(steps)}|") for k in got), combo  # as many steps
        for s, grads in enumerate(steps):
            for name, g1 in grads.items():
                g2 = got[f"{i}|{s}|{name}"]
                assert g1.dtype == g2.dtype == (torch.float64 if dtype == "float64" else torch.float32)  # master grads
                bound = F64_REL if dtype == "float64" else BF16_REL
                assert _norm_rel(g2, g1) <= bound, (mode, combo, s, name, _norm_rel(g2, g1))
