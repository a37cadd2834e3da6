r"""``sample.anchor_shrinkage`` and ``sample.ensemble_shrinkage``: shifts into a context training lacked, shrunk by their noise.

The anchor (``model.anchor``) and the ensemble (``sample.ensemble``) predict a new context's response
from the training contexts' shifts, so each carries those shifts' sampling noise. Where training
conditions have few cells, much of a small shift is noise: kang18 with a tenth of the training cells
(held-out NK cells, seed 0), ``context_mixture`` gave NK cells the rises 5 stimulated CD8+ T cells show
at one standard error (SMG6 +0.44, LYZ +0.40, CCL2 +0.32; real 0.00, -0.02, +0.01). In a context
training lacked, each gene's shift :math:`s` with standard error :math:`e` (the predictor's
:meth:`~perturbdiff_core.evaluation.predictors.Predictor.shift_standard_error`; a plug-in without one
is not shrunk) is scaled at :math:`k` standard errors (the setting):

- the ensemble's by Breiman's non-negative garrote :math:`\max(0, 1 - (k e / s)^2)` (:func:`garrote`):
  a shift the training cells cannot tell from no change counts for nothing, a clear one almost fully;
- the anchor's by the normal posterior-mean factor :math:`s^2 / (s^2 + (k e)^2)` (:func:`wiener`),
  never 0: the anchor is the shift a gene keeps where the model adds nothing significant, so every
  gene keeps its rank (garrotted too: 42 rather than 44 of the 63 pairs below). The model's samples move with it.

A new combination in a trained context is never shrunk: its parts' small shifts, measured in
hundreds of cells, add up (the combinations' folds: 17 → 14 of 23 pairs garrotted).

``auto`` (the default of both) shrinks at 1 standard error where the median perturbed training
condition has fewer than :data:`FEW_CELLS` (30) cells, and not at all otherwise. Measured on the
suite's runs and its checks, re-sampled (docs/defaults.md): at a tenth of kang18's cells (5-36 per condition,
seeds 0-2) mse_delta 21% lower (geometric mean over the 7 held-out cell types, lower on all 7),
mmd2_energy 26% lower, every cell type better than predicting the controls (NK cells 0.0151 → 0.0090,
control 0.0103) and DE calls nearer the real number (74 → 37 per cell type, 45 real), for ROC AUC
0.86 → 0.80 and DE recall 0.61 → 0.49: 42 → 44 of 63 pairs. With all the cells (53-356) the small
shifts it drops are mostly real: 59 → 54 of kang18's 63 pairs (ROC AUC 0.93 → 0.90; an earlier code
variant), and at half the cells (medians 43-50) still 55 → 52 (mse_delta 7% lower, ROC AUC 0.90 →
0.86), so ``auto`` leaves medians of :data:`FEW_CELLS` cells and more alone. Only training conditions are counted and read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.dataset import Condition, PerturbationData
from ..evaluation.predictors import Predictor

#: ``sample.anchor_shrinkage`` / ``sample.ensemble_shrinkage`` value chosen from the training cells' number.
AUTO_SHRINKAGE = "auto"
#: Median cells per perturbed training condition below which ``auto`` shrinks: in the gap between the held-out
#: K562 replicates (median 24), where shrinking lowers mse_delta on every run for no pair lost on seeds 0-2, and
#: kang18 at half its training cells (medians 43-50), where it costs 3 of 63 pairs (ROC AUC 0.90 -> 0.86).
#: kang18 at a tenth of its cells has medians 9-10; the suite 85-100.
FEW_CELLS = 30
#: The threshold, in standard errors, ``auto`` shrinks at.
AUTO_THRESHOLD = 1.0


#: A shrinkage factor of estimates given their standard errors and a threshold in standard errors.
Factor = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def garrote(estimate: np.ndarray, error: np.ndarray, threshold: float) -> np.ndarray:
    """Breiman's non-negative garrote factor of each estimate with standard error ``error``:
    ``max(0, 1 - (threshold * error / estimate)^2)``: 0 within ``threshold`` standard errors of 0, towards 1 beyond."""
    ratio = np.divide(threshold * error, np.abs(estimate), out=np.full_like(estimate, np.inf), where=estimate != 0)
    return np.clip(1.0 - ratio**2, 0.0, 1.0)


def wiener(estimate: np.ndarray, error: np.ndarray, threshold: float) -> np.ndarray:
    """The posterior-mean factor of each estimate with standard error ``error`` under a normal prior as wide as the
    estimate: ``s^2 / (s^2 + (threshold * error)^2)``; never 0, so the estimates keep their order (1 where both are 0)."""
    signal, noise = estimate**2, (threshold * error) ** 2
    return np.divide(signal, signal + noise, out=np.ones_like(estimate), where=signal + noise > 0)


def shrink(
    shift: np.ndarray, predictor: Predictor, data: PerturbationData, condition: Condition, threshold: float,
    factor: Factor = garrote,
) -> np.ndarray:
    """``(G,)`` float64 ``shift``, ``predictor``'s of ``condition``, in a context training lacked scaled gene by gene
    by ``factor`` at ``threshold`` standard errors where the predictor knows its standard error."""
    shift = np.asarray(shift, dtype=np.float64)
    if threshold <= 0 or not data.unseen_contexts([condition]):
        return shift
    error = predictor.shift_standard_error(data, condition)
    return shift if error is None else shift * factor(shift, np.asarray(error, dtype=np.float64), threshold)


def median_training_cells(data: PerturbationData, train: Sequence[str | Condition]) -> float:
    """Median number of cells of the perturbed training conditions ``train`` of ``data`` (as the split keeps them)."""
    conditions = [data.condition(c) for c in train]
    counts = [len(data.cells(c.label)) for c in conditions if not c.is_control]
    return float(np.median(counts)) if counts else 0.0


@dataclass(frozen=True)
class ShiftShrinkage:
    """The thresholds, in standard errors, at which the anchor's and the ensemble's shifts into unseen contexts are
    shrunk (0: not shrunk), and why (``auto``'s count, or ``as set``)."""

    anchor: float = 0.0
    ensemble: float = 0.0
    why: str = "as set"

    @classmethod
    def fit(
        cls, anchor: float | str, ensemble: float | str, data: PerturbationData, train: Sequence[str | Condition]
    ) -> ShiftShrinkage:
        """The settings ``anchor`` and ``ensemble`` resolved on the training conditions ``train`` of ``data``
        (counted only when one is ``auto``)."""
        if AUTO_SHRINKAGE not in (anchor, ensemble):
            return cls(float(anchor), float(ensemble))
        cells = median_training_cells(data, train)
        auto = AUTO_THRESHOLD if cells < FEW_CELLS else 0.0
        relation = "fewer than" if cells < FEW_CELLS else "at least"
        why = f"auto: the median training condition has {cells:g} cells, {relation} {FEW_CELLS}"

        def resolved(setting: float | str) -> float:
            return auto if setting == AUTO_SHRINKAGE else float(setting)

        return cls(resolved(anchor), resolved(ensemble), why)
