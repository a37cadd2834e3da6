r"""``sample.response_fdr``: in a context training lacked, the genes the model's own change may reach.

In a cell type training never saw, the denoiser draws cells partly like the training cell types'
stimulated cells: in held-out CD4+ T cells it called XCL2, IFNG (NK and CD8+ T cells' genes),
BANK1, TNFRSF13B and IGLL5 (B cells') changed, genes interferon changes in no training cell type,
and the change test passed them (a confident change is not a right one). Such a change cannot come
from the perturbation's response seen in training; it is the training cell types' identity leaking
in. So in a context training lacked, where ``sample.ensemble`` applies, a gene takes the model's
own change beyond the anchor only if the training data show the perturbation, or one of a
combination's parts, changing it: a Wilcoxon rank-sum test of a training condition's cells against
its context's control cells (pdex's, as the evaluation's DE calls) at Benjamini-Hochberg FDR below
``sample.response_fdr`` in at least one such condition. Every other gene keeps the anchor's shift
(averaged with the ensemble's, as any gene the change test leaves alone). Only training conditions
and their control cells are read. A new combination of trained parts in a trained context is not
gated: no identity can leak there, and a change neither part makes alone is what a genetic
interaction is.

The threshold is loose (0.25) because a weak response in one training cell type is still a
response: at 0.05 the held-out NK cells lost genes the model had right to the anchor (mse_delta 15%
higher). Measured on the task suite's kang18 runs, seeds 0-2 (docs/defaults.md): with 0.25 mse_delta 3% lower
(6 of 7 cell types), mae_delta and zero_fraction_mae lower on all 7; on held-out CD4+ T cells, seed
0, DE calls 66 → 53 (44 real; 13 false calls gone, one true call lost and one gained), overlap_at_N 0.36 → 0.48. A
perturbation none of whose parts training has is not gated: the training data say nothing about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data.dataset import Condition, Context, PerturbationData
from ..data.encoders import perturbation_parts
from ..evaluation.de import ControlRanks
from .levels import capped_rows

#: Cells read (at most, drawn with the run's seed) per training condition and per context's controls
#: for the response test: enough for its power on a PBMC cell type, bounded on an atlas.
SUPPORT_CELLS = 1024


@dataclass
class ResponseSupport:
    """The genes each training perturbation changes significantly (``fdr``), tested lazily per perturbation on
    the training conditions ``training`` of ``data`` and cached: a screen's test asks for a few of thousands."""

    data: PerturbationData
    training: Sequence[Condition]
    fdr: float
    seed: int
    _responding: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)
    _controls: dict[Context, ControlRanks] = field(default_factory=dict, repr=False)

    def genes(self, perturbation: str) -> np.ndarray | None:
        """``(G,)`` bool: the genes some training condition of ``perturbation`` or of one of its parts changes
        at FDR below :attr:`fdr`; ``None`` where training has none of them (nothing to gate by)."""
        cfg = self.data.config
        names = {perturbation, *perturbation_parts(perturbation, cfg.combination_separator, cfg.control_label)}
        masks = [mask for name in sorted(names) if (mask := self._responding_to(name)) is not None]
        return np.logical_or.reduce(masks) if masks else None

    def _responding_to(self, perturbation: str) -> np.ndarray | None:
        if perturbation not in self._responding:
            conditions = [c for c in self.training if c.perturbation == perturbation]
            self._responding[perturbation] = (
                np.logical_or.reduce([self._significant(c) for c in conditions]) if conditions else None
            )
        return self._responding[perturbation]

    def _significant(self, condition: Condition) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        cells = self.data.read(capped_rows(self.data.cells(condition), SUPPORT_CELLS, rng))
        return self._control_ranks(condition.context).test(cells).significant(self.fdr)

    def _control_ranks(self, context: Context) -> ControlRanks:
        if context not in self._controls:
            rows = capped_rows(self.data.control_cells(context), SUPPORT_CELLS, np.random.default_rng(self.seed))
            self._controls[context] = ControlRanks(self.data.read(rows))
        return self._controls[context]
