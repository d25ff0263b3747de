"""torch.distributed helpers for data-parallel training (torchrun; gloo on CPU,
NCCL on GPU). Work in progress for the torchrun/FSDP2 issue: the pieces that
make one optimizer step on N ranks equal to one process are here and tested
(tests/test_dist.py); the trainer does not call them yet.

The one rule: one global normaliser per optimizer step. Each rank computes the
count of its own rows (`update.loss_normaliser`), the counts are all-reduced,
and because DDP and FSDP2 *average* gradients over ranks, each rank divides its
loss by global / world:

    grad = (1/W) sum_r d/dtheta [ sum_{tokens of r} loss / (N_global / W) ]
         = d/dtheta [ sum_{all tokens} loss / N_global ]              (= one process)

so the result depends neither on how rows are cut into micro-batches nor on how
they are spread over ranks (the denominator bugs of verl #3741, #7321, #5625 are
per-micro-batch or per-rank normalisers).

Groups stay whole on a rank: `rank_rows` gives each rank whole groups, so
per-group computations (GRPO advantages, ResRL subspaces) stay local.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: single process

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes run files, trackers and progress bars."""
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT); a single process when WORLD_SIZE is unset or 1. Backend:
    nccl when CUDA is available, else gloo. `timeout_s` bounds every collective,
    so the other ranks exit when one dies."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend)


def all_reduce_sum(value: float, info: DistInfo) -> float:
    """Sum of `value` over ranks (the value itself on one process)."""
    if info.world <= 1:
        return float(value)
    device = torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def rank_normaliser(local_count: float, info: DistInfo) -> float:
    """What each rank passes as `optimizer_step(normaliser=)`: the all-reduced count
    over every rank's rows divided by the world size (DDP and FSDP2 average
    gradients; module docstring)."""
    return all_reduce_sum(local_count, info) / info.world


def rank_rows(group_id: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """[R] row indices of the whole groups rank `rank` holds: the distinct groups
    (in order of first appearance) dealt round-robin over the ranks.

    group_id: [B]. Raises when there are fewer groups than ranks (a rank would
    have nothing to train on, and its collectives would not match)."""
    order = list(dict.fromkeys(group_id.tolist()))  # groups in order of appearance
    if len(order) < world:
        raise ValueError(f"{len(order)} groups cannot be spread over {world} ranks: give every rank at least one "
                         "(rollout.prompts_per_step >= nproc_per_node)")
    mine = torch.tensor(order[rank::world], dtype=group_id.dtype)
    return torch.isin(group_id, mine).nonzero().squeeze(1)


def shard_model(model: torch.nn.Module, mode: str = "fsdp2") -> torch.nn.Module:
    """Data parallelism for `model` in place.

    "fsdp2": `fully_shard` on every decoder layer, on the decoder body
    (embeddings, final norm) and on the LM head - not on the root, because the
    chunked forward (model/forward.py) calls the body and the head directly, never
    `model.forward`. Parameters become DTensors; gradients are averaged over ranks
    in backward. Tied input/output embeddings are refused (one parameter in two
    sharded modules).
    "ddp": parameters stay replicated; pass `average_gradients` as
    `optimizer_step(grad_sync=)` (the chunked forward bypasses
    DistributedDataParallel's own forward, so its reducer cannot be used).
    """
    if mode == "ddp":
        for p in model.parameters():  # every rank starts from rank 0's weights
            dist.broadcast(p.data, src=0)
        return model
    if mode != "fsdp2":
        raise ValueError(f"data-parallel mode must be fsdp2 or ddp, got {mode!r}")
    from torch.distributed.fsdp import fully_shard

    from tokencredit.model.forward import _decoder

    head = model.get_output_embeddings()
    body = _decoder(model)
    if head is not None and head.weight is body.get_input_embeddings().weight:
        raise ValueError(f"{type(model).__name__} ties its input and output embeddings: FSDP2 here needs them untied "
                         "(or use ddp)")
    for layer in _decoder_layers(model):
        fully_shard(layer)
    fully_shard(body)
    fully_shard(head)
    return model


def average_gradients(params: Sequence[torch.nn.Parameter], info: DistInfo | None = None) -> None:
    """DDP's gradient step by hand: every gradient averaged over ranks (all-reduce / world)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: full gradient} on every rank (FSDP2 DTensor gradients gathered)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    from tokencredit.model.forward import _decoder

    layers = getattr(_decoder(model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to shard")
    return list(layers)
