"""Pair a predicted and a real AnnData for evaluation, checking every input rule first.

Rules (each broken one raises a :class:`~perturbdiff_core.errors.DataError` before any metric
is computed): both files hold the perturbation key (and the context, dose and replicate keys when
given); the control label occurs in both, in every context that has a condition; both hold
the same genes without duplicates (the same set in a different order is reordered to the real
order: the metrics do not depend on order, so refusing it would only make users reorder by
hand); both hold the same conditions; values are finite log1p expression (non-negative, below
20, not whole numbers only). A condition is a perturbation (at one dose, ``perturbation@dose``, with a
dose key) in one context: the values of the cell-type key and the further context keys (batch,
covariates), labelled ``perturbation|cell_type|batch...`` as the data's own condition label
(``split.json``, ``predict --conditions``). Each condition is compared with the control cells of
its own context. A replicate key is not part of the context: its values are populations of one
condition (donors, batches), pooled by every metric but population variability and calibration.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.anndata_io import (
    MAX_LOG1P,
    CellMatrix,
    require_label,
    require_obs_key,
    require_unique_genes,
    summarize_values,
)
from ..data.dataset import LABEL_SEPARATOR
from ..errors import DataError, PerturbDiffDeprecationWarning
from .predictors import POPULATION_KEY


@dataclass(frozen=True)
class EvaluatedCondition:
    """One evaluated condition: a perturbation (``name@dose`` with a dose key) in one context.

    Not :class:`perturbdiff_core.data.dataset.Condition` (which also knows its dose as a number and its
    cell count), but the same label: ``perturbation`` or ``perturbation|context``, the context being
    the values of the cell-type and further context keys joined by ``|`` (``None`` without such keys).
    """

    perturbation: str
    context: str | None

    @property
    def name(self) -> str:
        """The label in the metrics table and the report: ``perturbation`` or ``perturbation|context``."""
        return self.perturbation if self.context is None else LABEL_SEPARATOR.join([self.perturbation, self.context])


def __getattr__(name: str) -> type[EvaluatedCondition]:
    """``Condition``, this class's name before it was renamed apart from the data layer's, with a warning."""
    if name == "Condition":
        warnings.warn(
            "perturbdiff_core.evaluation.paired.Condition is renamed EvaluatedCondition (the data layer has its "
            "own Condition); the old name is removed in a later release.",
            PerturbDiffDeprecationWarning,
            stacklevel=2,
        )
        return EvaluatedCondition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Side:
    """One AnnData reduced to what the metrics read: the matrix and row indices per population.

    ``rows`` are the cells the metrics compare (of a prediction with several sampled populations,
    the first one); ``populations`` the row indices of each population of a condition (replicates
    of the real data, sampled populations of a prediction), empty without them; ``sampled`` says
    they are independent draws of a prediction (its :data:`POPULATION_KEY` column).
    """

    matrix: np.ndarray | sp.csr_matrix
    rows: dict[EvaluatedCondition, np.ndarray]
    control_rows: dict[str | None, np.ndarray]  # by context label
    populations: dict[EvaluatedCondition, list[np.ndarray]]
    sampled: bool = False

    def cells(self, condition: EvaluatedCondition) -> np.ndarray:
        """Dense float64 ``(cells, genes)`` expression of ``condition``."""
        return _dense(self.matrix[self.rows[condition]])

    def control(self, context: str | None) -> np.ndarray:
        """Dense float64 ``(cells, genes)`` expression of the control cells of ``context`` (its label)."""
        return _dense(self.matrix[self.control_rows[context]])

    def replicate_populations(self, condition: EvaluatedCondition) -> list[np.ndarray]:
        """The cells of ``condition`` split by population (sorted by label); ``[]`` without populations."""
        return [_dense(self.matrix[rows]) for rows in self.populations.get(condition, [])]


@dataclass(frozen=True)
class PairedData:
    """A validated prediction/real pair on the same genes (real order) and the same conditions."""

    genes: np.ndarray
    conditions: list[EvaluatedCondition]
    pred: Side
    real: Side


def pair_anndata(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    control_label: str = "control",
    cell_type_key: str | None = None,
    context_keys: Sequence[str] = (),
    dose_key: str | None = None,
    replicate_key: str | None = None,
) -> PairedData:
    """Check ``pred`` and ``real`` against the input rules and index their populations.

    A condition's context is its values of ``cell_type_key`` and ``context_keys`` (batch, covariates), its
    perturbation named ``perturbation@dose`` where ``dose_key`` holds a dose (module docstring).
    Populations: the real data's by ``replicate_key``; the prediction's by its ``population``
    column (:data:`~perturbdiff_core.evaluation.predictors.POPULATION_KEY`, written by ``predict
    --populations K``) when it has one, else by ``replicate_key``. The metrics other than
    population variability and calibration read the prediction's first population.
    """
    keys = [k for k in (cell_type_key, *context_keys) if k is not None]
    if replicate_key is not None and replicate_key in keys:
        raise DataError(
            f"{replicate_key!r} is both the replicate key and a context key: a context is compared with its own "
            f"control cells, replicates are populations of one condition. Give it as one or the other."
        )
    for which, adata in (("prediction", pred), ("real data", real)):
        require_obs_key(adata, perturbation_key, f"perturbation key, in the {which}")
        for key in keys:
            require_obs_key(adata, key, f"context key, in the {which}")
        for key, role in ((dose_key, "dose"), (replicate_key, "replicate")):
            if key is not None:
                require_obs_key(adata, key, f"{role} key, in the {which}")
        require_label(adata, perturbation_key, control_label, f"in the {which}")
    order = _gene_order(pred, real)
    pred_labels = _labels(pred, perturbation_key, control_label, keys, dose_key)
    real_labels = _labels(real, perturbation_key, control_label, keys, dose_key)
    conditions = _same_conditions(pred_labels, real_labels, control_label)
    contexts = {c.context for c in conditions}
    sides = []
    for which, adata, labels, cols in (
        ("prediction", pred, pred_labels, order),
        ("real data", real, real_labels, None),
    ):
        matrix = _matrix(adata, which, cols)
        rows = {c: np.flatnonzero((labels[0] == c.perturbation) & (labels[1] == _str(c.context))) for c in conditions}
        key = POPULATION_KEY if which == "prediction" and POPULATION_KEY in adata.obs else replicate_key
        populations = {} if key is None else _populations(adata.obs[key], rows)
        if key == POPULATION_KEY:
            rows = {c: pops[0] for c, pops in populations.items()}
        control_rows = {}
        for context in contexts:
            found = np.flatnonzero((labels[0] == control_label) & (labels[1] == _str(context)))
            if found.size == 0:
                raise DataError(
                    f"The {which} has no {control_label!r} cells in context {context!r} "
                    f"({' | '.join(keys)}); every context with a condition needs its control cells in both files."
                )
            control_rows[context] = found
        sides.append(Side(matrix, rows, control_rows, populations, sampled=key == POPULATION_KEY))
    return PairedData(real.var_names.to_numpy(dtype=str), conditions, sides[0], sides[1])


def _populations(column: pd.Series, rows: dict[EvaluatedCondition, np.ndarray]) -> dict[EvaluatedCondition, list[np.ndarray]]:
    """The rows of each condition split by the labels of ``column``, labels in natural order (``2`` before ``10``)."""
    labels = column.astype(str).to_numpy()
    out = {}
    for condition, found in rows.items():
        values = sorted(np.unique(labels[found]), key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
        out[condition] = [found[labels[found] == v] for v in values]
    return out


def _str(context: str | None) -> str:
    return "" if context is None else context


def _labels(
    adata: ad.AnnData, perturbation_key: str, control_label: str, context_keys: Sequence[str], dose_key: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per cell its perturbation's name (``name@dose`` where ``dose_key`` holds a dose) and its context label."""
    perts = adata.obs[perturbation_key].astype(str).to_numpy().astype(object)
    if dose_key is not None:
        doses = pd.to_numeric(adata.obs[dose_key], errors="coerce").to_numpy(dtype=float)
        dosed = (perts != control_label) & np.isfinite(doses)
        perts[dosed] = [f"{p}@{d:g}" for p, d in zip(perts[dosed], doses[dosed], strict=True)]
    if not context_keys:
        return perts, np.full(perts.shape, "", dtype=object)
    parts = [adata.obs[key].astype(str).to_numpy() for key in context_keys]
    if len(parts) == 1:
        return perts, parts[0]
    return perts, np.array([LABEL_SEPARATOR.join(values) for values in zip(*parts, strict=True)], dtype=object)


