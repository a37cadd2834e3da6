"""What a run's denoiser reads of its control cells (``model.control_levels``) and the ``auto`` rule.

``hull`` shows the denoiser each set's control cells with their mean moved to the nearest mixture
of the training contexts' control means. ``auto`` chooses ``hull`` only for held-out contexts that
those means span: where the hull explains at least :data:`AUTO_HULL_MIN_EXPLAINED` of how a held-out
context's control mean differs from the training contexts' average. A held-out PBMC cell type is
half to 86% explained by the other cell types; a held-out glioma line under 6% by the other lines
and K562, and reading it at the hull's levels made its predictions worse (docs/defaults.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..data import PerturbationData, Split
from ..data.dataset import Condition, Context
from ..diffusion.hull import explained_by_hull

#: Control cells read (at most) per context for its mean.
CONTEXT_LEVEL_CELLS = 2048

#: ``control_levels: auto`` reads held-out contexts at the hull's levels when the hull explains at
#: least this share of each one's control mean (see :func:`~perturbdiff_core.diffusion.hull.explained_by_hull`).
AUTO_HULL_MIN_EXPLAINED = 0.25


@dataclass
class ControlLevels:
    """A run's resolved ``control_levels``, the training contexts' control means when it is ``hull``
    (``(contexts, genes)``), and for ``auto`` how much of each held-out context the hull explains."""

    name: str
    vertices: Tensor | None = None
    explained: dict[str, float] = field(default_factory=dict)


def capped_rows(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """``rows``, or ``cap`` of them drawn with ``rng`` (in order) when there are more."""
    return np.sort(rng.choice(rows, cap, replace=False)) if len(rows) > cap else rows


def mean_of_rows(data: PerturbationData, rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """``(genes,)`` float64 mean of the cells ``rows``, of ``cap`` of them drawn with ``rng`` when there are more."""
    return data.read(capped_rows(rows, cap, rng)).mean(0, dtype=np.float64)


def mean_changes(
    data: PerturbationData, conditions: Sequence[Condition], cap: int, rng: np.random.Generator, seed: int
) -> list[np.ndarray]:
    """``(genes,)`` float64 mean change of each condition from its context's control mean: of at most ``cap``
    of its cells (drawn with ``rng``), against :func:`context_means` (drawn with ``seed``)."""
    contexts = sorted({c.context for c in conditions}, key=lambda context: context.label)
    controls = dict(zip(contexts, context_means(data, contexts, seed).numpy()))
    return [mean_of_rows(data, data.cells(c), cap, rng) - controls[c.context] for c in conditions]


def context_means(data: PerturbationData, contexts: Sequence[Context], seed: int) -> Tensor:
    """``(contexts, genes)`` float64 control means, of at most :data:`CONTEXT_LEVEL_CELLS` cells each (drawn with ``seed``)."""
    rng = np.random.default_rng(seed)
    means = [mean_of_rows(data, data.control_cells(context), CONTEXT_LEVEL_CELLS, rng) for context in contexts]
    return torch.from_numpy(np.stack(means))


def _contexts(data: PerturbationData, conditions: Sequence[str]) -> list[Context]:
    return sorted({data.condition(c).context for c in conditions}, key=lambda context: context.label)


def resolve_control_levels(levels: str, data: PerturbationData, split: Split, seed: int) -> ControlLevels:
    """``model.control_levels`` for a run on ``split``: the hull's vertices come from the training
    conditions' contexts only, so a held-out context's controls never shape it. ``auto`` is ``hull``
    when the test has contexts training lacks and the hull explains at least
    :data:`AUTO_HULL_MIN_EXPLAINED` of each; ``centred`` otherwise (also where every test context
    was trained: its levels then tell the model nothing its context embedding does not)."""
    if levels not in ("auto", "hull"):
        return ControlLevels(levels)
    trained = _contexts(data, split.train)
    vertices = context_means(data, trained, seed)
    if levels == "hull":
        return ControlLevels("hull", vertices)
    known = set(trained)
    unseen = [c for c in _contexts(data, split.test) if c not in known]
    if not unseen:
        return ControlLevels("centred")
    shares = explained_by_hull(context_means(data, unseen, seed), vertices)
    explained = {c.label: float(share) for c, share in zip(unseen, shares)}
    if min(explained.values()) >= AUTO_HULL_MIN_EXPLAINED:
        return ControlLevels("hull", vertices, explained)
    return ControlLevels("centred", explained=explained)
