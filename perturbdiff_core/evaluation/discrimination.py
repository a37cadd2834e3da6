r"""Perturbation discrimination: does a predicted delta sit closest to its own real delta?

For condition :math:`i` among :math:`n`, with predicted deltas :math:`\hat d_i` and real deltas
:math:`d_j`, the score is :math:`1 - |\{j : D(\hat d_i, d_j) < D(\hat d_i, d_i)\}| / n`
(cell-eval's normalised rank): 1 when the true condition is the nearest, about 0.5 by chance.
Genes named like the perturbation (its target) are left out of the distances, as in cell-eval.
"""

from __future__ import annotations

import numpy as np

#: Distances on deltas: the names are cell-eval's metric suffixes.
DISTANCES = ("l1", "l2", "cosine")


def distances(query: np.ndarray, targets: np.ndarray, metric: str) -> np.ndarray:
    """Distance from ``query`` ``(G,)`` to every row of ``targets`` ``(n, G)``.

    ``cosine`` is :math:`1 - \\cos`, with a zero vector counted as orthogonal to everything
    (scikit-learn's convention, which cell-eval uses).
    """
    diff = targets - query
    if metric == "l1":
        return np.abs(diff).sum(-1)
    if metric == "l2":
        return np.sqrt((diff**2).sum(-1))
    if metric == "cosine":
        norm_q = np.linalg.norm(query) or 1.0
        norm_t = np.linalg.norm(targets, axis=-1)
        return 1.0 - (targets @ query) / (np.where(norm_t > 0, norm_t, 1.0) * norm_q)
    raise ValueError(f"Unknown distance {metric!r}; use one of {DISTANCES}.")


def discrimination_scores(
    pred_deltas: np.ndarray, real_deltas: np.ndarray, metric: str, include: np.ndarray | None = None
) -> np.ndarray:
    """Normalised rank score of each of ``n`` conditions, from ``(n, G)`` predicted and real deltas.

    ``include`` ``(n, G)`` optionally marks, per condition, the genes its distances use.
    """
    n = real_deltas.shape[0]
    scores = np.empty(n)
    for i in range(n):
        genes = slice(None) if include is None else include[i]
        d = distances(pred_deltas[i, genes], real_deltas[:, genes], metric)
        scores[i] = 1.0 - np.count_nonzero(d < d[i]) / n
    return scores
