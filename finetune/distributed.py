"""Distributed runs and global batching: :class:`DistInfo` (this process's rank, world size and device),
joining and leaving the torchrun process group (gloo on CPU, nccl on GPU, the PyTorch DDP tutorial's setup), the
collective helpers the loop needs, and how one epoch is cut into global batches and each global batch into this
rank's micro-batches. Every rank computes the same seeded batches from ``(seed, epoch)``, so one process and N
processes (and a resumed run) see the same rows in the same optimizer steps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from finetune.data import shuffled_order


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a run: rank 0 of 1 unless started by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when started by ``torchrun`` (nccl on GPU, gloo on CPU); otherwise a single process."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        dev = torch.device(device if device not in ("auto",) else ("cuda" if use_cuda else "cpu"))
        return DistInfo(device=dev)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown_distributed(info: DistInfo) -> None:
    """Leave the process group joined by :func:`setup_distributed` (nothing to do in a single process)."""
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``t`` in place over all ranks; a no-op in a single process."""
    if not info.distributed:
        return t
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    """Wait for every rank (e.g. while rank 0 writes a checkpoint); a no-op in a single process."""
    if info.distributed:
        import torch.distributed as dist

        dist.barrier()


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Global batches of one epoch: a seeded permutation (the book's order in epoch 0) cut into ``batch_size`` rows,
    drop_last. Every rank computes the same batches; resuming recomputes them from (seed, epoch)."""
    if shuffle:
        order = shuffled_order(n, seed, epoch)
    else:
        order = list(range(n))
    return [order[k * batch_size:(k + 1) * batch_size] for k in range(n // batch_size)]


def local_micro_batches(global_batch: Sequence[int], info: DistInfo, grad_accum: int) -> list[list[int]]:
    """This rank's contiguous slice of a global batch, split into ``grad_accum`` micro-batches."""
    per_rank = len(global_batch) // info.world_size
    mine = list(global_batch[info.rank * per_rank:(info.rank + 1) * per_rank])
    micro = per_rank // grad_accum
    return [mine[j * micro:(j + 1) * micro] for j in range(grad_accum)]


def setup_logging(info: DistInfo) -> None:
    """INFO logs on rank 0, warnings only on the other ranks (so a DDP run logs each event once)."""
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
