"""Rows of a collection of ``.h5ad`` shards by global position, on the collection's genes.

Row ``i`` of the collection is row ``i - offset[k]`` of shard ``k``, the shards in collection
order. Each shard is a backed :class:`~perturbdiff_core.data.anndata_io.CellMatrix`: opened on
its first read in each process (every DataLoader worker and every torchrun rank opens only the
shards it reads), and at most :data:`MAX_OPEN_SHARDS` stay open per process, so memory does not
grow with the number or the size of the shards.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .anndata_io import SCAN_ROWS, CellMatrix

#: Shards kept open per process; the least recently read is closed beyond (each open file holds
#: HDF5's chunk caches, about 1 MiB per matrix array).
MAX_OPEN_SHARDS = 32

Block = np.ndarray | sp.spmatrix


def align_columns(block: Block, take: np.ndarray | None, n_genes: int) -> Block:
    """``block`` (a shard's rows over its own genes) on the collection's ``n_genes`` genes: collection
    gene ``j`` is shard column ``take[j]``, or zeros where ``take[j] < 0``; ``None`` means the same genes."""
    if take is None:
        return block
    present = take >= 0
    columns = take[present]
    if not sp.issparse(block):
        out = np.zeros((block.shape[0], n_genes), dtype=block.dtype)
        out[:, present] = np.asarray(block)[:, columns]
        return out
    sub = sp.csr_matrix(block)[:, columns]
    if present.all():
        return sub
    return sp.csr_matrix((sub.data, np.flatnonzero(present)[sub.indices], sub.indptr), shape=(block.shape[0], n_genes))


def _stack(blocks: list[Block]) -> Block:
    if not any(sp.issparse(b) for b in blocks):
        return np.concatenate(blocks)
    return sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr")


class ShardedMatrix:
    """Rows of a collection by position: each read from its shard, aligned on the collection's genes.

    Args:
        paths: the shards, in collection order.
        n_obs: cells of each shard.
        take: per shard, the shard column of each collection gene (``-1``: not measured there, read as
            0), or ``None`` when the shard has exactly the collection's genes in order.
        n_genes: genes of the collection.
        transform: applied to each shard's rows over the shard's own genes before they are aligned
            (normalisation must see every gene of a cell, not only the shared ones).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        n_obs: Sequence[int],
        take: Sequence[np.ndarray | None],
        n_genes: int,
        transform: Callable[[Block], Block] | None = None,
    ) -> None:
        self.shards = [CellMatrix(path=p) for p in paths]
        self.offsets = np.concatenate([[0], np.cumsum(n_obs, dtype=np.int64)])
        self.take, self.n_genes, self.transform = list(take), n_genes, transform
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_recent": OrderedDict()}  # open files do not travel to workers

    @property
    def shape(self) -> tuple[int, int]:
        """``(cells, genes)`` of the collection."""
        return int(self.offsets[-1]), self.n_genes

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        """The shard holding each of ``rows``."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def rows(self, rows: np.ndarray) -> Block:
        """The rows ``rows`` (any order, repeats allowed), CSR when a shard stores X sparse, else dense."""
        rows = np.asarray(rows, dtype=np.int64)
        which = self.shard_of(rows)
        order = np.argsort(which, kind="stable")
        counts = np.bincount(which, minlength=len(self.shards))
        blocks, start = [], 0
        for k in np.flatnonzero(counts):
            chosen = rows[order[start:start + counts[k]]] - self.offsets[k]
            start += counts[k]
            blocks.append(self._read(k, chosen))
        if not blocks:
            return np.zeros((0, self.n_genes), dtype=np.float32)
        return _stack(blocks)[np.argsort(order)]

    def _read(self, k: int, local: np.ndarray) -> Block:
        self._touch(k)
        block = self.shards[k].rows(local)
        if self.transform is not None:
            block = self.transform(block)
        return align_columns(block, self.take[k], self.n_genes)

    def _touch(self, k: int) -> None:
        """Mark shard ``k`` as read now; close the least recently read shards beyond :data:`MAX_OPEN_SHARDS`."""
        if self._pid != os.getpid():  # a forked worker inherits the parent's list, not its open files
            self._recent, self._pid = OrderedDict(), os.getpid()
        self._recent.pop(k, None)
        self._recent[k] = None
        while len(self._recent) > MAX_OPEN_SHARDS:
            oldest, _ = self._recent.popitem(last=False)
            self.shards[oldest].close()

    def blocks(self, size: int = SCAN_ROWS) -> Iterator[Block]:
        """The stored values (no transform) in consecutive blocks of at most ``size`` rows, shard by shard."""
        for k, shard in enumerate(self.shards):
            for block in shard.blocks(size):
                yield align_columns(block, self.take[k], self.n_genes)
            shard.close()

    def close(self) -> None:
        """Close every shard this process opened (they reopen on the next read)."""
        for shard in self.shards:
            shard.close()
        self._recent.clear()
