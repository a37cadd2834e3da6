"""Realism metrics: do the predicted cells look like single cells of the real population?

Single-cell profiles are sparse: most genes of a cell are exactly 0 (not detected). A prediction
can have the right means and still be made of cells no sequencer produces, e.g. small positive
values everywhere. These metrics compare, per condition, what makes a profile cell-like:

- ``zero_fraction_mae``: mean over genes of ``|predicted - real fraction of cells with 0|``;
- ``detected_genes_ratio``: median over predicted cells of the number of non-zero genes, divided
  by the same median over the real cells (1 is best);
- ``library_size_ks``: the Kolmogorov-Smirnov statistic between the predicted and real
  distributions of the total expression per cell (the row sums of the input-space values).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def realism_metrics(pred: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """The three realism metrics of predicted cells ``pred`` ``(n, G)`` against real cells ``real`` ``(m, G)``."""
    pred_detected, real_detected = (pred != 0).sum(1), (real != 0).sum(1)
    real_median = float(np.median(real_detected))
    return {
        "zero_fraction_mae": float(np.mean(np.abs((pred == 0).mean(0) - (real == 0).mean(0)))),
        "detected_genes_ratio": float(np.median(pred_detected)) / real_median if real_median > 0 else float("nan"),
        "library_size_ks": float(stats.ks_2samp(pred.sum(1), real.sum(1)).statistic),
    }
