"""The model against its baselines: one metrics table for all methods, and who wins where.

:func:`compare` evaluates every prediction against the same real data (long format, the
``method`` column naming each); :func:`versus_best_baseline` and :func:`summary_line` compare
the model's aggregate (``__all__``) values with the best baseline per metric, "best" meaning
closest to the metric's best value in :data:`~perturbdiff_core.evaluation.definitions.DEFINITIONS`
(1 for correlations and scores, 0 for errors and MMD, 1 for a variability ratio), in the metric's
direction: an unbiased MMD^2 estimate below 0 is better than one above it
(:meth:`~perturbdiff_core.evaluation.definitions.MetricDefinition.gap`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..data.anndata_io import read_anndata
from ..errors import InputError
from ..mmd.estimators import MMDEstimator
from ..mmd.kernels import Kernel
from .de import FDR_THRESHOLD
from .definitions import DEFINITIONS, MetricDefinition
from .metrics import ALL_CONDITIONS, COLUMNS, evaluate

#: Outcomes of the model against the best baseline on one metric.
OUTCOMES = ("beats", "loses", "ties")


def definition_of(metric: str) -> MetricDefinition | None:
    """The definition of a metric name (``mmd2_rbf`` finds ``mmd2_{kernel}``); ``None`` if unknown."""
    if metric in DEFINITIONS:
        return DEFINITIONS[metric]
    for key, definition in DEFINITIONS.items():
        if "{kernel}" in key:
            head, tail = key.split("{kernel}")
            if metric.startswith(head) and metric.endswith(tail) and len(metric) > len(head) + len(tail):
                return definition
    return None


def compare(
    predictions: Mapping[str, ad.AnnData | str | os.PathLike[str]],
    real: ad.AnnData | str | os.PathLike[str],
    *,
    perturbation_key: str = "perturbation",
    control_label: str = "control",
    cell_type_key: str | None = None,
    context_keys: Sequence[str] = (),
    dose_key: str | None = None,
    replicate_key: str | None = None,
    kernel: str | Kernel = "energy",
    kernel_name: str | None = None,
    estimator: str | MMDEstimator = "unbiased",
    max_cells: int = 1000,
    fdr_threshold: float = FDR_THRESHOLD,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Metrics of every prediction (method name -> AnnData or path) against ``real``, one long table.

    Each prediction is evaluated by :func:`~perturbdiff_core.evaluation.evaluate` with the same
    arguments and seed, so differences between methods are differences between predictions.
    ``attrs["notes"]`` holds each note once; a note that not every method shares names its method.
    ``progress`` shows each method's conditions done on stderr.

    Example:
        >>> table = compare({"model": pred, "control": control_pred}, real)  # doctest: +SKIP
        >>> summary_line(table)  # doctest: +SKIP
    """
    if not predictions:
        raise InputError("No predictions to compare; pass a mapping of method name -> predicted AnnData.")
    for method in predictions:
        if not isinstance(method, str) or not method or method == ALL_CONDITIONS:
            raise InputError(f"Method names must be non-empty strings other than {ALL_CONDITIONS!r}, got {method!r}.")
    real = read_anndata(real)
    tables = {
        method: evaluate(
            pred,
            real,
            perturbation_key=perturbation_key,
            control_label=control_label,
            cell_type_key=cell_type_key,
            context_keys=context_keys,
            dose_key=dose_key,
            replicate_key=replicate_key,
            method=method,
            kernel=kernel,
            kernel_name=kernel_name,
            estimator=estimator,
            max_cells=max_cells,
            fdr_threshold=fdr_threshold,
            seed=seed,
            progress=progress,
        )
        for method, pred in predictions.items()
    }
    out = pd.concat(list(tables.values()), ignore_index=True)
    notes: dict[str, list[str]] = {}
    for method, table in tables.items():
        for note in table.attrs.get("notes", []):
            notes.setdefault(note, []).append(method)
    out.attrs["notes"] = [
        note if len(methods) == len(tables) else f"{', '.join(methods)}: {note}" for note, methods in notes.items()
    ]
    return out


