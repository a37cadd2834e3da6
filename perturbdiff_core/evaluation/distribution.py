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

from ..mmd.estimators import MMDEstimator
from ..mmd.functional import mmd2
from ..mmd.kernels import Kernel


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


def population_calibration(
    pred_populations: list[np.ndarray],
    real_population: np.ndarray,
    kernel: Kernel,
    estimator: MMDEstimator,
    rng: np.random.Generator,
) -> float:
    r"""Conformal p-value of a real population among ``K`` predicted ones of the same condition.

    Each population is compared with the centre of the predictions it is not part of: predicted
    population :math:`k` with the pool of the other :math:`K-1`, :math:`d_k = \mathrm{MMD}^2(P_k,
    \bar P_{-k})`, and the real one with each of those pools, :math:`d = \mathrm{mean}_k\,
    \mathrm{MMD}^2(R, \bar P_{-k})`. Every predicted population is first cut to the real one's size
    (pools to the same size) so all distances have the same sampling noise. The p-value is
    :math:`(1 + \#\{k: d_k \ge d\}) / (K + 1)`: uniform when the real population is one more draw
    of the model's distribution over populations, small when it lies outside their spread.
    """
    if len(pred_populations) < 2:
        raise ValueError("population_calibration needs at least two predicted populations.")
    size = real_population.shape[0]
    pops = [subsample(p, size, rng) for p in pred_populations]
    pools = [subsample(np.concatenate(pops[:k] + pops[k + 1:]), size, rng) for k in range(len(pops))]
    spread = np.array([population_mmd2(p, pool, kernel, estimator) for p, pool in zip(pops, pools)])
    real = float(np.mean([population_mmd2(real_population, pool, kernel, estimator) for pool in pools]))
    return float((1 + np.sum(spread >= real)) / (len(pops) + 1))
