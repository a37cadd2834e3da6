"""Rows of a CSR matrix stored in HDF5 (an ``.h5ad`` file's sparse X), read without loading its indptr.

anndata's backed reader keeps the whole ``indptr`` of a file in memory (8 bytes per cell, in
every process, for every file) and, under scipy 1.17, looks up scipy's version on every read
(about 5 ms, measured here: more than reading 256 rows). Reading random rows from many large
shards pays both, so this reader takes ``indptr`` only at the requested rows (one fancy read) and
reads each run of rows whose values lie close together with one slice of ``data`` and one of
``indices``. It returns what anndata returns for the same rows (a ``scipy.sparse.csr_matrix``).
"""

from __future__ import annotations

import h5py
import numpy as np
import scipy.sparse as sp

#: Rows whose stored values lie at most this many entries apart are read with one slice: an
#: h5py call costs about as much as reading this many more values from the page cache.
MERGE_GAP = 8192


def is_csr_group(node: h5py.Group | h5py.Dataset) -> bool:
    """Whether ``node`` is a CSR matrix as anndata writes it (``encoding-type: csr_matrix``, or the legacy ``h5sparse_format``)."""
    if not isinstance(node, h5py.Group):
        return False
    attrs = node.attrs
    kind = attrs.get("encoding-type", attrs.get("h5sparse_format"))
    kind = kind.decode() if isinstance(kind, bytes) else kind
    return kind in ("csr_matrix", "csr") and {"data", "indices", "indptr"} <= set(node)


def csr_rows(group: h5py.Group, rows: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Rows ``rows`` (sorted, unique positions) of the CSR matrix in ``group``, as a CSR of ``n_cols`` columns."""
    rows = np.asarray(rows, dtype=np.int64)
    data_set, index_set = group["data"], group["indices"]
    if not len(rows):
        return sp.csr_matrix((0, n_cols), dtype=data_set.dtype)
    bounds = np.unique(np.concatenate([rows, rows + 1]))
    pointers = group["indptr"][bounds].astype(np.int64)  # h5py reads increasing positions only
    start = pointers[np.searchsorted(bounds, rows)]
    stop = pointers[np.searchsorted(bounds, rows + 1)]
    lengths = stop - start
    breaks = np.flatnonzero(start[1:] - stop[:-1] > MERGE_GAP) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(rows)]]) - 1
    data, indices = [], []
    for a, b in zip(start[first], stop[last]):
        data.append(data_set[a:b])
        indices.append(index_set[a:b])
    # each row's values inside the concatenated runs: its run's offset plus its distance from the run's start
    run_offset = np.concatenate([[0], np.cumsum(stop[last] - start[first])[:-1]])
    run = np.repeat(np.arange(len(first)), last - first + 1)
    begin = run_offset[run] + start - start[first][run]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    take = np.repeat(begin - indptr[:-1], lengths) + np.arange(indptr[-1])
    return sp.csr_matrix(
        (np.concatenate(data)[take], np.concatenate(indices)[take], indptr), shape=(len(rows), n_cols)
    )
