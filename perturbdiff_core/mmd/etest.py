"""The E-test over an AnnData: a kernel two-sample test of every perturbation against its control cells.

For each perturbation (within each group of ``group_by``, against the control cells of that
group) :func:`etest` reports MMD^2, a permutation p-value (:func:`perturbdiff_core.mmd.two_sample.permutation_test`)
and a Benjamini-Hochberg adjusted p-value over all rows. ``perturbdiff etest`` is its command line.

Relation to scperturb's E-test (Peidli et al. 2024), checked in ``tests/test_etest.py``:
``kernel="energy", estimator="unbiased"`` (beta=1) gives exactly scperturb's E-distance
``scperturb.edist(adata, obsm_key=..., dist="euclidean")`` on the same matrix. scperturb's
default ``dist="sqeuclidean"`` (with its default ``sample_correct=True``) is the energy kernel
with ``beta=2`` and the unbiased estimator: the unbiased estimate of ``2 ||mean_x - mean_y||^2``;
with ``sample_correct=False`` it is the biased estimator, exactly ``2 ||mean_x - mean_y||^2``.
scperturb usually runs on PCA coordinates; this uses X.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.anndata_io import (
    require_cells,
    require_finite,
    require_genes,
    require_label,
    require_matrix,
    require_obs_key,
)
from ..errors import DataError
from .estimators import MMDEstimator, as_estimator
from .kernels import Kernel, as_kernel
from .two_sample import fdr_bh, permutation_test

#: Columns of the result table, in order.
COLUMNS = ["perturbation", "group", "n_cells", "n_control", "mmd2", "pvalue", "pvalue_adj"]

#: Value of the ``group`` column when no ``--group-by`` is given.
ALL_CELLS = "all"

#: Fewest cells a perturbation or a control set needs to be tested.
MIN_CELLS = 2

@dataclass(frozen=True, eq=False)
class Comparison:
    """One test: the rows of a perturbation's cells and of their control cells."""

    group: str
    perturbation: str
    cells: np.ndarray
    control: np.ndarray


def build_kernel(name: str, params: dict[str, Any]) -> Kernel:
    """The named kernel; one with a ``lengthscale`` parameter defaults to the median heuristic."""
    kernel = as_kernel(name, **params)
    if "lengthscale" not in params and "lengthscale" in inspect.signature(type(kernel)).parameters:
        kernel = as_kernel(name, lengthscale="median", **params)
    return kernel


def etest(
    adata: ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    control: str = "control",
    group_by: str | None = None,
    kernel: str | Kernel,
    estimator: str | MMDEstimator = "unbiased",
    permutations: int = 1000,
    seed: int = 0,
    max_cells: int | None = None,
    progress: Callable[[Iterable[Comparison]], Iterable[Comparison]] = iter,
) -> tuple[pd.DataFrame, list[str]]:
    """The result table (columns :data:`COLUMNS`, one row per test) and the warnings of skipped tests."""
    require_cells(adata)
    require_matrix(adata)
    require_genes(adata.var_names)
    require_obs_key(adata, perturbation_key, "perturbation key")
    if group_by is not None:
        require_obs_key(adata, group_by, "group-by key")
    require_label(adata, perturbation_key, control)
    require_finite(adata.X)
    kernel, estimator = as_kernel(kernel), as_estimator(estimator)
    comparisons, skipped = plan(adata, perturbation_key, control, group_by)
    rows = []
    for comparison in progress(comparisons):
        rows.append(_test(adata.X, comparison, kernel, estimator, permutations, seed, max_cells))
    table = pd.DataFrame(rows, columns=COLUMNS[:-1])
    table["pvalue_adj"] = fdr_bh(table["pvalue"].to_numpy())
    return table, skipped


def plan(
    adata: ad.AnnData, perturbation_key: str, control: str, group_by: str | None
) -> tuple[list[Comparison], list[str]]:
    """Every (group, perturbation) to test against its group's controls, and why others are left out."""
    labels = adata.obs[perturbation_key]
    groups = adata.obs[group_by] if group_by is not None else pd.Series(ALL_CELLS, index=adata.obs.index)
    skipped = []
    missing = labels.isna() | groups.isna()
    if missing.any():
        skipped.append(f"{int(missing.sum())} cells have no {perturbation_key!r}"
                       f"{'' if group_by is None else f' or {group_by!r}'} label; they are left out.")
    labels = labels.astype(str).to_numpy()
    groups = groups.astype(str).to_numpy()
    keep = ~missing.to_numpy()
    comparisons = []
    for group in sorted(set(groups[keep])):
        in_group = keep & (groups == group)
        control_rows = np.flatnonzero(in_group & (labels == control))
        perturbations = sorted(set(labels[in_group]) - {control})
        where = "" if group_by is None else f" in group {group!r}"
        if len(control_rows) < MIN_CELLS:
            if perturbations:
                skipped.append(
                    f"{len(control_rows)} control cells ({control!r}){where}; at least {MIN_CELLS} are "
                    f"needed, so its {len(perturbations)} perturbation(s) are not tested."
                )
            continue
        for perturbation in perturbations:
            rows = np.flatnonzero(in_group & (labels == perturbation))
            if len(rows) < MIN_CELLS:
                skipped.append(f"perturbation {perturbation!r}{where} has {len(rows)} cell; "
                               f"at least {MIN_CELLS} are needed, so it is not tested.")
                continue
            comparisons.append(Comparison(group, perturbation, rows, control_rows))
    if not comparisons:
        reasons = " ".join(skipped) or f"obs[{perturbation_key!r}] holds only {control!r}."
        raise DataError(f"Nothing to test: {reasons} Check --perturbation-key, --control and --group-by.")
    return comparisons, skipped


def _test(
    matrix: Any,
    comparison: Comparison,
    kernel: Kernel,
    estimator: MMDEstimator,
    permutations: int,
    seed: int,
    max_cells: int | None,
) -> list[Any]:
    """One result row: subsample, densify only the needed rows, run the permutation test."""
    tag = [zlib.crc32(comparison.group.encode()), zlib.crc32(comparison.perturbation.encode())]
    subsample_seed, test_seed = np.random.SeedSequence([seed, *tag]).spawn(2)
    rng = np.random.default_rng(subsample_seed)
    cells = _subsample(comparison.cells, max_cells, rng)
    control = _subsample(comparison.control, max_cells, rng)
    statistic, pvalue = permutation_test(
        _dense_rows(matrix, cells),
        _dense_rows(matrix, control),
        kernel,
        estimator,
        permutations=permutations,
        seed=int(test_seed.generate_state(1)[0]),
    )
    return [comparison.perturbation, comparison.group, len(cells), len(control), statistic, pvalue]


def _subsample(rows: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_cells`` of ``rows``, drawn without replacement, in increasing order."""
    if max_cells is None or len(rows) <= max_cells:
        return rows
    return np.sort(rng.choice(rows, size=max_cells, replace=False))


def _dense_rows(matrix: Any, rows: np.ndarray) -> torch.Tensor:
    """Rows of a dense or sparse matrix as a float64 tensor ``(len(rows), genes)``."""
    block = matrix[rows]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float64))
