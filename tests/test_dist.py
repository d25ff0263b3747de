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
