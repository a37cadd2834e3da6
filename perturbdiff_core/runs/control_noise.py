r"""How far an unseen context's control mean is its level, and how far sampling noise (``sample.control_shrinkage``).

A prediction is the target context's control cells plus a change, so its mean carries the control
mean's sampling noise. Where few control cells stand for a held-out replicate, donor or patient
(about 25 per K562 replicate), that noise is much of the error: the real perturbed cells of the
context do not share it. Treat the context's true control level as drawn around the contexts'
average with between-context variance :math:`\tau^2_g` per gene, observed through a mean with
noise :math:`s^2_g` (its cells' variance over their number). The posterior mean moves the
observed mean towards the training contexts' average by the share

.. math::  1 - w, \qquad w = \frac{\sum_g \tau^2_g}{\sum_g \tau^2_g + \sum_g s^2_g},

where :math:`\tau^2_g` is the variance of the context means (the training contexts' and the
target's) less their mean noise, at least 0 (method of moments). One share per context, not per
gene: a gene whose level only the held-out cell type has would look like noise to a per-gene
estimate from the other cell types, and be pulled to their level (held-out CD14+ monocytes:
mse_delta 0.0022 -> 0.0027 per gene, 0.0022 with one share).

``auto`` applies the share only where it is at least :data:`AUTO_MIN_SHARE`, a context whose control
mean is mostly noise: replicates of one population (K562 replicates of 20-32 control cells:
74-82%). Cell types and cell lines are distinct entities, not draws around their average, and
their estimated shares are small (1-7% for PBMC cell types and glioma lines) but not harmless:
applied, they cost the held-out glioma lines 6 of their 13 suite pairs (a line's mean moved 1.5-3%
of its large distance from K562) and the PBMC cell types 0.5-1% of mse_delta. Only the training
contexts' control cells and the target context's control cells are read, never a perturbed cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.dataset import Condition, Context, PerturbationData
from ..errors import InputError
from .levels import CONTEXT_LEVEL_CELLS, capped_rows

#: ``sample.control_shrinkage`` value that estimates the share from the contexts' control cells.
AUTO_SHRINKAGE = "auto"
#: Least estimated share that ``auto`` applies: more than half of the context's distance from the
#: training contexts is noise. Measured 0.74-0.82 for K562 replicates, 0.01-0.07 for PBMC cell types
#: and glioma lines; the threshold sits in that gap.
AUTO_MIN_SHARE = 0.5


def mean_and_noise(data: PerturbationData, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(genes,)`` float64 mean of the cells ``rows`` (at most :data:`~.levels.CONTEXT_LEVEL_CELLS`, drawn with
    ``rng``) and the variance of that mean, NaN with fewer than two cells."""
    rows = capped_rows(rows, CONTEXT_LEVEL_CELLS, rng)
    cells = data.read(rows).astype(np.float64)
    noise = cells.var(0, ddof=1) / len(rows) if len(rows) > 1 else np.full(cells.shape[1], np.nan)
    return cells.mean(0), noise


@dataclass(frozen=True)
class ControlShrinkage:
    """The training contexts' control means and their noise, and how to shrink an unseen context's mean towards them.

    Args:
        setting: ``auto`` (the share estimated per context, see the module docstring) or a fixed share in
            [0, 1] (0 keeps the observed control mean).
        means, noise: ``(contexts, genes)`` float64 training contexts' control means and their variances.
        seed: seed of the subsample of a large context's control cells.
    """

    setting: float | str
    means: np.ndarray
    noise: np.ndarray
    seed: int = 0

    @classmethod
    def fit(
        cls, setting: float | str, data: PerturbationData, train: Sequence[str | Condition], seed: int = 0
    ) -> ControlShrinkage:
        """The control means of the contexts of the training conditions ``train``."""
        if setting != AUTO_SHRINKAGE and not 0.0 <= float(setting) <= 1.0:
            raise InputError(f"sample.control_shrinkage must be auto or a number in [0, 1], got {setting!r}.")
        contexts = sorted({data.condition(c).context for c in train}, key=lambda context: context.label)
        rng = np.random.default_rng(seed)
        pairs = [mean_and_noise(data, data.control_cells(context), rng) for context in contexts]
        genes = data.n_genes
        means = np.stack([m for m, _ in pairs]) if pairs else np.zeros((0, genes))
        noise = np.stack([s for _, s in pairs]) if pairs else np.zeros((0, genes))
        return cls(setting, means, noise, seed)

    def estimate(self, mean: np.ndarray, noise: np.ndarray) -> float:
        """The estimated share ``1 - w`` of the distance of a context with control ``mean`` and ``noise`` ``(genes,)``
        from the training contexts' average that is noise (module docstring); 0 where nothing can be estimated."""
        if len(self.means) == 0 or not np.isfinite(noise).all():
            return 0.0
        all_means = np.vstack([self.means, mean])
        all_noise = np.vstack([self.noise, noise])
        spread = np.clip(all_means.var(0, ddof=1) - np.nanmean(all_noise, 0), 0.0, None).sum()
        total = spread + noise.sum()
        return 0.0 if total <= 0 else float(1.0 - spread / total)

    def share(self, mean: np.ndarray, noise: np.ndarray) -> float:
        """The share by which the context moves: the setting, or for ``auto`` the :meth:`estimate` where it is at
        least :data:`AUTO_MIN_SHARE`, else 0."""
        if self.setting != AUTO_SHRINKAGE:
            return float(self.setting)
        estimate = self.estimate(mean, noise)
        return estimate if estimate >= AUTO_MIN_SHARE else 0.0

    def context_share(self, data: PerturbationData, context: Context) -> tuple[float, float]:
        """``(share, estimate)`` of the control cells of ``context``."""
        observed = self._observed(data, context)
        return self.share(*observed), self.estimate(*observed)

    def offset(self, data: PerturbationData, context: Context) -> np.ndarray:
        """``(genes,)`` float32 correction of the control mean of ``context`` (a context training lacked):
        minus its share of the mean's distance from the training contexts' average."""
        mean, noise = self._observed(data, context)
        share = self.share(mean, noise)
        if share == 0.0:
            return np.zeros(data.n_genes, dtype=np.float32)
        return (-share * (mean - self.means.mean(0))).astype(np.float32)

    def _observed(self, data: PerturbationData, context: Context) -> tuple[np.ndarray, np.ndarray]:
        return mean_and_noise(data, data.control_cells(context), np.random.default_rng(self.seed))
