"""A TileDB-SOMA experiment (the format of the CELLxGENE Census) as a screen: ``data.source: soma``.

``data.path`` is the experiment's URI (a local folder, or ``s3://...``), ``data.obs_filter`` a
value filter on its obs (``cell_type == 'B cell' and is_primary_data == True``), evaluated by
TileDB. The cells passing it, in ``soma_joinid`` order, are the rows; their obs columns are read
once, and their expression is read on demand from the measurement's X layer by ``soma_joinid``
(:class:`SomaMatrix`, opened lazily in each process). Needs the ``tiledbsoma`` package
(``pip install 'perturbdiff[soma]'``).

An experiment may be remote and hold tens of millions of cells, so the value checks every
command runs look at a seeded sample of :data:`CHECK_CELLS` passing cells, not at all of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError, first_line
from .anndata_io import SCAN_ROWS, CellMatrix, ValueSummary, summarize_values

#: Cells whose values are checked when an experiment is opened (a seeded sample beyond).
CHECK_CELLS = 20_000

#: var columns tried, in order, for the gene names when ``data.soma_var_column`` is unset:
#: the Census's gene symbols, then the column ``tiledbsoma.io.from_h5ad`` writes var_names to.
VAR_COLUMNS = ("feature_name", "var_id")


def tiledbsoma() -> ModuleType:
    """The ``tiledbsoma`` module, or a ConfigError saying how to install it."""
    try:
        import tiledbsoma as soma
    except ImportError:
        raise ConfigError(
            "data.source: soma needs the tiledbsoma package; install it with pip install 'perturbdiff[soma]' "
            "(or pip install tiledbsoma)."
        ) from None
    return soma


def _context(config: dict[str, Any]) -> Any:
    """A SOMA context with TileDB configuration ``config`` (``None``: tiledbsoma's default)."""
    if not config:
        return None
    soma = tiledbsoma()
    return soma.SOMATileDBContext(tiledb_config={k: str(v) for k, v in config.items()})


class SomaMatrix:
    """Rows of a SOMA experiment's X layer: row ``i`` is the cell ``joinids[i]``, columns the var
    entries ``var_joinids`` in order; the experiment opens on the first read in each process."""

    #: How DataLoader workers must start: TileDB is not fork-safe (a worker forked from a process
    #: that has read with it hangs on its first read; seen with tiledbsoma 2.3), so they are spawned.
    start_method = "spawn"

    def __init__(
        self, uri: str, measurement: str, layer: str, joinids: np.ndarray, var_joinids: np.ndarray,
        context: dict[str, Any] | None = None,
    ) -> None:
        self.uri, self.measurement, self.layer = uri, measurement, layer
        self.joinids = np.asarray(joinids, dtype=np.int64)
        self.var_joinids = np.asarray(var_joinids, dtype=np.int64)
        self._var_order = np.argsort(self.var_joinids, kind="stable")
        self.context = dict(context or {})
        self._opened: tuple[int, Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}  # an open experiment does not travel to workers

    @property
    def shape(self) -> tuple[int, int]:
        """``(cells, genes)``."""
        return len(self.joinids), len(self.var_joinids)

    def _x(self) -> Any:
        if self._opened is None or self._opened[0] != os.getpid():
            experiment = tiledbsoma().Experiment.open(self.uri, context=_context(self.context))
            self._opened = (os.getpid(), experiment, experiment.ms[self.measurement].X[self.layer])
        return self._opened[2]

    def rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The rows ``rows`` (any order, repeats allowed) as CSR over the var entries."""
        ids = self.joinids[np.asarray(rows, dtype=np.int64)]
        unique, inverse = np.unique(ids, return_inverse=True)
        table = self._x().read(coords=(unique,)).tables().concat()
        cells = np.searchsorted(unique, table["soma_dim_0"].to_numpy())
        var = table["soma_dim_1"].to_numpy()
        where = np.searchsorted(self.var_joinids, var, sorter=self._var_order)
        where = np.minimum(where, len(self.var_joinids) - 1)
        keep = self.var_joinids[self._var_order[where]] == var  # values of var entries outside the measurement's var: none
        block = sp.csr_matrix(
            (table["soma_data"].to_numpy()[keep], (cells[keep], self._var_order[where[keep]])),
            shape=(len(unique), len(self.var_joinids)),
        )
        return block[inverse]

    def blocks(self, size: int = SCAN_ROWS) -> Iterator[sp.csr_matrix]:
        """Consecutive blocks of at most ``size`` rows covering every row."""
        for start in range(0, self.shape[0], size):
            yield self.rows(np.arange(start, min(start + size, self.shape[0])))

    def close(self) -> None:
        """Close the experiment in this process (it reopens on the next read)."""
        if self._opened is not None and self._opened[0] == os.getpid():
            self._opened[1].close()
        self._opened = None


@dataclass
class SomaScreen:
    """The cells of an experiment that pass the filter: obs columns, gene names, rows, a value summary."""

    obs: pd.DataFrame
    genes: pd.Index
    matrix: SomaMatrix
    summary: ValueSummary
    report: str


def _choose(found: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, key: str, uri: str) -> str:
    """``wanted`` when it is in ``found``; unset, the first of ``defaults`` found (the only one found
    when there is one); else a DataError listing what there is and naming the config ``key``."""
    if wanted is not None:
        if wanted not in found:
            raise DataError(f"SOMA experiment {uri} has no {what} {wanted!r} ({key}); it has: {', '.join(found) or 'none'}.")
        return wanted
    for name in (*defaults, *(found if len(found) == 1 else [])):
        if name in found:
            return name
    raise DataError(f"SOMA experiment {uri} has no {what} named {' or '.join(defaults)}; set {key} to one of: {', '.join(found)}.")


def _sample_summary(matrix: SomaMatrix) -> ValueSummary:
    """The value summary of all cells, or of a seeded sample of :data:`CHECK_CELLS` of them (runs of empty
    cells mean nothing in a sample and are not reported)."""
    n = matrix.shape[0]
    rows = np.arange(n) if n <= CHECK_CELLS else np.sort(np.random.default_rng(0).choice(n, CHECK_CELLS, replace=False))
    summary = summarize_values(CellMatrix(matrix=matrix.rows(rows)))
    return summary if n <= CHECK_CELLS else replace(summary, empty_run=(0, 0))


def open_soma(
    uri: str,
    roles: dict[str, str],
    *,
    obs_filter: str | None,
    measurement: str,
    layer: str | None,
    var_column: str | None,
    context: dict[str, Any],
) -> SomaScreen:
    """The cells of experiment ``uri`` passing ``obs_filter``, with the obs columns ``roles`` (column -> what it is)."""
    soma = tiledbsoma()
    try:
        experiment = soma.Experiment.open(uri, context=_context(context))
    except Exception as err:  # noqa: BLE001 - tiledbsoma raises its own errors for missing, foreign or unreachable URIs
        raise DataError(f"Cannot open {uri} as a SOMA experiment ({first_line(err)}); give the URI of a TileDB-SOMA experiment.") from None
    with experiment:
        columns = experiment.obs.schema.names
        for key, what in roles.items():
            if key not in columns:
                shown = ", ".join(c for c in columns if c != "soma_joinid")
                raise DataError(f"SOMA experiment {uri}: obs has no column {key!r} (the {what}); its columns are: {shown}.")
        measurement = _choose(list(experiment.ms.keys()), measurement, ("RNA",), "measurement", "data.soma_measurement", uri)
        ms = experiment.ms[measurement]
        layer = _choose(list(ms.X.keys()), layer, ("data", "raw"), "X layer", "data.soma_layer", uri)
        var_names = ms.var.schema.names
        var_column = _choose(var_names, var_column, VAR_COLUMNS, "var column", "data.soma_var_column", uri)
        try:
            obs = experiment.obs.read(value_filter=obs_filter, column_names=["soma_joinid", *roles]).concat().to_pandas()
        except Exception as err:  # noqa: BLE001 - TileDB rejects a filter it cannot parse with its own errors
            raise DataError(f"data.obs_filter {obs_filter!r} cannot be applied to {uri}: {first_line(err)}.") from None
        var = ms.var.read(column_names=["soma_joinid", var_column]).concat().to_pandas()
    if obs.empty:
        raise DataError(f"No cell of {uri} passes data.obs_filter {obs_filter!r}; loosen the filter.")
    obs = obs.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
    matrix = SomaMatrix(uri, measurement, layer, obs.pop("soma_joinid").to_numpy(), var["soma_joinid"].to_numpy(), context)
    summary = _sample_summary(matrix)
    matrix.close()
    report = f"SOMA experiment {uri}, {measurement}/{layer}: {len(obs):,} cells" + (
        f" passing {obs_filter!r}" if obs_filter else ""
    )
    return SomaScreen(obs, pd.Index(var[var_column].astype(str)), matrix, summary, report)
