"""A torch DataLoader of condition sets with workers and deterministic seeding.

Sets depend only on ``(seed, epoch, index)`` (see :class:`~perturbdiff_core.data.sets.ConditionSets`);
the sampler below runs in the main process and hands each worker ``(epoch, index)`` keys, so
the batches are the same for any ``num_workers`` and persistent workers still see new epochs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Sampler

from .dataset import Condition, PerturbationData
from .pairing import ControlPairing
from .sets import ConditionSets, collate_sets


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` keys: each pass is a new epoch (new order, new sets) unless ``fixed``.

    Args:
        n: number of items.
        seed: seed of the order of each epoch (``default_rng([seed, epoch])``).
        shuffle: permute the items each epoch.
        fixed: every pass is epoch 0, so evaluation sees the same sets each time.
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, fixed: bool = False) -> None:
        self.n, self.seed, self.shuffle, self.fixed = n, seed, shuffle, fixed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (e.g. when resuming training)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = 0 if self.fixed else self.epoch
        if not self.fixed:
            self.epoch += 1
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        return iter([(epoch, int(i)) for i in order])

    def __len__(self) -> int:
        return self.n


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a worker from torch's per-worker seed (for any other randomness),
    and run its BLAS on one thread, as torch does for its own ops in workers (workers are the parallelism)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    threadpool_limits(1, user_api="blas")


def make_loader(
    data: PerturbationData,
    conditions: Sequence[str | Condition],
    *,
    train: bool = True,
    batch_size: int = 8,
    set_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    samples_per_condition: int = 1,
    pairing: str | ControlPairing | None = None,
    drop_last: bool = False,
    shifts: Mapping[str, np.ndarray] | None = None,
) -> DataLoader:
    """A DataLoader of :class:`~perturbdiff_core.data.batch.SetBatch` over ``conditions``.

    ``train=True``: shuffled, new sets each epoch, controls paired by ``data.config.control_pairing``.
    ``train=False`` (validation, test): fixed order and the same sets every pass, random controls
    (a pairing that looks at the target is not available at prediction time). ``shifts``: the
    anchor shift of each condition (see :class:`ConditionSets`).
    """
    dataset = ConditionSets(
        data,
        conditions,
        set_size=set_size,
        seed=seed,
        pairing=pairing if pairing is not None else (None if train else "random"),
        samples_per_condition=samples_per_condition,
        shifts=shifts,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed=seed, shuffle=train, fixed=not train),
        num_workers=num_workers,
        collate_fn=collate_sets,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        multiprocessing_context=data.worker_start_method if num_workers > 0 else None,
    )
