"""One optimizer step on 2 gloo ranks (FSDP2 and replicated + all-reduce) gives the
single-process gradient, for every aggregation mode and denominator: whole groups
per rank, one all-reduced normaliser (tokencredit/dist.py)."""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch

from tokencredit.update import LossSpec

COMBOS = list(itertools.product(("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"), ("all", "kept")))


def _batch_and_model():
    from tests.test_update import _batch
    from tokencredit.model.forward import forward_rows
    from tokencredit.model.tiny import build_tiny

    model = build_tiny(seed=5, hidden=32, layers=2, heads=4, tie=False)[0]
    b = _batch(B=8, T=7, seed=3)  # 4 groups of 2 rows, ragged lengths, token weights with zeros
    b.old_logprob = forward_rows(model, b, micro_rows=64, with_entropy=False)["logprob"] - 0.05  # ratio != 1
    return b, model


def _step(model, micros, spec, **kw):
    from tokencredit.update import optimizer_step

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights kept, gradients left in .grad
    optimizer_step(model, opt, micros, spec, grad_clip=1e9, **kw)


def _worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    from tokencredit.dist import average_gradients, full_gradients, init_distributed, rank_normaliser, rank_rows, shard_model
    from tokencredit.update import loss_normaliser, micro_batches

    info = init_distributed(timeout_s=120)
    grads = {}
    for agg, den in COMBOS:
        spec = LossSpec(agg=agg, denominator=den)
        b, model = _batch_and_model()
        shard_model(model, mode)
        micros = micro_batches(b.select(rank_rows(b.group_id, info.rank, info.world)), 3)  # this rank's whole groups
        n = rank_normaliser(loss_normaliser(micros, spec), info)
        _step(model, micros, spec, normaliser=n, grad_sync=average_gradients if mode == "ddp" else None)
        grads.update({f"{agg}|{den}|{k}": v.contiguous() for k, v in full_gradients(model).items()})
    if info.rank == 0:
        save_file(grads, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fsdp2", "ddp"])
def test_two_ranks_give_the_single_process_gradient(mode, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tokencredit.update import micro_batches

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.safetensors")
    mp.start_processes(_worker, args=(2, port, mode, out), nprocs=2, join=True, start_method="spawn")
    got = load_file(out)
    for agg, den in COMBOS:
        spec = LossSpec(agg=agg, denominator=den)
        b, model = _batch_and_model()
        _step(model, micro_batches(b, 8), spec)  # one process, the whole batch
        for name, p in model.named_parameters():
            g = got[f"{agg}|{den}|{name}"]
            rel = float((g - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12))
            assert rel <= 1e-6, (mode, agg, den, name, rel)


def test_rank_rows_keeps_groups_whole_and_refuses_idle_ranks():
    from tokencredit.dist import rank_rows

    gid = torch.tensor([7, 7, 3, 3, 9, 9, 1, 1])
    assert rank_rows(gid, 0, 2).tolist() == [0, 1, 4, 5] and rank_rows(gid, 1, 2).tolist() == [2, 3, 6, 7]
    assert sorted(rank_rows(gid, 0, 3).tolist() + rank_rows(gid, 1, 3).tolist() + rank_rows(gid, 2, 3).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="prompts_per_step"):
        rank_rows(gid, 0, 5)


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
           "token_weights.method=w_reinforce", "output.rank_logs=true",
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
