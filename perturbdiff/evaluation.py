"""``perturbdiff.evaluate``: the metrics of a prediction against the real cells, like ``metrics.csv``.

The real AnnData may be the whole screen: it is cut to the prediction's genes, its conditions and
the control cells of their contexts, and normalised as the run reads it (``data.normalize``;
:func:`~perturbdiff_core.evaluation.real_subset.real_for`), so it matches what ``perturbdiff run``
evaluates against. The keys and the evaluation settings
come from the prediction's ``uns["perturbdiff"]`` (written by :meth:`PerturbDiff.predict
<perturbdiff.PerturbDiff.predict>`) unless given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anndata as ad
import pandas as pd

from perturbdiff_core.evaluation import compare
from perturbdiff_core.evaluation.real_subset import real_for

from .model import UNS_KEY

#: Settings when the prediction carries none (``perturbdiff evaluate``'s defaults).
DEFAULTS: dict[str, Any] = {
    "perturbation_key": "perturbation",
    "control_label": "control",
    "cell_type_key": None,
    "context_keys": None,
    "dose_key": None,
    "normalize": False,
    "kernel": "energy",
    "max_cells": 1000,
    "seed": 0,
}


def _settings(pred: ad.AnnData, given: Mapping[str, Any]) -> dict[str, Any]:
    stored = dict(pred.uns.get(UNS_KEY, {}))
    settings = {**DEFAULTS, **stored, **{k: v for k, v in given.items() if v is not None}}
    settings["cell_type_key"] = settings["cell_type_key"] or None  # "" in an h5ad stands for None
    settings["dose_key"] = settings["dose_key"] or None
    if settings["context_keys"] is None:
        settings["context_keys"] = [settings["cell_type_key"]] if settings["cell_type_key"] else []
    settings["context_keys"] = list(settings["context_keys"])
    return settings


def _condition_keys(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The keys that make a condition, as :func:`~perturbdiff_core.evaluation.evaluate` takes them (the settings'
    ``context_keys`` hold the cell type key too)."""
    cell_type = settings["cell_type_key"]
    return {
        "perturbation_key": settings["perturbation_key"], "control_label": settings["control_label"],
        "cell_type_key": cell_type, "context_keys": [k for k in settings["context_keys"] if k != cell_type],
        "dose_key": settings["dose_key"],
    }


def real_cells(pred: ad.AnnData, real: ad.AnnData, settings: Mapping[str, Any]) -> ad.AnnData:
    """``real`` cut to the conditions of ``pred`` (and the controls of their contexts) and its genes."""
    return real_for(pred, real, **_condition_keys(settings), normalize=settings["normalize"])


def evaluate(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    method: str = "model",
    perturbation_key: str | None = None,
    control_label: str | None = None,
    cell_type_key: str | None = None,
    kernel: str | None = None,
    max_cells: int | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Every metric of ``pred`` against ``real``: per condition and their mean (``condition == "__all__"``),
    long format (``condition, metric, method, value``), as ``metrics.csv``; notes in ``attrs["notes"]``.

    Example:
        >>> pred = model.predict()  # doctest: +SKIP
        >>> metrics = evaluate(pred, adata)  # doctest: +SKIP
        >>> metrics[metrics.condition == "__all__"].set_index("metric").value  # doctest: +SKIP
    """
    given = {"perturbation_key": perturbation_key, "control_label": control_label, "cell_type_key": cell_type_key,
             "kernel": kernel, "max_cells": max_cells, "seed": seed}
    settings = _settings(pred, given)
    return compare(
        {method: pred},
        real_cells(pred, real, settings),
        **_condition_keys(settings),
        kernel=settings["kernel"],
        max_cells=int(settings["max_cells"]),
        seed=int(settings["seed"]),
        progress=progress,
    )
