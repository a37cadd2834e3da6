"""Reading AnnData (whole, or row by row from a backed file) and the checks every command runs
first, each with one clear error naming the problem and the fix."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import DataError

#: Environment variable that overrides the folder holding the shared example data.
DATA_ENV = "PERTURBDIFF_DATA"


def shared_data_dir() -> Path:
    """The folder of the bundled real data: ``$PERTURBDIFF_DATA`` or ``../shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def read_anndata(source: str | os.PathLike[str] | ad.AnnData, *, backed: bool = False) -> ad.AnnData:
    """An AnnData from a path to ``.h5ad`` (optionally backed, not loaded) or an AnnData itself."""
    if isinstance(source, ad.AnnData):
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"No such file: {path}. Give the path to an .h5ad file.")
    try:
        with warnings.catch_warnings():  # legacy files (old uns layout) warn on every read
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", ad.OldFormatWarning)
            return ad.read_h5ad(path, backed="r" if backed else None)
    except OSError as err:
        raise DataError(f"Cannot read {path} as AnnData (.h5ad): {err}. Check the file is a valid .h5ad.") from None


def _obs(adata: ad.AnnData | pd.DataFrame) -> pd.DataFrame:
    return adata if isinstance(adata, pd.DataFrame) else adata.obs


def require_obs_key(adata: ad.AnnData | pd.DataFrame, key: str, what: str = "key") -> None:
    """Fail unless ``adata.obs`` (or an obs frame) has column ``key``; ``what`` names its role."""
    obs = _obs(adata)
    if key not in obs.columns:
        cols = ", ".join(map(str, obs.columns)) or "none"
        raise DataError(f"obs has no column {key!r} (the {what}); the columns are: {cols}. Pass the right column name.")


def require_label(adata: ad.AnnData | pd.DataFrame, key: str, label: str) -> None:
    """Fail unless ``label`` occurs in ``adata.obs[key]`` (or an obs frame); list the values found."""
    values = _obs(adata)[key].astype(str)
    if label not in set(values):
        found = sorted(values.unique())
        shown = ", ".join(found[:20]) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")
        raise DataError(f"Control label {label!r} not found in obs[{key!r}]; values found: {shown}.")


def _non_finite(where: str) -> DataError:
    return DataError(f"{where} contains NaN or Inf values; remove or impute them first.")


def require_finite(matrix: np.ndarray | sp.spmatrix, where: str = "X") -> None:
    """Fail if ``matrix`` (dense or sparse) holds NaN or Inf."""
    data = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if not np.isfinite(data).all():
        raise _non_finite(where)


#: Rows per block when a whole matrix is scanned (bounds memory in backed mode).
SCAN_ROWS = 4096

#: An integer-valued matrix with a maximum above this holds raw counts, not log1p values
#: (log1p of normalised counts stays below about 12).
COUNTS_MIN_MAX = 20.0

#: Total counts per cell after normalisation (scanpy ``normalize_total(target_sum=...)``).
#: A fixed target makes normalisation a per-cell operation, identical in memory and backed.
TARGET_SUM = 1e4


