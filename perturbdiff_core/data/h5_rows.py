"""Rows of a CSR matrix stored in HDF5 (an ``.h5ad`` file's sparse X), read without loading its indptr.

anndata's backed reader keeps the whole ``indptr`` of a file in memory (8 bytes per cell, in
every process, for every file) and, under scipy 1.17, looks up scipy's version on every read
(about 5 ms, measured here: more than reading 256 rows). Reading random rows from many large
shards pays both, so this reader takes ``indptr`` only at the requested rows (one fancy read) and
reads each run of rows whose values lie close together with one slice of ``data`` and one of
``indices``. It returns what anndata returns for the same rows (a ``scipy.sparse.csr_matrix``).
"""

from __future__ import annotations

from typing import NamedTuple

import h5py
import numpy as np
import scipy.sparse as sp

#: Rows whose stored values lie at most this many entries apart are read with one slice: an
#: h5py call costs about as much as reading this many more values from the page cache.
MERGE_GAP = 8192


class StoredCSR(NamedTuple):
    """The three arrays of a CSR matrix in HDF5 and its number of columns (looked up once: each lookup
    of a group member costs more than reading a row)."""

    data: h5py.Dataset
    indices: h5py.Dataset
    indptr: h5py.Dataset
    n_cols: int


def stored_csr(node: h5py.Group | h5py.Dataset) -> StoredCSR | None:
    """``node`` as a :class:`StoredCSR` when it is a CSR matrix as anndata writes it (``encoding-type:
    csr_matrix``, or the legacy ``h5sparse_format: csr``), else None."""
    if not isinstance(node, h5py.Group):
        return None
    attrs = node.attrs
    kind = attrs.get("encoding-type", attrs.get("h5sparse_format"))
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind not in ("csr_matrix", "csr") or not {"data", "indices", "indptr"} <= set(node):
        return None
    shape = attrs.get("shape", attrs.get("h5sparse_shape"))
    return StoredCSR(node["data"], node["indices"], node["indptr"], int(shape[1]))


def csr_rows(stored: StoredCSR, rows: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` (sorted, unique positions) of a stored CSR matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return sp.csr_matrix((0, stored.n_cols), dtype=stored.data.dtype)
    bounds = np.unique(np.concatenate([rows, rows + 1]))
    pointers = stored.indptr[bounds].astype(np.int64)  # h5py reads increasing positions only
    start = pointers[np.searchsorted(bounds, rows)]
    stop = pointers[np.searchsorted(bounds, rows + 1)]
    lengths = stop - start
    breaks = np.flatnonzero(start[1:] - stop[:-1] > MERGE_GAP) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(rows)]]) - 1
    data, indices = [], []
    for a, b in zip(start[first].tolist(), stop[last].tolist()):
        data.append(stored.data[a:b])
        indices.append(stored.indices[a:b])
    # each row's values inside the concatenated runs: its run's offset plus its distance from the run's start
    run_offset = np.concatenate([[0], np.cumsum(stop[last] - start[first])[:-1]])
    run = np.repeat(np.arange(len(first)), last - first + 1)
    begin = run_offset[run] + start - start[first][run]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    take = np.repeat(begin - indptr[:-1], lengths) + np.arange(indptr[-1])
    return sp.csr_matrix(
        (np.concatenate(data)[take], np.concatenate(indices)[take], indptr), shape=(len(rows), stored.n_cols)
    )
