"""``sample.ceiling``: no predicted cell holds more of a gene than the cells a run may read.

A population's mean can be right while a few of its cells are impossible: an increase decoded as
new reads (``sample.increase: reads``) goes to the cells that already express the gene, and where
the donors barely express it the few that do take nearly all of a large rise. Held-out CD14+
monocytes (kang18, seed 0) got CXCL10 at 10.1 and ISG15 at 9.2 in log1p units, where no real
stimulated cell of any type goes above 5.0 and 5.4, and a tenth of the predicted cells had more
expression in all than any real one. ``training`` (the default) caps each gene at the highest value
any training cell has, perturbed or control, or any control cell of the predicted context
(:class:`~perturbdiff_core.runs.model_predictor.DiffusionPredictor` adds those): a bound the data
show is reachable, not a level tuned on anything. A rise the cap stops in one cell goes to the
others (:func:`~perturbdiff_core.data.reads.gain_reads`), so the mean still moves as far.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..data.dataset import Condition, PerturbationData
from ..evaluation.predictors import SHIFT_CELLS
from .levels import capped_rows

#: Cells read (at most) per training condition and per training context's controls: as many as the baselines read
#: for a condition's shift, so a screen of thousands of conditions is read once more at that rate, not in full.
CEILING_CELLS = SHIFT_CELLS


def training_ceiling(data: PerturbationData, train: Sequence[str | Condition], seed: int) -> Tensor | None:
    """``(G,)`` float64: each gene's highest value in the training conditions ``train`` of ``data`` and the control
    cells of their contexts, over at most :data:`CEILING_CELLS` cells of each (drawn with ``seed``); ``None`` when
    there is no such cell (nothing to bound a prediction by)."""
    conditions = [data.condition(c) for c in train]
    rng = np.random.default_rng(seed)
    contexts = {c.context for c in conditions}
    groups = [data.cells(c) for c in conditions] + [data.control_cells(x) for x in data.contexts if x in contexts]
    highest = [data.read(capped_rows(rows, CEILING_CELLS, rng)).max(0) for rows in groups if len(rows)]
    return torch.from_numpy(np.max(highest, axis=0).astype(np.float64)) if highest else None