def read_annotations(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``obs`` and ``var`` of an ``.h5ad`` file without reading X, obsm, layers or uns."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"No such file: {path}. Give the path to an .h5ad file.")
    try:
        with h5py.File(path, "r") as f:
            if "encoding-type" in f["obs"].attrs and "encoding-type" in f["var"].attrs:
                return ad.io.read_elem(f["obs"]), ad.io.read_elem(f["var"])
    except (OSError, KeyError) as err:
        raise DataError(f"Cannot read {path} as AnnData (.h5ad): {err}. Check the file is a valid .h5ad.") from None
    legacy = read_anndata(path, backed=True)  # old layout: only anndata's reader understands it
    obs, var = legacy.obs.copy(), legacy.var.copy()
    legacy.file.close()
    return obs, var


class CellMatrix:
    """Rows of an AnnData's X by position, from memory or from an ``.h5ad`` file on demand (backed).

    A backed matrix opens its file lazily in each process (DataLoader workers included) and
    reads only the requested rows, so memory does not grow with the number of cells.
    """

    def __init__(self, matrix: Any = None, path: str | os.PathLike[str] | None = None) -> None:
        self._matrix = matrix
        self.path = None if path is None else Path(path)
        self._opened: tuple[int, Any, Any] | None = None

    @classmethod
    def of(cls, adata: ad.AnnData) -> CellMatrix:
        """The X of ``adata``; a backed AnnData is read from its file."""
        if adata.isbacked:
            return cls(path=adata.filename)
        if adata.X is None:
            raise DataError("The AnnData has no X matrix; put the log-normalised expression in X.")
        return cls(matrix=adata.X)

    def _x(self) -> Any:
        if self.path is None:
            return self._matrix
        if self._opened is None or self._opened[0] != os.getpid():
            handle = h5py.File(self.path, "r")
            x = handle["X"]
            self._opened = (os.getpid(), handle, ad.io.sparse_dataset(x) if isinstance(x, h5py.Group) else x)
        return self._opened[2]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}  # an open file does not travel to workers

    @property
    def shape(self) -> tuple[int, int]:
        """``(cells, genes)``."""
        return tuple(self._x().shape)

    def rows(self, rows: np.ndarray) -> np.ndarray | sp.csr_matrix:
        """The rows ``rows`` (any order, repeats allowed), dense or CSR as stored."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.path is None:
            return self._matrix[rows]
        unique, inverse = np.unique(rows, return_inverse=True)  # h5py needs sorted unique indices
        block = self._x()[unique]
        return block[inverse]

    def blocks(self, size: int = SCAN_ROWS) -> Iterator[np.ndarray | sp.spmatrix]:
        """Consecutive row blocks of at most ``size`` rows covering the whole matrix."""
        n = self.shape[0]
        x = self._x()
        for start in range(0, n, size):
            yield x[start : min(start + size, n)]

    def close(self) -> None:
        """Close the file of a backed matrix in this process (it reopens on the next read)."""
        if self._opened is not None and self._opened[0] == os.getpid():
            self._opened[1].close()
        self._opened = None


@dataclass(frozen=True)
class ValueSummary:
    """What a scan of X found: finiteness, range and whether every value is an integer."""

    finite: bool
    minimum: float
    maximum: float
    integer: bool


def summarize_values(matrix: CellMatrix) -> ValueSummary:
    """Scan X block by block (bounded memory): NaN/Inf, min, max, integer-valued."""
    finite, integer, lo, hi = True, True, np.inf, -np.inf
    for block in matrix.blocks():
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        implicit_zero = sp.issparse(block) and block.nnz < block.shape[0] * block.shape[1]
        ok = np.isfinite(values)
        finite &= bool(ok.all())
        values = values[ok]
        if values.size:
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            integer &= bool(np.all(values == np.round(values)))
        if implicit_zero:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
    return ValueSummary(finite, float(lo), float(hi), integer)


def require_valid_values(summary: ValueSummary, *, normalize: bool, where: str = "X") -> None:
    """NaN/Inf, negative values and raw counts (unless ``normalize``) each get one clear error."""
    if not summary.finite:
        raise _non_finite(where)
    if summary.minimum < 0:
        raise DataError(
            f"{where} has negative values (minimum {summary.minimum:.3g}); perturbdiff expects "
            f"non-negative log-normalised expression, not scaled or centred data. Use the values "
            f"before sc.pp.scale (e.g. a layer or adata.raw copied into X)."
        )
    counts = summary.integer and summary.maximum > COUNTS_MIN_MAX
    if counts and not normalize:
        raise DataError(
            f"{where} looks like raw counts (integer values up to {summary.maximum:.0f}), but "
            f"log-normalised values are expected. Set data.normalize: true to apply "
            f"normalize_total (target {TARGET_SUM:g}) and log1p, or give log-normalised data."
        )
    if normalize and not counts:
        raise DataError(
            f"data.normalize is true but {where} does not hold raw counts (values are not integers "
            f"with a maximum above {COUNTS_MIN_MAX:g}; maximum {summary.maximum:.3g}); it looks "
            f"log-normalised already. Set data.normalize: false."
        )


def normalize_rows(block: np.ndarray | sp.spmatrix) -> np.ndarray | sp.spmatrix:
    """scanpy ``normalize_total(target_sum=TARGET_SUM)`` then ``log1p`` on a block of count rows."""
    import scanpy as sc  # slow import, only needed for raw counts

    cells = ad.AnnData(block.astype(np.float64) if sp.issparse(block) else np.asarray(block, dtype=np.float64))
    sc.pp.normalize_total(cells, target_sum=TARGET_SUM)
    sc.pp.log1p(cells)
    return cells.X


def require_unique_genes(genes: pd.Index) -> None:
    """Fail when gene names (var_names) repeat: genes are aligned by name."""
    if not genes.is_unique:
        dup = genes[genes.duplicated()].unique().tolist()
        raise DataError(
            f"Gene names (var_names) are not unique: {len(dup)} repeated, e.g. "
            f"{', '.join(map(str, dup[:5]))}. Call adata.var_names_make_unique() or set var_names "
            f"to a unique column (e.g. gene IDs)."
        )


def require_complete(obs: pd.DataFrame, key: str, what: str = "key") -> None:
    """Fail when some cells have no value (NaN) in ``obs[key]``."""
    missing = int(obs[key].isna().sum())
    if missing:
        raise DataError(
            f"obs[{key!r}] (the {what}) has {missing} cells without a value; fill them "
            f"(e.g. with 'unknown') or drop those cells."
        )