def _same_conditions(
    pred_labels: tuple[np.ndarray, np.ndarray], real_labels: tuple[np.ndarray, np.ndarray], control_label: str
) -> list[EvaluatedCondition]:
    def found(labels: tuple[np.ndarray, np.ndarray]) -> set[EvaluatedCondition]:
        return {
            EvaluatedCondition(p, t or None) for p, t in set(zip(*labels, strict=True)) if p != control_label
        }

    in_pred, in_real = found(pred_labels), found(real_labels)
    if in_pred != in_real:
        parts = []
        for side, missing in (("prediction", in_real - in_pred), ("real data", in_pred - in_real)):
            if missing:
                names = sorted(c.name for c in missing)
                parts.append(f"missing from the {side}: {', '.join(names[:10])}" + (" ..." if len(names) > 10 else ""))
        raise DataError(
            f"Prediction and real data hold different conditions ({'; '.join(parts)}). "
            f"Subset both files to the same held-out conditions."
        )
    if not in_real:
        raise DataError(f"No condition other than the control label {control_label!r}; nothing to evaluate.")
    return sorted(in_real, key=lambda c: (_str(c.context), c.perturbation))


def _gene_order(pred: ad.AnnData, real: ad.AnnData) -> np.ndarray | None:
    """Columns of ``pred`` in the real gene order (``None`` when already identical)."""
    for adata in (pred, real):
        require_unique_genes(adata.var_names)
    if pred.var_names.equals(real.var_names):
        return None
    only_pred = pred.var_names.difference(real.var_names)
    only_real = real.var_names.difference(pred.var_names)
    if len(only_pred) or len(only_real):
        raise DataError(
            f"Prediction and real data have different genes ({len(only_pred)} only in the prediction, "
            f"e.g. {only_pred[:3].tolist()}; {len(only_real)} only in the real data, e.g. "
            f"{only_real[:3].tolist()}). Predict on exactly the genes of the real data."
        )
    return pred.var_names.get_indexer(real.var_names)


def _matrix(adata: ad.AnnData, which: str, columns: np.ndarray | None) -> np.ndarray | sp.csr_matrix:
    """``X`` as float64 CSR or ndarray (columns reordered if asked), checked to be log1p values."""
    x = adata.X
    if x is None:
        raise DataError(f"The {which} has no expression matrix X.")
    x = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    if columns is not None:
        x = x[:, columns]
    values = summarize_values(CellMatrix(x))
    if not values.finite:
        raise DataError(f"X of the {which} contains NaN or Inf values; remove or impute them first.")
    if values.minimum < 0:
        raise DataError(
            f"X of the {which} has negative values (min {values.minimum:.3g}); log1p expression is "
            f"non-negative: clip predictions at 0."
        )
    if values.maximum >= MAX_LOG1P or (values.integer and values.maximum > 1):
        raise DataError(
            f"X of the {which} does not look like log1p expression (maximum {values.maximum:.3g}"
            f"{', whole numbers only: raw counts?' if values.integer else ''}); the metrics compare "
            f"log1p-normalised values: normalise and log1p-transform it first."
        )
    return x


def _dense(x: np.ndarray | sp.spmatrix) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)
