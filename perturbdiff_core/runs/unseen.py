"""How much of its predicted change a context training never saw keeps (``sample.unseen_context_change``).

Where the denoiser reads an unseen context's control cells centred on their mean
(``model.control_levels`` ``centred``, what ``auto`` picks for a context the trained ones do not
span), nothing tells it which context it is: its change there is the trained contexts' change
carried over blind, and the training data can measure what that is worth. Predict each training
context's change under a perturbation by the mean change of the other contexts under it (those
of its cell type when there are any, :func:`~perturbdiff_core.data.dataset.nearest_contexts`), and fit
the one factor that minimises the squared error over every such (perturbation, context) pair;
``auto`` scales the change sampled for an unseen context by that factor, clipped to [0, 1]. A
CRISPRi knock-down's change in one glioma line says almost nothing about another's (0.00-0.06),
and the model's carried-over change there was worse than predicting the held-out line's control
cells. Where the denoiser reads the context's levels (``hull``, ``absolute``) it shapes the change
to that context, and ``auto`` keeps all of it: scaling it by the same factor (0.87-0.90 for held-out
PBMC cell types, 0.95-0.99 with the others weighted by the hull mixture) cost the held-out
monocytes more than it gained the T cells (docs/defaults.md).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..data import PerturbationData, Split
from ..data.dataset import Condition, Context, nearest_contexts
from .levels import mean_changes

#: Perturbed cells read (at most) per training condition for its mean change, and perturbations
#: (at most, drawn with the run's seed) whose changes are compared: the factor is one number, and
#: an atlas of thousands of drugs x dozens of lines must not be read whole to estimate it.
FACTOR_CELLS = 256
FACTOR_PERTURBATIONS = 64


@dataclass(frozen=True)
class UnseenContextChange:
    """A run's resolved ``sample.unseen_context_change``.

    Attributes:
        scale: the factor in [0, 1] applied to the change sampled for a condition in an unseen context.
        pairs: the (perturbation, context) pairs ``auto`` measured it on; 0 for a number given in the config,
            where the denoiser reads the contexts' levels, or where no training perturbation was seen in
            two contexts (``scale`` is then 1).
        slope: the measured least-squares factor before clipping (``None`` when nothing was measured).
        why: how ``auto`` chose ``scale``, for the run summary (empty for a number given in the config).
    """

    scale: float
    pairs: int = 0
    slope: float | None = None
    why: str = ""


def leave_one_context_out_slope(
    changes: Mapping[tuple[str, Context], np.ndarray], held_out: Sequence[str] = ()
) -> tuple[float | None, int]:
    """Least-squares factor ``b`` of ``y ~ b x`` over the pairs, and their number, where ``y`` is a
    perturbation's change ``(genes,)`` in one context and ``x`` the mean of its changes in the nearest
    others (:func:`~perturbdiff_core.data.dataset.nearest_contexts` with the ``held_out`` fields).

    ``changes`` maps (perturbation, context) to the change; perturbations seen in one context only, or
    only in contexts sharing a held-out field, give no pair. ``None`` when there is no pair or every
    ``x`` is zero.
    """
    by_perturbation: dict[str, dict[Context, np.ndarray]] = defaultdict(dict)
    for (perturbation, context), change in changes.items():
        by_perturbation[perturbation][context] = np.asarray(change, dtype=np.float64)
    cross = square = 0.0
    pairs = 0
    for per_context in by_perturbation.values():
        if len(per_context) < 2:
            continue
        for context, change in per_context.items():
            nearest = nearest_contexts(context, [c for c in per_context if c != context], held_out)
            if not nearest:
                continue
            others = np.mean([per_context[c] for c in nearest], axis=0)
            cross += float(others @ change)
            square += float(others @ others)
            pairs += 1
    if pairs == 0 or square == 0.0:
        return None, pairs
    return cross / square, pairs


def _key(condition: Condition) -> str:
    """A perturbation at its dose: the unit whose change is compared across contexts."""
    return condition.perturbation if condition.dose is None else f"{condition.perturbation}@{condition.dose:g}"


def training_changes(
    data: PerturbationData, conditions: Sequence[str], seed: int
) -> dict[tuple[str, Context], np.ndarray]:
    """Mean change from their context's control cells of the training conditions whose perturbation
    (at its dose) was trained in at least two contexts: of at most :data:`FACTOR_PERTURBATIONS` such
    perturbations and :data:`FACTOR_CELLS` cells per condition, both drawn with ``seed``."""
    chosen = [data.condition(c) for c in conditions]
    contexts: dict[str, set[Context]] = defaultdict(set)
    for condition in chosen:
        contexts[_key(condition)].add(condition.context)
    keys = sorted(key for key, seen in contexts.items() if len(seen) >= 2)
    if not keys:
        return {}
    rng = np.random.default_rng(seed)
    if len(keys) > FACTOR_PERTURBATIONS:
        keys = sorted(rng.choice(keys, FACTOR_PERTURBATIONS, replace=False))
    kept = set(keys)
    shared = [c for c in chosen if _key(c) in kept]
    changes = mean_changes(data, shared, FACTOR_CELLS, rng, seed)
    return {(_key(c), c.context): change for c, change in zip(shared, changes)}


def resolve_unseen_context_change(
    setting: float | str, data: PerturbationData, split: Split, seed: int, control_levels: str
) -> UnseenContextChange:
    """``sample.unseen_context_change`` for a run on ``split`` whose denoiser reads ``control_levels``
    (resolved): a number as given; ``auto`` 1 unless the levels are ``centred``, then the clipped
    leave-one-context-out factor of the training conditions (no test or held-out cell is read), or 1
    when no training perturbation was seen in two contexts."""
    if setting != "auto":
        return UnseenContextChange(float(setting))
    if control_levels != "centred":
        return UnseenContextChange(1.0, why=f"auto: the denoiser reads their control cells' levels, control_levels {control_levels}")
    changes = training_changes(data, split.train, seed)
    slope, pairs = leave_one_context_out_slope(changes, data.held_out_fields(split.test))
    if slope is None:
        return UnseenContextChange(1.0, pairs, why="auto: no training perturbation was seen in two contexts, nothing to measure")
    why = (f"auto: in training, the other contexts' mean change predicts a context's by a factor {slope:.2f}, "
           f"over {pairs} (perturbation, context) pair{'' if pairs == 1 else 's'}")
    return UnseenContextChange(min(max(slope, 0.0), 1.0), pairs, slope, why)
