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

from ..errors import DataError, first_line
from .h5_rows import StoredCSR, csr_rows, stored_csr

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
    path = _existing_file(source)
    try:
        with warnings.catch_warnings():  # legacy files (old uns layout) warn on every read
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", ad.OldFormatWarning)
            return ad.read_h5ad(path, backed="r" if backed else None)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file fails anywhere inside h5py and anndata
        raise unreadable(path, err) from None


def _existing_file(source: str | os.PathLike[str]) -> Path:
    """``source`` as a path, DataError when it is missing or a folder."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"No such file: {path}. Give the path to an .h5ad file.")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an .h5ad file; give the path of the file.")
    return path


def unreadable(path: Path, err: BaseException) -> DataError:
    """The error for a file h5py or anndata failed on: HDF5 without AnnData's layout, or a damaged file."""
    if not _is_anndata(path):
        what = "an HDF5 file without AnnData's obs and var" if h5py.is_hdf5(path) else "not an HDF5 file at all"
        return DataError(
            f"{path} is not an AnnData file (.h5ad): it is {what}. Write the data with anndata "
            f"(adata.write_h5ad) and pass that file."
        )
    return DataError(
        f"Cannot read {path} as AnnData (.h5ad) ({type(err).__name__}: {first_line(err)}); the file is damaged or "
        f"truncated. Copy or write it again."
    )


def _is_anndata(path: Path) -> bool:
    """Whether ``path`` is HDF5 with AnnData's top-level ``obs`` and ``var`` (damaged inside or not)."""
    try:
        with h5py.File(path, "r") as f:
            return "obs" in f and "var" in f
    except Exception:  # noqa: BLE001 - not HDF5, or its header is damaged
        return h5py.is_hdf5(path)


def _obs(adata: ad.AnnData | pd.DataFrame) -> pd.DataFrame:
    return adata if isinstance(adata, pd.DataFrame) else adata.obs


