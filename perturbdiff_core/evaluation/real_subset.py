"""The real cells a prediction is scored against, cut from a whole screen.

A prediction holds some conditions on the model's genes; the real AnnData may be the whole screen. It is
cut to the prediction's genes, its conditions (perturbation, context and dose) and the control cells of
their contexts, and normalised as a run reads it (``data.normalize``), so that ``perturbdiff evaluate``
and :func:`perturbdiff.evaluate` score what ``perturbdiff run`` scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.anndata_io import normalize_rows
from ..errors import InputError


def _rows(obs: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """One hashable tuple per cell of the values of ``keys``."""
    if not keys:
        return pd.Series([()] * len(obs), index=obs.index)
    return pd.Series(list(zip(*(obs[k].astype(str) for k in keys), strict=True)), index=obs.index)


def real_for(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str,
    control_label: str,
    cell_type_key: str | None = None,
    context_keys: Sequence[str] = (),
    dose_key: str | None = None,
    normalize: bool = False,
) -> ad.AnnData:
    """``real`` cut to the conditions of ``pred`` (perturbation, values of the cell-type and context keys, dose), the
    control cells of their contexts and ``pred``'s genes in its order; raw counts normalised with ``normalize``.
    The keys are :func:`~perturbdiff_core.evaluation.evaluate`'s."""
    context_keys = [k for k in (cell_type_key, *context_keys) if k is not None]
    keys = [*context_keys, *([dose_key] if dose_key is not None else [])]
    for key in [perturbation_key, *keys]:
        if key not in real.obs or key not in pred.obs:
            raise InputError(f"obs has no column {key!r} in both the prediction and the real cells; pass the keys.")
    missing = pred.var_names.difference(real.var_names)
    if len(missing):
        raise InputError(
            f"{len(missing)} of the prediction's genes are not in the real cells, e.g. {', '.join(missing[:5])}; "
            f"give the AnnData the model was trained on."
        )
    is_control = (pred.obs[perturbation_key].astype(str) == control_label).to_numpy()
    wanted = set(_rows(pred.obs.assign(_p=pred.obs[perturbation_key].astype(str)), ["_p", *keys])[~is_control])
    context_of_controls = set(_rows(pred.obs, context_keys)[is_control])
    real_perturbation = real.obs[perturbation_key].astype(str)
    real_control = (real_perturbation == control_label).to_numpy()
    condition = _rows(real.obs.assign(_p=real_perturbation), ["_p", *keys]).isin(wanted).to_numpy()
    context = _rows(real.obs, context_keys).isin(context_of_controls).to_numpy()
    keep = (condition & ~real_control) | (context & real_control)
    matrix = real.X[keep]
    if normalize:
        matrix = normalize_rows(matrix)  # over all genes, as the run reads them
    matrix = matrix[:, real.var_names.get_indexer(pred.var_names)]
    matrix = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    return ad.AnnData(
        X=np.ascontiguousarray(matrix, dtype=np.float32),  # the run's reader gives float32
        obs=real.obs.loc[keep].copy(),  # every column: a replicate key too
        var=pd.DataFrame(index=pred.var_names.copy()),
    )