def aggregate(metrics: pd.DataFrame) -> pd.DataFrame:
    """The ``__all__`` rows as a metric x method table (metrics in table order)."""
    missing = [c for c in COLUMNS if c not in metrics.columns]
    if missing:
        raise InputError(
            f"The metrics table lacks column(s) {', '.join(missing)}; pass the long-format output of "
            f"evaluate or compare (columns {', '.join(COLUMNS)})."
        )
    rows = metrics[metrics.condition == ALL_CONDITIONS]
    if rows.empty:
        raise InputError(f"The metrics table has no {ALL_CONDITIONS!r} rows; pass the output of evaluate or compare.")
    if rows.duplicated(["metric", "method"]).any():
        raise InputError("The metrics table repeats a (metric, method) pair; give each method a distinct name.")
    wide = rows.pivot(index="metric", columns="method", values="value")
    return wide.loc[rows.metric.unique(), rows.method.unique()]


def _gaps(values: pd.Series, metric: str) -> pd.Series | None:
    """:meth:`~perturbdiff_core.evaluation.definitions.MetricDefinition.gap` per method (NaN dropped);
    ``None`` for a metric without a direction."""
    definition = definition_of(metric)
    if definition is None or definition.best is None:
        return None
    return definition.gap(values.astype(float)).dropna()


def _tie(a: float, b: float) -> bool:
    return bool(np.isclose(a, b, rtol=1e-9, atol=1e-12))


def best_methods(values: pd.Series, metric: str) -> list[str]:
    """The methods (index of ``values``) closest to the metric's best value, ties included."""
    gaps = _gaps(values, metric)
    if gaps is None or gaps.empty:
        return []
    return [str(m) for m, gap in gaps.items() if _tie(gap, gaps.min())]


def versus_best_baseline(metrics: pd.DataFrame, model: str = "model") -> pd.DataFrame:
    """Per directional metric: the model's value, the best baseline and its value, and the outcome.

    Columns ``metric, model, baseline, baseline_value, outcome`` (one of :data:`OUTCOMES`); a
    metric where the model or every baseline is NaN is left out. Ties are equal to 1e-9.
    """
    wide = aggregate(metrics)
    if model not in wide.columns:
        raise InputError(f"No method {model!r} in the metrics table; methods: {', '.join(map(str, wide.columns))}.")
    baselines = [m for m in wide.columns if m != model]
    rows = []
    for metric, values in wide.iterrows():
        mine, theirs = _gaps(values[[model]], str(metric)), _gaps(values[baselines], str(metric))
        if mine is None or mine.empty or theirs.empty:
            continue
        best = str(theirs.idxmin())
        if _tie(mine[model], theirs[best]):
            outcome = "ties"
        else:
            outcome = "beats" if mine[model] < theirs[best] else "loses"
        rows.append((metric, float(values[model]), best, float(values[best]), outcome))
    return pd.DataFrame(rows, columns=["metric", "model", "baseline", "baseline_value", "outcome"])


def summary_line(metrics: pd.DataFrame, model: str = "model") -> str:
    """One sentence: the metrics on which the model beats the best baseline, loses (to whom) and ties."""
    table = versus_best_baseline(metrics, model)
    who = "The model" if model == "model" else f"The model ({model})"
    if table.empty:
        return f"{who} has no baseline to compare with on any metric."
    parts = {outcome: table[table.outcome == outcome] for outcome in OUTCOMES}
    beats = ", ".join(parts["beats"].metric) or "no metric"
    loses = ", ".join(f"{r.metric} (to {r.baseline})" for r in parts["loses"].itertuples()) or "no metric"
    line = f"{who} beats the best baseline on {beats}; loses on {loses}"
    if len(parts["ties"]):
        line += f"; ties on {', '.join(parts['ties'].metric)}"
    return line + "."
