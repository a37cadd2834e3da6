"""Multi-process (data-parallel) training under ``torchrun``: process group, ranks, device, batch shards.

``torchrun`` marks its workers with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in the environment;
:func:`process_group` then joins the job (NCCL when training on CUDA, gloo otherwise) and each rank
drives ``cuda:LOCAL_RANK``. Without ``WORLD_SIZE`` no group is started and every helper answers as
for one process (rank 0 of 1), so single-process training does exactly what it did before.

Sharding: the global batch of ``B`` sets of a step is cut into ``W`` equal consecutive parts, part
``r`` on rank ``r``; the loss is a mean over sets and DistributedDataParallel averages the ranks'
gradients, so every rank applies the gradient of the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..data.batch import SetBatch
from ..errors import ConfigError, PerturbDiffError

T = TypeVar("T")

#: Set by torchrun in each worker: the number of processes of the job.
WORLD_SIZE_ENV = "WORLD_SIZE"


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (``WORLD_SIZE`` is set)."""
    return WORLD_SIZE_ENV in os.environ


def active() -> bool:
    """Whether a process group is running (this process is one rank of a job)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the job (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and shows progress."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA training, ``gloo`` for anything else (CPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device) -> torch.device:
    """``device``, except that under torchrun CUDA becomes ``cuda:LOCAL_RANK``: one GPU per rank."""
    if not launched() or device.type != "cuda":
        return device
    if device.index is not None and world_size() > 1:
        raise ConfigError(
            f"train.device = {device} pins every rank to one GPU; under torchrun use train.device=auto or cuda "
            f"(rank r takes cuda:LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES."
        )
    return torch.device("cuda", local_rank())


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Within the block this process is a rank of the torchrun job (env:// rendezvous); a no-op outside torchrun.

    The group is destroyed on exit, normal or not; an already running group is left as it is.
    """
    if not launched() or active():
        yield
        return
    device_id = None
    if device.type == "cuda":
        device_id = torch.device("cuda", local_rank())
        torch.cuda.set_device(device_id)
    try:
        dist.init_process_group(backend_for(device), device_id=device_id)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"Cannot join the distributed job ({str(err).splitlines()[0]}); start multi-process training with "
            f"torchrun (see docs/distributed.md), or unset {WORLD_SIZE_ENV} to train in one process."
        ) from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_joined(what: str) -> None:
    """ConfigError when started by torchrun but outside a process group: each rank would train alone."""
    if launched() and not active():
        raise ConfigError(
            f"{what} was started by torchrun ({WORLD_SIZE_ENV}={os.environ[WORLD_SIZE_ENV]}) but only "
            f"'perturbdiff train' trains on several processes; run 'torchrun ... -m perturbdiff_core train', "
            f"then predict and evaluate in one process."
        )


def shard(batch_size: int) -> tuple[int, int]:
    """``(rank, world_size)``: this rank's part of a global batch of ``batch_size`` sets, checked to split evenly."""
    size = world_size()
    if batch_size % size:
        raise ConfigError(
            f"train.batch_size = {batch_size} is the global batch, split evenly over the {size} processes, "
            f"but it is not divisible by {size}; use a multiple of {size} (e.g. {size * max(1, round(batch_size / size))})."
        )
    return rank(), size


def main_first(make: Callable[[], T]) -> T | None:
    """``make()`` on rank 0 while the other ranks wait (they get ``None``); an error there is raised on every rank.

    Rank 0 tells the others whether ``make`` succeeded, so a failure never leaves them waiting.
    """
    if not active():
        return make()
    result, failure = None, None
    if is_main():
        try:
            result = make()
        except Exception as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = err
    message = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise PerturbDiffError(f"rank 0 failed while preparing the run, so rank {rank()} stops too ({message[0]}).")
    return result


def mean(values: Tensor) -> Tensor:
    """The element-wise mean of ``values`` over all ranks (``values`` itself in one process)."""
    if not active():
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def any_rank(flag: int, device: torch.device) -> int:
    """The largest ``flag`` over the ranks (non-zero when it is set on any rank): one decision every rank
    takes at the same step (e.g. stop on Ctrl-C or SIGTERM, with that signal's number)."""
    if not active():
        return int(flag)
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if active():
        dist.barrier()


class _ShardLoss(nn.Module):
    """``model.loss`` on this rank's part of the global batch, as a module DistributedDataParallel can wrap."""

    def __init__(self, model: nn.Module, part: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.part = model, part

    def forward(self, batch: SetBatch, generator: torch.Generator) -> dict[str, Tensor]:
        return self.model.loss(batch, generator, shard=self.part)


def data_parallel(model: nn.Module, device: torch.device, part: tuple[int, int]) -> DistributedDataParallel | None:
    """``model.loss`` on part ``part`` of the global batch as a module whose gradients are averaged over ranks.

    Called as ``wrapped(batch, generator)``; ``None`` in one process (use ``model.loss``). The
    model (denoiser and any trainable kernel) is wrapped in DistributedDataParallel, which
    broadcasts rank 0's weights once and all-reduces the gradients in backward; ``model`` stays
    the unwrapped module for the optimizer, the EMA and checkpoints. Every trainable parameter
    must take part in each training loss (the built-in denoisers do), as DistributedDataParallel
    runs without ``find_unused_parameters``.
    """
    if not active():
        return None
    return DistributedDataParallel(_ShardLoss(model, part), device_ids=[device.index] if device.type == "cuda" else None)
