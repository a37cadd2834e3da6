"""Pseudobulk metrics: compare the mean expression (log1p) of a predicted and a real condition.

The delta of a condition is its mean minus the mean of its control cells, each side against its
own control (cell-eval's ``perturbation_effect``): the prediction file carries the control cells.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def log2_fold_change(mean: np.ndarray, control_mean: np.ndarray) -> np.ndarray:
    r"""Fold change of geometric means from log1p means :math:`\log_2(\mathrm{expm1}(m)/\mathrm{expm1}(m_0))`.

    pdex's (and so cell-eval's) definition on log1p data: ``expm1`` of a mean of log1p values is
    the geometric mean of ``1 + counts`` minus one. ``0/0`` is 0 (no change); ``x/0`` is ``inf``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(mean) / np.expm1(control_mean))
    return np.where(np.isnan(lfc), 0.0, lfc)


def correlation(kind: str, a: np.ndarray, b: np.ndarray) -> float:
    """Pearson or Spearman correlation of two vectors; NaN when either is constant or too short."""
    if a.size < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = stats.pearsonr(a, b) if kind == "pearson" else stats.spearmanr(a, b)
    return float(result.statistic)


def pseudobulk_metrics(
    pred_mean: np.ndarray, real_mean: np.ndarray, pred_control: np.ndarray, real_control: np.ndarray
) -> dict[str, float]:
    """Per-condition metrics of the means and of the deltas (see ``DEFINITIONS``)."""
    pred_delta, real_delta = pred_mean - pred_control, real_mean - real_control
    residual = pred_mean - real_mean
    spread = np.sum((real_mean - real_mean.mean()) ** 2)
    return {
        "pearson_delta": correlation("pearson", pred_delta, real_delta),
        "mse": float(np.mean(residual**2)),
        "mae": float(np.mean(np.abs(residual))),
        "mse_delta": float(np.mean((pred_delta - real_delta) ** 2)),
        "mae_delta": float(np.mean(np.abs(pred_delta - real_delta))),
        "r2": float(1.0 - np.sum(residual**2) / spread) if spread > 0 else float("nan"),
        "spearman_lfc": correlation(
            "spearman", log2_fold_change(pred_mean, pred_control), log2_fold_change(real_mean, real_control)
        ),
    }
