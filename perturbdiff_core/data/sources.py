"""Where a screen's cells come from: an AnnData, one ``.h5ad`` file, a collection of shards, or a
TileDB-SOMA experiment, each opened as obs, gene names and a row reader (:func:`open_source`).

Every reader answers ``shape``, ``rows(positions)``, ``blocks()`` and ``close()``; the row
positions are those of the obs returned with it. ``data.obs_filter`` keeps the cells an obs
expression selects: TileDB evaluates it for a SOMA experiment, pandas (``DataFrame.eval``) for
the others, so ``cell_type == 'B' and batch in ['p1', 'p2']`` means the same in both.
"""

from __future__ import annotations

import ast
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError, first_line
from .anndata_io import SCAN_ROWS, CellMatrix, ValueSummary, read_anndata, read_annotations
from .collection import collection_paths, open_collection
from .config import DataConfig
from .soma import open_soma


@dataclass
class Opened:
    """A source opened for reading.

    Attributes:
        obs: one row per cell, in the reader's row order.
        genes: the gene names of the reader's columns.
        matrix: the row reader.
        summary: what a scan of the values found, when the source knows it (else the caller scans).
        normalized: the rows come out normalised already (``data.normalize``, done per shard).
        report: one line on what was read (collections and SOMA), or None.
        parts: what the cells are made of, to tell on resume whether they changed: ``[name, cells]``
            per shard of a collection, ``[URI, cells]`` of a SOMA experiment; None for one file.
        var: the genes' annotations (an AnnData's or one file's ``var``: symbols, IDs), None where not read.
    """

    obs: pd.DataFrame
    genes: pd.Index
    matrix: Any
    summary: ValueSummary | None = None
    normalized: bool = False
    report: str | None = None
    parts: list[list[Any]] | None = None
    var: pd.DataFrame | None = None