def text_codes(values: pd.Series | pd.Categorical | np.ndarray, *, keep_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of a column read as text, and the text of each code: the values ``astype(str)``
    gives, without building a string per cell (values with one text, ``1`` and ``"1"``, share a code).
    Missing values read as ``'nan'`` as ``astype(str)`` writes them, or get code -1 with ``keep_missing``."""
    codes, uniques = pd.factorize(pd.Series(values), use_na_sentinel=keep_missing)
    text = np.asarray(pd.Index(uniques, dtype=object).astype(str), dtype=object)
    merged, distinct = pd.factorize(text)
    merged = np.append(merged, -1)  # code -1 (missing) stays -1
    return merged[codes].astype(np.int64), np.asarray(distinct, dtype=object)


def require_obs_key(adata: ad.AnnData | pd.DataFrame, key: str, what: str = "key") -> None:
    """Fail unless ``adata.obs`` (or an obs frame) has column ``key``; ``what`` names its role."""
    obs = _obs(adata)
    if key not in obs.columns:
        cols = ", ".join(map(str, obs.columns)) or "none"
        raise DataError(f"obs has no column {key!r} (the {what}); the columns are: {cols}. Pass the right column name.")


def require_cells(adata: ad.AnnData | pd.DataFrame, where: str = "The data") -> None:
    """Fail when there are no cells (obs has no rows): every later check would only confuse."""
    if len(_obs(adata)) == 0:
        raise DataError(f"{where} has no cells (obs has 0 rows); give a file with cells.")


def require_label(adata: ad.AnnData | pd.DataFrame, key: str, label: str, where: str = "") -> None:
    """Fail unless ``label`` occurs in ``adata.obs[key]`` (or an obs frame); list the values found (``where``: which
    of several files, e.g. ``in the prediction``)."""
    values = _obs(adata)[key].astype(str)
    if label not in set(values):
        found = sorted(values.unique())
        shown = ", ".join(found[:20]) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")
        raise DataError(f"Control label {label!r} not found in obs[{key!r}]{' ' + where if where else ''}; values found: {shown}.")


def _non_finite(where: str) -> DataError:
    return DataError(f"{where} contains NaN or Inf values; remove or impute them first.")


def require_finite(matrix: np.ndarray | sp.spmatrix, where: str = "X") -> None:
    """Fail if ``matrix`` (dense or sparse) holds NaN or Inf."""
    data = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if not np.isfinite(data).all():
        raise _non_finite(where)


#: Rows per block when a whole matrix is scanned (bounds memory in backed mode).
SCAN_ROWS = 4096

#: A run of consecutive cells without any non-zero value spanning at least this many entries
#: (cells x genes; 64 KiB of float32) is taken for a zeroed block of a damaged file, not biology.
EMPTY_BLOCK_VALUES = 16_384

#: Total counts per cell after normalisation (scanpy ``normalize_total(target_sum=...)``).
#: A fixed target makes normalisation a per-cell operation, identical in memory and backed.
TARGET_SUM = 1e4

#: Values of log1p expression stay below this (``log1p`` of 5e8 is about 20; of a million, 13.8): a larger
#: value is expression that was never log-transformed. Training data and evaluated files are held to it alike.
MAX_LOG1P = 20.0


def read_annotations(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``obs`` and ``var`` of an ``.h5ad`` file without reading X, obsm, layers or uns."""
    path = _existing_file(path)
    try:
        with h5py.File(path, "r") as f:
            if "encoding-type" in f["obs"].attrs and "encoding-type" in f["var"].attrs:
                return ad.io.read_elem(f["obs"]), ad.io.read_elem(f["var"])
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - see read_anndata
        raise unreadable(path, err) from None
    legacy = read_anndata(path, backed=True)  # old layout: only anndata's reader understands it
    obs, var = legacy.obs.copy(), legacy.var.copy()
    legacy.file.close()
    return obs, var


#: HDF5's chunk cache per open matrix array: none. Random rows touch a different chunk each, so a
#: cache only makes HDF5 read whole chunks (87 KB for a few hundred values of an anndata-written
#: shard): without it a random row of uncompressed X costs a third of the time (measured here),
#: and an open file holds no cache memory.
CHUNK_CACHE_BYTES = 0


def _no_layer(layer: str, layers: list[str], where: str) -> DataError:
    """The error for ``data.layer`` naming a layer ``where`` lacks."""
    found = ", ".join(repr(name) for name in layers) if layers else "none"
    return DataError(f"{where} has no layer {layer!r} (data.layer); its layers: {found}. Name one of them, or null to read X.")


class CellMatrix:
    """Rows of an AnnData's X by position, from memory or from an ``.h5ad`` file on demand (backed).

    A backed matrix opens its file lazily in each process (DataLoader workers included) and
    reads only the requested rows, so memory does not grow with the number of cells. Rows of a
    CSR X are read by :func:`~perturbdiff_core.data.h5_rows.csr_rows`, which never holds the
    file's whole ``indptr``.
    """

    def __init__(self, matrix: Any = None, path: str | os.PathLike[str] | None = None, layer: str | None = None) -> None:
        self._matrix = matrix
        self.path = None if path is None else Path(path)
        self.layer = layer  # of a file: the entry of its layers read instead of X
        self._opened: tuple[int, Any, Any, StoredCSR | None] | None = None

    @classmethod
    def of(cls, adata: ad.AnnData, layer: str | None = None) -> CellMatrix:
        """The X of ``adata``, or its layer ``layer``; a backed AnnData is read from its file."""
        if layer is not None and layer not in adata.layers:
            raise _no_layer(layer, list(adata.layers.keys()), "The AnnData")
        if adata.isbacked:
            return cls(path=adata.filename, layer=layer)
        if layer is not None:
            return cls(matrix=adata.layers[layer])
        require_matrix(adata)
        return cls(matrix=adata.X)

    def _x(self) -> Any:
        if self.path is None:
            return self._matrix
        return self._open()[2]

    def _open(self) -> tuple[int, Any, Any, StoredCSR | None]:
        """``(pid, file, X as anndata reads it, X's arrays when it is CSR)``, opened once per process."""
        if self._opened is None or self._opened[0] != os.getpid():
            handle = h5py.File(self.path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES)
            key = "X" if self.layer is None else f"layers/{self.layer}"
            if key not in handle:
                layers = list(handle["layers"].keys()) if "layers" in handle else []
                handle.close()
                if self.layer is not None:
                    raise _no_layer(self.layer, layers, str(self.path))
                raise DataError(f"{self.path} has no X matrix; put the log-normalised expression in X.")
            try:
                x = handle[key]
                self._opened = (os.getpid(), handle, ad.io.sparse_dataset(x) if isinstance(x, h5py.Group) else x, stored_csr(x))
            except MemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - a damaged file fails anywhere inside h5py and anndata
                handle.close()
                raise unreadable(self.path, err) from None
        return self._opened

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
        _, _, x, csr = self._open()
        block = x[unique] if csr is None else csr_rows(csr, unique)
        return block[inverse]

    def blocks(self, size: int = SCAN_ROWS) -> Iterator[np.ndarray | sp.spmatrix]:
        """Consecutive row blocks of at most ``size`` rows covering the whole matrix; a block the file
        cannot give (damaged storage) is a DataError naming the rows."""
        n = self.shape[0]
        x = self._x()
        for start in range(0, n, size):
            stop = min(start + size, n)
            try:
                block = x[start:stop]
            except (MemoryError, DataError):
                raise
            except Exception as err:  # noqa: BLE001 - h5py, anndata and scipy fail in many ways on damaged storage
                raise DataError(
                    f"Cannot read cells {start}-{stop - 1} of X{f' in {self.path}' if self.path else ''} "
                    f"({type(err).__name__}: {first_line(err)}); the file is damaged. Copy or write it again."
                ) from None
            yield block

    def close(self) -> None:
        """Close the file of a backed matrix in this process (it reopens on the next read)."""
        if self._opened is not None and self._opened[0] == os.getpid():
            self._opened[1].close()
        self._opened = None


@dataclass(frozen=True)
class ValueSummary:
    """What a scan of X found: finiteness, range, whether every value is an integer, the number of
    genes (columns), and signs of a damaged file: the longest run of consecutive cells without any
    non-zero value (``empty_run``: first row and length) and sparse entries stored twice for one
    cell and gene (``duplicates``)."""

    finite: bool
    minimum: float
    maximum: float
    integer: bool
    empty_run: tuple[int, int] = (0, 0)
    duplicates: int = 0
    genes: int = 0
    expressing_cells: int = 0  # cells with a non-zero value
    log_two_cells: int = 0  # of them, those whose smallest non-zero value is log2(2) = 1 or log10(2)


class _EmptyRuns:
    """The longest run of consecutive empty cells over a stream of blocks (runs may span blocks)."""

    def __init__(self) -> None:
        self.rows = 0  # cells seen so far
        self.current = (0, 0)  # the run still open at the end of the last block
        self.longest = (0, 0)

    def add(self, empty: np.ndarray) -> None:
        """Extend with the next block's per-cell emptiness flags."""
        edges = np.diff(np.concatenate([[0], empty.astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        for start, stop in zip(starts, stops):
            run = (self.rows + start, stop - start)
            if start == 0 and self.current[1] and self.current[0] + self.current[1] == self.rows:
                run = (self.current[0], self.current[1] + stop)
            self.current = run
            self.longest = max(self.longest, run, key=lambda r: r[1])
        self.rows += len(empty)


def _nonzeros_per_cell(block: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Number of non-zero values in each row (stored zeros of a sparse block do not count)."""
    if not sp.issparse(block):
        return np.count_nonzero(np.asarray(block), axis=1)
    csr = sp.csr_matrix(block)
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    return np.bincount(rows[csr.data != 0], minlength=csr.shape[0])


def _duplicate_entries(block: np.ndarray | sp.spmatrix) -> int:
    """Sparse entries stored more than once for the same cell and gene (a damaged index array)."""
    if not sp.issparse(block):
        return 0
    csr = sp.csr_matrix(block, copy=True)
    stored = csr.nnz
    csr.sum_duplicates()
    return stored - csr.nnz


#: The smallest non-zero value of a cell in base-2 and base-10 logarithms of raw counts plus one: log_b(2).
LOG_TWO = (1.0, float(np.log10(2.0)))
#: Share of expressing cells at a :data:`LOG_TWO` value that marks the data as such a logarithm.
LOG_TWO_SHARE = 0.9


def _smallest_nonzero(block: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Each row's smallest positive value (``inf`` for a row without one)."""
    if not sp.issparse(block):
        dense = np.asarray(block)
        return np.where(dense > 0, dense, np.inf).min(axis=1, initial=np.inf)
    csr = sp.csr_matrix(block)
    positive = np.where(csr.data > 0, csr.data, np.inf)
    out = np.full(csr.shape[0], np.inf)
    filled = np.diff(csr.indptr) > 0
    if filled.any():
        out[filled] = np.minimum.reduceat(positive, csr.indptr[:-1][filled])
    return out


def summarize_values(matrix: CellMatrix) -> ValueSummary:
    """Scan X block by block (bounded memory): NaN/Inf, min, max, integer-valued, runs of empty cells, duplicates,
    and how many cells have :data:`LOG_TWO` as their smallest non-zero value."""
    finite, integer, lo, hi, duplicates, genes = True, True, np.inf, -np.inf, 0, 0
    expressing, log_two = 0, 0
    runs = _EmptyRuns()
    for block in matrix.blocks():
        genes = block.shape[1]
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
        runs.add(_nonzeros_per_cell(block) == 0)
        duplicates += _duplicate_entries(block)
        smallest = _smallest_nonzero(block)
        expressing += int(np.isfinite(smallest).sum())
        log_two += int(np.any([np.abs(smallest - v) <= 1e-6 for v in LOG_TWO], axis=0).sum())
    return ValueSummary(finite, float(lo), float(hi), integer, runs.longest, duplicates, genes, expressing, log_two)


class NormalizationMismatch(DataError):
    """Raw counts where ``data.normalize`` is false, or log-normalised values where it is true; ``counts``:
    whether the values are raw counts (so a caller that cannot change the setting can word its own advice)."""

    def __init__(self, counts: bool, message: str) -> None:
        super().__init__(message)
        self.counts = counts


def require_valid_values(summary: ValueSummary, *, normalize: bool, where: str = "X") -> None:
    """NaN/Inf, negative values, an all-zero matrix, signs of a damaged file, raw counts (unless
    ``normalize``) and expression never log-transformed each get one clear error.

    Raw counts are recognised by integrality, not size: log-normalised expression is never
    all whole numbers, while counts of a shallow screen can all be at most 20.
    """
    if not summary.finite:
        raise _non_finite(where)
    if summary.minimum == 0 and summary.maximum == 0:
        raise DataError(f"{where} is all zeros: there is no expression to learn from. Check the file holds the data (e.g. not an empty layer).")
    require_undamaged(summary, where)
    if summary.minimum < 0:
        raise DataError(
            f"{where} has negative values (minimum {summary.minimum:.3g}); perturbdiff expects "
            f"non-negative log-normalised expression, not scaled or centred data. Use the values "
            f"before sc.pp.scale (e.g. a layer or adata.raw copied into X)."
        )
    counts = summary.integer
    if counts and not normalize:
        raise NormalizationMismatch(
            counts,
            f"{where} looks like raw counts (every value is a whole number, up to {summary.maximum:.0f}), but "
            f"log-normalised values are expected. Set data.normalize: true to apply "
            f"normalize_total (target {TARGET_SUM:g}) and log1p, or give log-normalised data."
        )
    if not counts and summary.maximum >= MAX_LOG1P:
        raise DataError(
            f"{where} reaches {summary.maximum:.3g}, beyond any log-normalised value (below {MAX_LOG1P:g}): "
            f"it looks normalised but not log-transformed. Apply log1p first (sc.pp.log1p), or give the raw "
            f"counts with data.normalize: true."
        )
    if not counts and summary.expressing_cells and summary.log_two_cells >= LOG_TWO_SHARE * summary.expressing_cells:
        share = summary.log_two_cells / summary.expressing_cells
        raise DataError(
            f"{where} looks like a base-2 or base-10 logarithm of raw counts plus one: {share:.0%} of cells have "
            f"log2(2) = 1 or log10(2) = 0.301 as their smallest non-zero value. perturbdiff expects the natural "
            f"log1p of normalised counts (sc.pp.normalize_total, then sc.pp.log1p): give the raw counts with "
            f"data.normalize: true."
        )
    if normalize and not counts:
        raise NormalizationMismatch(
            counts,
            f"data.normalize is true but {where} does not hold raw counts (not every value is a whole "
            f"number; maximum {summary.maximum:.3g}); it looks log-normalised already. Set data.normalize: false."
        )


def layer_names(source: ad.AnnData | str | os.PathLike[str] | list[str] | None) -> list[str]:
    """The ``layers`` of an AnnData or of one ``.h5ad`` file (none for anything else, or a file h5py cannot open)."""
    if isinstance(source, ad.AnnData):
        return list(source.layers.keys())
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return []
    try:
        with h5py.File(source, "r") as handle:
            return list(handle["layers"].keys()) if "layers" in handle else []
    except OSError:
        return []


def with_layers_hint(err: DataError, layers: list[str]) -> DataError:
    """``err`` on the values read, with the file's layers named: the expression wanted may sit in one of them."""
    if not layers:
        return err
    names = ", ".join(repr(name) for name in layers)
    message = f"{err} The file has layers {names}: if one holds the expression asked for, name it in data.layer."
    return NormalizationMismatch(err.counts, message) if isinstance(err, NormalizationMismatch) else DataError(message)


def require_undamaged(summary: ValueSummary, where: str = "X") -> None:
    """Refuse the marks a zeroed or overwritten block of a file leaves: a long run of consecutive
    empty cells (:data:`EMPTY_BLOCK_VALUES`) or sparse entries stored twice."""
    start, length = summary.empty_run
    if length >= 2 and length * summary.genes >= EMPTY_BLOCK_VALUES:
        raise DataError(
            f"{where} has {length} consecutive cells without any expression (rows {start}-{start + length - 1}): "
            f"a block of the file was probably zeroed or damaged. Copy or write the file again; if those cells "
            f"are really empty, remove them (e.g. sc.pp.filter_cells(adata, min_genes=1))."
        )
    if summary.duplicates:
        raise DataError(
            f"{where} (sparse) stores {summary.duplicates} entries twice for the same cell and gene: its index "
            f"arrays are damaged. Copy or write the file again (or call X.sum_duplicates() if that is intended)."
        )


def normalize_rows(block: np.ndarray | sp.spmatrix) -> np.ndarray | sp.spmatrix:
    """scanpy ``normalize_total(target_sum=TARGET_SUM)`` then ``log1p`` on a block of count rows."""
    import scanpy as sc  # slow import, only needed for raw counts

    cells = ad.AnnData(block.astype(np.float64) if sp.issparse(block) else np.asarray(block, dtype=np.float64))
    sc.pp.normalize_total(cells, target_sum=TARGET_SUM)
    sc.pp.log1p(cells)
    return cells.X


def require_matrix(adata: ad.AnnData) -> None:
    """Fail when an in-memory AnnData has no X (e.g. only layers, or obs and var alone)."""
    if adata.X is None:
        raise DataError("The AnnData has no X matrix; put the log-normalised expression in X.")


def require_genes(genes: pd.Index, where: str = "The data") -> None:
    """Fail when there are no genes (var has no rows, X no columns)."""
    if len(genes) == 0:
        raise DataError(f"{where} has no genes (var has 0 rows, X 0 columns); give a file with measured genes.")


def require_unique_genes(genes: pd.Index) -> None:
    """Fail when gene names (var_names) repeat: genes are aligned by name."""
    if not genes.is_unique:
        dup = genes[genes.duplicated()].unique().tolist()
        raise DataError(
            f"Gene names (var_names) are not unique: {len(dup)} repeated, e.g. "
            f"{', '.join(map(str, dup[:5]))}. Call adata.var_names_make_unique() or set var_names "
            f"to a unique column (e.g. gene IDs)."
        )


#: Text that converting a missing value to a string leaves (``astype(str)`` of NaN and None), and blanks.
MISSING_TEXT = frozenset({"nan", "none", ""})


def require_complete(obs: pd.DataFrame, key: str, what: str = "key", allowed: str | None = None) -> None:
    """Fail when some cells have no value in ``obs[key]``: NaN, or text a missing value leaves (:data:`MISSING_TEXT`,
    any case; ``allowed``, e.g. a control label spelt ``None``, excepted)."""
    column = obs[key]
    missing = int(column.isna().sum())
    if missing:
        raise DataError(
            f"obs[{key!r}] (the {what}) has {missing} cells without a value; fill them "
            f"(e.g. with 'unknown') or drop those cells."
        )
    if isinstance(column.dtype, pd.CategoricalDtype):  # the categories in use, not one value per cell
        values = column.cat.categories[pd.unique(column.cat.codes.to_numpy())]
    else:
        values = pd.unique(column.to_numpy())
    placeholders = [v for v in values if isinstance(v, str) and v.strip().lower() in MISSING_TEXT and v != allowed]
    if placeholders:
        count = int(column.isin(placeholders).sum())
        raise DataError(
            f"obs[{key!r}] (the {what}) has {count} cells labelled {', '.join(map(repr, placeholders))}, text a missing "
            f"value leaves when converted to a string; give them a real label (e.g. 'unknown') or drop those cells."
        )
