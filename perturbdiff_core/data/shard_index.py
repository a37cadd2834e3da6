"""The index of one ``.h5ad`` shard of a collection, built once and cached beside the shard.

Starting a run on a collection must not read every cell of every shard again: the index holds
what start-up needs from a shard, the configured obs columns as integer codes with their
categories (values read as text, missing values as code -1), the gene names, the number of
cells and the :class:`~perturbdiff_core.data.anndata_io.ValueSummary` of its values (the checks
every command runs). It is built with whole-column reads and a block-wise vectorised scan, and
stored as ``.perturbdiff-index/<shard name>.npz`` in the shard's folder (in
``$XDG_CACHE_HOME/perturbdiff/shard-index`` when that folder cannot be written). The cached
index is used while the shard's size and modification time are those it was built from; a
changed shard is indexed again, and columns a later run needs are added to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from ..errors import DataError, OutputError
from ..io import atomic_path
from .anndata_io import CellMatrix, ValueSummary, read_annotations, summarize_values, text_codes, unreadable

#: Folder of the cached indexes, beside the shards.
INDEX_DIR = ".perturbdiff-index"

#: Marks the version of a cached index; another version is rebuilt.
INDEX_FORMAT = "perturbdiff.shard-index/1"


@dataclass
class ShardIndex:
    """What start-up needs from one shard.

    Attributes:
        path: the shard.
        n_obs: its number of cells.
        genes: its gene names (var_names), as text.
        obs_columns: every obs column it has (to name them when one is missing).
        columns: obs column -> ``(codes, categories)``: ``int32`` codes (``-1``: no value) into text categories.
        summary: what a scan of its values found.
    """

    path: Path
    n_obs: int
    genes: pd.Index
    obs_columns: list[str]
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    summary: ValueSummary | None = None


def _stamp(path: Path) -> dict[str, int]:
    """What invalidates an index: the shard's size and modification time (nanoseconds)."""
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_locations(path: Path) -> list[Path]:
    """Where the index of ``path`` is kept: beside it, then in the user's cache folder."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return [path.parent / INDEX_DIR / f"{path.name}.npz", home / "perturbdiff" / "shard-index" / f"{digest}-{path.name}.npz"]


def _encoded(values: pd.Series | pd.Categorical | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(int32 codes, text categories)`` of a column; missing values get code -1."""
    codes, categories = text_codes(values, keep_missing=True)
    return codes.astype(np.int32), categories.astype(str)


def _read_columns(path: Path, keys: Iterable[str]) -> tuple[int, pd.Index, list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Number of cells, gene names, obs column names and the requested columns present, read from ``path``."""
    keys = list(keys)
    try:
        with h5py.File(path, "r") as f:
            obs, var = f["obs"], f["var"]
            if "encoding-type" in obs.attrs and "encoding-type" in var.attrs:
                names = [str(c) for c in obs.attrs.get("column-order", [])]
                n_obs = len(obs[obs.attrs["_index"]])
                genes = pd.Index(ad.io.read_elem(var[var.attrs["_index"]])).astype(str)
                columns = {k: _encoded(ad.io.read_elem(obs[k])) for k in keys if k in names}
                return n_obs, genes, names, columns
    except (MemoryError, DataError):
        raise
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file fails anywhere inside h5py and anndata
        raise unreadable(path, err) from None
    frame, var_frame = read_annotations(path)  # an old layout: anndata's reader
    columns = {k: _encoded(frame[k]) for k in keys if k in frame.columns}
    return len(frame), pd.Index(var_frame.index).astype(str), [str(c) for c in frame.columns], columns


def _load(file: Path, path: Path, stamp: dict[str, int]) -> ShardIndex | None:
    """The index of ``path`` cached in ``file`` when it was built from the shard as it is now (``stamp``), else None."""
    try:
        with np.load(file, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            if meta.get("format") != INDEX_FORMAT or meta.get("stamp") != stamp:
                return None
            columns = {k: (stored[f"codes/{k}"], stored[f"categories/{k}"]) for k in meta["columns"]}
            summary = ValueSummary(**{**meta["summary"], "empty_run": tuple(meta["summary"]["empty_run"])})
            genes = pd.Index(stored["genes"]).astype(str)
            return ShardIndex(path, meta["n_obs"], genes, meta["obs_columns"], columns, summary)
    except (OSError, ValueError, KeyError, TypeError):  # missing, damaged or foreign: build it again
        return None


def _store(index: ShardIndex, stamp: dict[str, int]) -> None:
    """Write ``index`` atomically to the first cache location that can be written (none: it is not cached)."""
    meta = {"format": INDEX_FORMAT, "stamp": stamp, "n_obs": index.n_obs, "obs_columns": index.obs_columns,
            "columns": sorted(index.columns), "summary": asdict(index.summary)}
    arrays = {"meta": np.array(json.dumps(meta)), "genes": np.asarray(index.genes, dtype=str)}
    for key, (codes, categories) in index.columns.items():
        arrays[f"codes/{key}"], arrays[f"categories/{key}"] = codes, categories
    for file in cache_locations(index.path):
        try:
            with atomic_path(file) as tmp, open(tmp, "wb") as out:
                np.savez(out, **arrays)
            return
        except OutputError:
            continue


def _complete(index: ShardIndex, keys: list[str]) -> bool:
    """Whether ``index`` holds every column of ``keys`` that its shard has."""
    return all(k in index.columns or k not in index.obs_columns for k in keys)


def cached_index(path: str | os.PathLike[str], keys: Iterable[str]) -> ShardIndex | None:
    """The cached index of shard ``path`` when it is current and holds the columns ``keys`` the shard has."""
    path, keys = Path(path), list(keys)
    stamp = _stamp(path)
    for file in cache_locations(path):
        index = _load(file, path, stamp)
        if index is not None and _complete(index, keys):
            return index
    return None


def build_index(path: str | os.PathLike[str], keys: Iterable[str]) -> ShardIndex:
    """Index shard ``path`` with the obs columns ``keys`` it has (a current cached index gains the columns
    it lacks; otherwise the shard is read and scanned), and cache it."""
    path, keys = Path(path), list(keys)
    stamp = _stamp(path)
    current = [i for i in (_load(f, path, stamp) for f in cache_locations(path)) if i is not None]
    if current:
        index = current[0]
        index.columns.update(_read_columns(path, [k for k in keys if k not in index.columns])[3])
    else:
        n_obs, genes, names, columns = _read_columns(path, keys)
        matrix = CellMatrix(path=path)
        try:
            summary = summarize_values(matrix)
        finally:
            matrix.close()
        index = ShardIndex(path, n_obs, genes, names, columns, summary)
    if _stamp(path) == stamp:  # not rewritten while it was read
        _store(index, stamp)
    return index
