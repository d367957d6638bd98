"""Data-parallel pretraining over processes started by ``torchrun`` (one process per GPU or CPU share).

One code path: :func:`setup` joins the process group described by torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when CUDA is there, gloo on CPUs.
Without torchrun (no ``WORLD_SIZE``, or 1) there is no process group and every helper here is the
identity, so the single-process run is the same code with a world of one.

How a global batch is split. Each step's batch is a pure function of the step (:mod:`training.ssl.data`);
process ``r`` of ``W`` takes the ``r``-th contiguous chunk of its items (:func:`shard`), so the processes
together see exactly the single-process batch, in the same order when their rows are gathered back
(:func:`gather_rows`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from training.errors import MammoInputError

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


DEVICES = ("auto", "cpu", "cuda")


def setup(device: str = "auto") -> Context:
    """Join torchrun's process group (once; later calls reuse it), or describe the single process.
    Each process trains on ``cuda:LOCAL_RANK`` with ``device`` "cuda", or "auto" when CUDA is
    available; on the CPU with "cpu" (gloo, even on a GPU machine) or "auto" without CUDA."""
    if device not in DEVICES:
        raise MammoInputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise MammoInputError("--device cuda: this torch sees no CUDA device; use --device cpu (or auto)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    where = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        # MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE are read from the environment ("env://").
        dist.init_process_group("nccl" if cuda else "gloo", device_id=where if cuda else None)
    return Context(rank(), world_size(), local_rank, where)


def cleanup() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process logs and writes (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce(tensor: Tensor, op: str) -> Tensor:
    """All-reduce ``tensor`` in place over every process (``op``: ``"sum"``, ``"max"`` or ``"min"``) and
    return it: the ``reduce`` hook of :class:`training.ssl.losses.MammoDINOLoss`."""
    if dist.is_initialized():
        dist.all_reduce(tensor, _OPS[op])
    return tensor


def gather_objects(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


class _GatherRows(torch.autograd.Function):
    """Concatenate every process's rows (the row counts may differ); the backward gives each process
    the sum over processes of the gradient of its own rows (each process computes the same loss on
    the gathered rows, and DDP then averages: the gradient of that loss, once)."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor) -> Tensor:
        counts = torch.tensor([rows.shape[0]], device=rows.device)
        all_counts = [torch.zeros_like(counts) for _ in range(world_size())]
        dist.all_gather(all_counts, counts)
        sizes = [int(c) for c in all_counts]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.start = sum(sizes[: rank()])
        ctx.count = rows.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, dist.ReduceOp.SUM)
        return grad[ctx.start: ctx.start + ctx.count]


def gather_rows(rows: Tensor) -> Tensor:
    """Every process's ``rows`` (N_r, ...) concatenated in rank order, differentiable; ``rows`` itself
    in a single process."""
    return _GatherRows.apply(rows) if dist.is_initialized() else rows


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Process ``rank``'s contiguous chunk of one global batch (chunk sizes differ by at most one)."""
    bounds = np.linspace(0, len(items), world_size + 1).round().astype(int)
    return list(items[bounds[rank]: bounds[rank + 1]])


class ShardedBatches(torch.utils.data.Sampler):
    """This process's share of each batch of ``batches`` (a batch sampler such as
    :class:`training.ssl.data.StepBatches`)."""

    def __init__(self, batches: torch.utils.data.Sampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[Any]]:
        for keys in self.batches:
            yield shard(keys, self.rank, self.world_size)