class RowSubset:
    """The rows ``keep`` of another reader, as positions ``0 .. len(keep) - 1`` (an obs filter's cells)."""

    def __init__(self, inner: Any, keep: np.ndarray) -> None:
        self.inner, self.keep = inner, np.asarray(keep, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        """``(cells, genes)``."""
        return len(self.keep), self.inner.shape[1]

    def rows(self, rows: np.ndarray) -> Any:
        """The rows ``rows`` of the subset (any order, repeats allowed)."""
        return self.inner.rows(self.keep[np.asarray(rows, dtype=np.int64)])

    def blocks(self, size: int = SCAN_ROWS) -> Iterator[Any]:
        """Consecutive blocks of at most ``size`` rows of the subset."""
        for start in range(0, len(self.keep), size):
            yield self.rows(np.arange(start, min(start + size, len(self.keep))))

    def close(self) -> None:
        """Close the inner reader's files in this process."""
        self.inner.close()

    @property
    def start_method(self) -> str | None:
        """How DataLoader workers reading it must start (the inner reader's)."""
        return worker_start_method(self.inner)


def worker_start_method(matrix: Any) -> str | None:
    """The multiprocessing start method DataLoader workers reading ``matrix`` need (``None``: the default)."""
    return getattr(matrix, "start_method", None)


#: What the perturbation column is, in errors about it (with the way out for unperturbed atlases).
PERTURBATION_ROLE = "perturbation key; data.perturbation_key: null reads every cell as unperturbed, for marginal pre-training"


#: What the column each data key names is, in errors about it.
_ROLES = {
    "data.perturbation_key": PERTURBATION_ROLE,
    "data.cell_type_key": "cell type key",
    "data.batch_key": "batch key",
    "data.dose_key": "dose key",
    "data.covariate_keys": "covariate key",
}


def obs_keys(config: DataConfig) -> dict[str, str]:
    """Every obs column the config's keys name -> the config key naming it (``condition`` -> ``data.perturbation_key``)."""
    keys = {
        config.perturbation_key: "data.perturbation_key",
        config.cell_type_key: "data.cell_type_key",
        config.batch_key: "data.batch_key",
        config.dose_key: "data.dose_key",
        **{key: "data.covariate_keys" for key in config.covariate_keys},
    }
    return {column: key for column, key in keys.items() if column is not None}


def obs_roles(config: DataConfig) -> dict[str, str]:
    """Every obs column the config names -> what it is (for errors), the filter's columns included."""
    roles = {column: _ROLES[key] for column, key in obs_keys(config).items()}
    return roles | {key: "column of data.obs_filter" for key in filter_columns(config.obs_filter) if key not in roles}


def filter_columns(expression: str | None) -> list[str]:
    """The obs columns an obs filter reads (the names in the expression), in order of appearance."""
    if expression is None:
        return []
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ConfigError(f"data.obs_filter {expression!r} is not an expression ({err.msg}); write e.g. cell_type == 'B'.") from None
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    names = [node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and id(node) not in called]
    return list(dict.fromkeys(names))


def _filter_frame(obs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The filter's columns of ``obs`` with numbers as numbers (a collection's columns are text categories)."""
    frame = {}
    for key in columns:
        column = obs[key]
        if isinstance(column.dtype, pd.CategoricalDtype) and column.cat.categories.dtype == object:
            numbers = pd.to_numeric(pd.Series(column.cat.categories), errors="coerce")
            if len(numbers) and numbers.notna().all():
                column = pd.Series(np.asarray(numbers)[column.cat.codes], index=column.index).where(column.cat.codes >= 0)
        frame[key] = column
    return pd.DataFrame(frame, index=obs.index)


def apply_filter(opened: Opened, expression: str | None) -> Opened:
    """``opened`` reduced to the cells ``expression`` selects (pandas ``DataFrame.eval`` on obs)."""
    if expression is None:
        return opened
    columns = filter_columns(expression)
    missing = [k for k in columns if k not in opened.obs.columns]
    if missing:
        raise DataError(
            f"data.obs_filter reads obs column(s) {', '.join(missing)} that the data lacks; the columns are: "
            f"{', '.join(map(str, opened.obs.columns))}."
        )
    try:
        mask = _filter_frame(opened.obs, columns).eval(expression)
    except Exception as err:  # noqa: BLE001 - pandas raises many kinds of errors for a bad expression
        raise ConfigError(f"data.obs_filter {expression!r} cannot be evaluated on obs ({first_line(err)}).") from None
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != (len(opened.obs),):
        raise ConfigError(f"data.obs_filter {expression!r} does not give True or False per cell; write a comparison, e.g. cell_type == 'B'.")
    if not mask.any():
        raise DataError(f"No cell passes data.obs_filter {expression!r}; loosen the filter.")
    keep = np.flatnonzero(mask)
    obs = opened.obs.iloc[keep].reset_index(drop=True) if not mask.all() else opened.obs
    matrix = opened.matrix if mask.all() else RowSubset(opened.matrix, keep)
    report = (opened.report + "; " if opened.report else "") + f"{len(keep):,} cells pass {expression!r}"
    return Opened(obs, opened.genes, matrix, opened.summary, opened.normalized, report, opened.parts, opened.var)


def data_path_name(path: str | os.PathLike[str] | list[str] | None) -> str:
    """How messages call ``data.path``: a file's name, ``N shards (first.h5ad, ...)``, a glob or a URI."""
    if path is None:
        return "no data path"
    if isinstance(path, list):
        names = [os.path.basename(os.fspath(p)) for p in path]
        return f"{len(names)} shards ({', '.join(names[:2])}{', ...' if len(names) > 2 else ''})"
    text = os.fspath(path)
    return text if "://" in text else os.path.basename(text.rstrip(os.sep)) or text


def data_available(path: str | os.PathLike[str] | list[str] | None) -> bool:
    """Whether ``data.path`` can be found here: every listed file, a file matching a glob, a file or
    folder; a URI (``s3://...``) is taken to be reachable."""
    if path is None:
        return False
    if isinstance(path, list):
        return all(data_available(p) for p in path)
    text = os.fspath(path)
    if "://" in text:
        return True
    if set("*?[") & set(text):
        return bool(glob.glob(os.path.expanduser(text)))
    return os.path.exists(os.path.expanduser(text))


def _single_file(path: str | os.PathLike[str], config: DataConfig) -> Opened:
    """One ``.h5ad`` file, read whole or backed, as before collections existed."""
    if config.backed:
        obs, var = read_annotations(path)
        return Opened(obs, var.index, CellMatrix(path=path, layer=config.layer), var=var)
    adata = read_anndata(path)
    return Opened(adata.obs, adata.var.index, CellMatrix.of(adata, config.layer), var=adata.var)


def open_source(source: ad.AnnData | str | os.PathLike[str] | list[str] | None, config: DataConfig) -> Opened:
    """obs, genes and rows of ``source`` (or ``config.path``): an AnnData, one ``.h5ad`` file, a collection
    (a list, a glob, a folder of shards) or, with ``data.source: soma``, a SOMA experiment's URI."""
    if source is None:
        if config.path is None:
            raise DataError("No data given: set data.path to an .h5ad file (or shards, or a SOMA URI) or pass an AnnData.")
        source = config.path
    if isinstance(source, ad.AnnData):
        matrix = CellMatrix.of(source, config.layer)
        return apply_filter(Opened(source.obs, source.var.index, matrix, var=source.var), config.obs_filter)
    if config.source == "soma":
        if config.layer is not None:
            raise ConfigError("data.layer reads one .h5ad file or AnnData; a SOMA experiment's X layer is data.soma_layer.")
        if not isinstance(source, (str, os.PathLike)):
            raise ConfigError("data.source: soma reads one experiment; give its URI as data.path, not a list.")
        screen = open_soma(
            os.fspath(source), obs_roles(config), obs_filter=config.obs_filter, measurement=config.soma_measurement,
            layer=config.soma_layer, var_column=config.soma_var_column, context=config.soma_context,
        )
        parts = [[os.fspath(source), len(screen.obs)]]
        return Opened(screen.obs, screen.genes, screen.matrix, screen.summary, report=screen.report, parts=parts)
    shards = collection_paths(source)
    if shards is None:
        return apply_filter(_single_file(source, config), config.obs_filter)
    if config.layer is not None:
        raise ConfigError("data.layer reads one .h5ad file or AnnData, not a collection of shards: give the shards "
                          "the expression in X.")
    collection = open_collection(shards, obs_roles(config), genes=config.genes, normalize=config.normalize)
    opened = Opened(collection.obs, collection.genes, collection.matrix, collection.summary,
                    normalized=config.normalize, report=collection.report,
                    parts=[[s.path.name, s.n_obs] for s in collection.shards])
    return apply_filter(opened, config.obs_filter)
