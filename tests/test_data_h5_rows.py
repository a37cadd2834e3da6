"""Rows of a CSR X read straight from HDF5 equal anndata's, for scattered, adjacent, empty and merged rows."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from perturbdiff_core.data import h5_rows
from perturbdiff_core.data.anndata_io import CellMatrix
from perturbdiff_core.data.h5_rows import csr_rows, stored_csr


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[Path, sp.csr_matrix]:
    rng = np.random.default_rng(0)
    x = sp.random(300, 40, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    keep = np.ones(300, dtype=np.float32)
    keep[10:20] = 0  # a run of empty rows
    x = sp.csr_matrix(sp.diags(keep) @ x)
    x.eliminate_zeros()
    path = tmp_path_factory.mktemp("h5rows") / "x.h5ad"
    ad.AnnData(x).write_h5ad(path)
    return path, x


@pytest.mark.parametrize("gap", [0, h5_rows.MERGE_GAP, 10**9])  # no merging, the default, one read of everything
def test_csr_rows_equal_the_stored_rows(stored, monkeypatch, gap: int) -> None:
    path, x = stored
    monkeypatch.setattr(h5_rows, "MERGE_GAP", gap)
    rng = np.random.default_rng(1)
    selections = [
        np.array([0]), np.array([299]), np.arange(5, 25), np.array([11, 12, 13]), np.array([], dtype=np.int64),
        np.sort(rng.choice(300, 50, replace=False)), np.arange(300),
    ]
    with h5py.File(path, "r") as f:
        stored = stored_csr(f["X"])
        assert stored is not None and stored.n_cols == 40
        for rows in selections:
            got = csr_rows(stored, rows)
            assert isinstance(got, sp.csr_matrix) and got.shape == (len(rows), 40) and got.dtype == np.float32
            np.testing.assert_array_equal(got.toarray(), x[rows].toarray())


def test_a_backed_cell_matrix_reads_any_order_with_repeats(stored) -> None:
    path, x = stored
    rows = np.array([250, 3, 3, 11, 120, 0, 250])
    backed = CellMatrix(path=path)
    np.testing.assert_array_equal(backed.rows(rows).toarray(), x[rows].toarray())
    backed.close()


def test_a_dense_x_is_not_taken_for_csr(tmp_path: Path) -> None:
    path = tmp_path / "dense.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(path)
    with h5py.File(path, "r") as f:
        assert stored_csr(f["X"]) is None
