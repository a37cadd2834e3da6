"""``perturbdiff.evaluate``: the metrics of a prediction against the real cells, like ``metrics.csv``.

The real AnnData may be the whole screen: it is cut to the prediction's genes, its conditions and
the control cells of their contexts, and normalised as the run reads it (``data.normalize``),
so it matches what ``perturbdiff run`` evaluates against. The keys and the evaluation settings
come from the prediction's ``uns["perturbdiff"]`` (written by :meth:`PerturbDiff.predict
<perturbdiff.PerturbDiff.predict>`) unless given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbdiff_core.data.anndata_io import normalize_rows
from perturbdiff_core.errors import InputError
from perturbdiff_core.evaluation import compare

from .model import UNS_KEY

#: Settings when the prediction carries none (``perturbdiff evaluate``'s defaults).
DEFAULTS: dict[str, Any] = {
    "perturbation_key": "perturbation",
    "control_label": "control",
    "cell_type_key": None,
    "context_keys": None,
    "normalize": False,
    "kernel": "energy",
    "max_cells": 1000,
    "seed": 0,
}


def _settings(pred: ad.AnnData, given: Mapping[str, Any]) -> dict[str, Any]:
    stored = dict(pred.uns.get(UNS_KEY, {}))
    settings = {**DEFAULTS, **stored, **{k: v for k, v in given.items() if v is not None}}
    settings["cell_type_key"] = settings["cell_type_key"] or None  # "" in an h5ad stands for None
    if settings["context_keys"] is None:
        settings["context_keys"] = [settings["cell_type_key"]] if settings["cell_type_key"] else []
    settings["context_keys"] = list(settings["context_keys"])
    return settings


def _rows(obs: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One hashable tuple per cell of the values of ``keys``."""
    if not keys:
        return pd.Series([()] * len(obs), index=obs.index)
    return pd.Series(list(zip(*(obs[k].astype(str) for k in keys))), index=obs.index)


def real_cells(pred: ad.AnnData, real: ad.AnnData, settings: Mapping[str, Any]) -> ad.AnnData:
    """``real`` cut to the conditions of ``pred`` (and the controls of their contexts) and its genes."""
    perturbation, control = settings["perturbation_key"], settings["control_label"]
    contexts = settings["context_keys"]
    for key in [perturbation, *contexts]:
        if key not in real.obs or key not in pred.obs:
            raise InputError(f"obs has no column {key!r} in both the prediction and the real cells; pass the keys.")
    missing = pred.var_names.difference(real.var_names)
    if len(missing):
        raise InputError(
            f"{len(missing)} of the prediction's genes are not in the real cells, e.g. {', '.join(missing[:5])}; "
            f"give the AnnData the model was trained on."
        )
    is_control = (pred.obs[perturbation].astype(str) == control).to_numpy()
    wanted = set(_rows(pred.obs.assign(_p=pred.obs[perturbation].astype(str)), ["_p", *contexts])[~is_control])
    context_of_controls = set(_rows(pred.obs, contexts)[is_control])
    real_perturbation = real.obs[perturbation].astype(str)
    real_control = (real_perturbation == control).to_numpy()
    condition = _rows(real.obs.assign(_p=real_perturbation), ["_p", *contexts]).isin(wanted).to_numpy()
    context = _rows(real.obs, contexts).isin(context_of_controls).to_numpy()
    keep = (condition & ~real_control) | (context & real_control)
    matrix = real.X[keep]
    if settings["normalize"]:
        matrix = normalize_rows(matrix)  # over all genes, as the run reads them
    columns = real.var_names.get_indexer(pred.var_names)
    matrix = matrix[:, columns]
    matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return ad.AnnData(
        X=np.ascontiguousarray(matrix, dtype=np.float32),  # the run's reader gives float32
        obs=real.obs.loc[keep, [perturbation, *contexts]].copy(),
        var=pd.DataFrame(index=pred.var_names.copy()),
    )


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
        perturbation_key=settings["perturbation_key"],
        control_label=settings["control_label"],
        cell_type_key=settings["cell_type_key"],
        kernel=settings["kernel"],
        max_cells=int(settings["max_cells"]),
        seed=int(settings["seed"]),
        progress=progress,
    )
