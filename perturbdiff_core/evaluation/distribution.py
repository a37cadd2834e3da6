"""Distribution metrics: kernel MMD between cell populations, and population variability.

Population variability tests the paper's claim that a condition is a distribution over
distributions: the mean MMD^2 between independently sampled predicted populations of a
condition is compared with the mean MMD^2 between its real replicate populations (batches,
donors). A ratio near 1 is right; near 0 (or below) the model returns one population every
time; far above 1 it is more scattered than reality.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from ..estimators import MMDEstimator
from ..functional import mmd2
from ..kernels import Kernel


def subsample(cells: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_cells`` rows of ``cells``, drawn without replacement (all of them if fewer)."""
    if cells.shape[0] <= max_cells:
        return cells
    return cells[np.sort(rng.choice(cells.shape[0], max_cells, replace=False))]


def population_mmd2(x: np.ndarray, y: np.ndarray, kernel: Kernel, estimator: MMDEstimator) -> float:
    """MMD^2 between two cell populations ``(n, G)`` and ``(m, G)``, in float64."""
    pair = torch.from_numpy(x)[None], torch.from_numpy(y)[None]  # a batch of one pair of sets
    with torch.no_grad():
        value = mmd2(*pair, kernel=kernel, estimator=estimator)
    return float(value[0])


def mean_pairwise_mmd2(populations: list[np.ndarray], kernel: Kernel, estimator: MMDEstimator) -> float:
    """Mean MMD^2 over all pairs of ``populations`` (at least two)."""
    return float(np.mean([population_mmd2(a, b, kernel, estimator) for a, b in combinations(populations, 2)]))


def population_variability(
    pred_populations: list[np.ndarray],
    real_populations: list[np.ndarray],
    kernel: Kernel,
    estimator: MMDEstimator,
    min_cells: int = 2,
) -> tuple[dict[str, float], str | None]:
    """``{"pred", "real", "ratio"}`` mean pairwise MMD^2 among predicted draws, among real replicates.

    Populations with fewer than ``min_cells`` cells are left out. Returns NaN values and the
    reason when either side has fewer than two populations, or the ratio alone is NaN (with
    its reason) when the real replicates are indistinguishable (MMD^2 <= 0).
    """
    nan = float("nan")
    pred = [p for p in pred_populations if p.shape[0] >= min_cells]
    real = [p for p in real_populations if p.shape[0] >= min_cells]
    for side, pops in (("real", real), ("predicted", pred)):
        if len(pops) < 2:
            return {"pred": nan, "real": nan, "ratio": nan}, (
                f"NaN, only {len(pops)} {side} population(s) with at least {min_cells} cells, 2 needed"
            )
    between_pred = mean_pairwise_mmd2(pred, kernel, estimator)
    between_real = mean_pairwise_mmd2(real, kernel, estimator)
    if between_real <= 0:
        return {"pred": between_pred, "real": between_real, "ratio": nan}, (
            "ratio NaN, the real replicates are indistinguishable (MMD^2 <= 0)"
        )
    return {"pred": between_pred, "real": between_real, "ratio": between_pred / between_real}, None
