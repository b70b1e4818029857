"""Data-parallel training under ``torchrun``: process group, sharded batches, gradient sync.

The training driver stays one loop. When the environment says there are several processes
(``WORLD_SIZE > 1``, as set by ``torchrun --nproc-per-node N``), the driver wraps the model in
``DistributedDataParallel`` (gloo on CPU, nccl on GPU) and feeds each process its share of
every global batch. The recipe's ``batch_size`` stays the global batch: the batches are the
ones a single process would draw with the same seed, split into ``N`` contiguous shards, so
the gradient of the averaged shard losses equals the single-process gradient up to float
rounding, and a checkpoint written by ``N`` processes resumes on any other number.
Only rank 0 writes files; BatchNorm statistics are computed per process (as in plain DDP).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchslim.errors import ConfigError

__all__ = [
    "ShardedBatches",
    "all_mean",
    "barrier",
    "broadcast",
    "init_from_env",
    "is_main",
    "shutdown",
    "sync_grads",
    "wrap",
    "world",
]

logger = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a plain single-process run): the process that writes files."""
    return world()[0] == 0


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group that ``torchrun`` describes in the environment, once.

    Returns:
        True when this process is one of several.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("joined a %s process group: rank %d of %d", backend, dist.get_rank(), size)
    return True


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over processes (``value`` itself in a single process)."""
    if world()[1] == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / world()[1]


def sync_grads(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of parameters that DDP does not own (e.g. a method's projections)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world()[1] == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world()[1]
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast(params: Sequence[nn.Parameter]) -> None:
    """Give every process rank 0's values of parameters that DDP does not own."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def wrap(model: nn.Module) -> nn.Module:
    """``model`` inside DistributedDataParallel when there are several processes, else itself."""
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


class ShardedBatches(torch.utils.data.Sampler[list[int]]):
    """This process's contiguous share of every shuffled global batch.

    Args:
        size: Number of samples in the data set.
        batch_size: The global batch (the recipe's ``batch_size``).
        generator: Seeded generator: the same permutation on every process and in a
            single-process run with the same seed.
        rank: This process.
        world_size: Number of processes; at most ``batch_size``.
    """

    def __init__(self, size: int, batch_size: int, generator: torch.Generator, rank: int,
                 world_size: int) -> None:
        if world_size > batch_size:
            raise ConfigError(f"train.batch_size is the global batch: expected at least one sample per "
                              f"process ({world_size} processes); found batch_size {batch_size}")
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (rest >= self.world_size)  # a tail smaller than the world is dropped

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator)
        for start in range(0, self.size, self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.world_size:
                return
            yield torch.tensor_split(batch, self.world_size)[self.rank].tolist()


def shard_weight(local: int, world_size: int, total: int) -> float:
    """Factor on a shard's mean loss so DDP's gradient average equals the global mean's gradient."""
    return local * world_size / total


def global_batch_size(local: int) -> Any:
    """Sum of the shard sizes over processes (``local`` in a single process)."""
    if world()[1] == 1:
        return local
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())
