"""``model.anchor``: a predictor whose mean shift the diffusion model starts from.

The context mean and the additive combination shift are strong priors: a held-out combination
of seen perturbations is often close to the sum of its parts' shifts. With an anchor the model
diffuses each target set relative to ``mean(control set) + anchor shift`` and adds that origin
back when sampling (:class:`~perturbdiff_core.diffusion.model.RKHSDiffusion`, ``relative_to_control``),
so it learns what the anchor misses rather than the whole response.

The anchor is fitted on the training conditions only. A training condition's shift leaves the
condition itself out (every shift baseline predicts a training condition from the others), so
the model trains on the same kind of anchor error it meets on a held-out condition.

``auto`` (the default) anchors on ``context_fold`` (the other contexts' log fold changes pooled by random
effects, applied to the context's own control level) where the context mean's error is small and a context training lacks
must be predicted: the test holds contexts training lacks (a held-out replicate,
donor, patient or cell type), and in training the other contexts' mean change predicts a
context's by a factor of at least :data:`AUTO_MIN_CARRY` (the leave-one-context-out factor of
``sample.unseen_context_change``). The model then learns what the carried-over response misses in
each context instead of the whole response, whether its denoiser reads the unseen context's levels
(``model.control_levels`` ``hull``) or not (``centred``): a held-out K562 replicate read either way
lost most of its accuracy without the anchor (docs/defaults.md, options table). Everywhere else it is
``none``: contexts whose responses do not carry (CRISPRi glioma lines: 0.00-0.06) and held-out
combinations in trained contexts, where a training single's context mean comes from other
contexts and the model learns to undo it (docs/defaults.md, options table). Folds rather than shifts: a gene
another cell type expresses and raises is barely expressed in a monocyte, and its absolute rise moved
there switches it on; on the kang18 cell types (seeds 0-2) the fold anchor lifts DE recall 0.59 → 0.69,
ROC AUC 0.90 → 0.93 and spearman_lfc 0.34 → 0.39 over the shift anchor, at 3% higher mse_delta (docs/defaults.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data import Split
from ..data.dataset import Condition, PerturbationData
from ..errors import ConfigError
from ..evaluation.predictors import Predictor, as_predictor
from ..registry import is_registered, names
from .unseen import UnseenContextChange, leave_one_context_out_slope, training_changes

#: ``model.anchor`` value for no anchor: the model diffuses the cells themselves.
NO_ANCHOR = "none"
#: ``model.anchor`` value that chooses the anchor from the data and the split (:func:`resolve_anchor`).
AUTO_ANCHOR = "auto"
#: The anchor ``auto`` chooses where one is worth having.
AUTO_ANCHOR_PREDICTOR = "context_fold"
#: Least leave-one-context-out factor (how much of a context's change the other contexts' mean
#: change predicts, in training) at which ``auto`` anchors an unseen context on the context mean:
#: more than half of the change carries. Measured 0.89 for held-out K562 replicates and
#: 0.00-0.06 for held-out CRISPRi glioma lines; the threshold sits in that gap.
AUTO_MIN_CARRY = 0.5
#: The ``perturbdiff.predictors`` group anchors come from.
PREDICTORS = "perturbdiff.predictors"


@dataclass(frozen=True)
class PredictorChoice:
    """A resolved predictor setting (``model.anchor``, ``sample.ensemble``): the predictor's name (or ``none``)
    and, for ``auto``, why."""

    name: str
    why: str = ""


def check_predictor_setting(key: str, name: str) -> None:
    """ConfigError unless ``name``, the value of config key ``key``, is ``none``, ``auto`` or an installed predictor."""
    if name not in (NO_ANCHOR, AUTO_ANCHOR) and not is_registered(PREDICTORS, name):
        known = ", ".join(names(PREDICTORS))
        raise ConfigError(f"{key} = {name!r} is not a predictor; use {AUTO_ANCHOR}, {NO_ANCHOR} or one of {known}.")


def check_anchor(name: str) -> None:
    """ConfigError unless ``name`` is ``none``, ``auto`` or an installed predictor."""
    check_predictor_setting("model.anchor", name)


def resolve_anchor(
    setting: str,
    data: PerturbationData,
    split: Split,
    seed: int,
    measured: UnseenContextChange | None = None,
) -> PredictorChoice:
    """``model.anchor`` for a run on ``split``: a name as given; ``auto`` :data:`AUTO_ANCHOR_PREDICTOR`
    where the test holds contexts training lacks and the training conditions' leave-one-context-out
    factor is at least :data:`AUTO_MIN_CARRY`, else ``none`` (module docstring). Only training conditions are read; the factor ``measured`` by the run's
    ``sample.unseen_context_change: auto`` (same data, split and seed) is reused rather than read again."""
    if setting != AUTO_ANCHOR:
        return PredictorChoice(setting)
    if not data.unseen_contexts(split.test):
        return PredictorChoice(NO_ANCHOR, "auto: every test context was trained")
    if measured is not None and measured.slope is not None:
        slope, pairs = measured.slope, measured.pairs
    else:
        changes = training_changes(data, split.train, seed)
        slope, pairs = leave_one_context_out_slope(changes, data.held_out_fields(split.test))
    if slope is None:
        return PredictorChoice(NO_ANCHOR, "auto: no training perturbation was seen in two contexts")
    carry = (f"in training, the other contexts' mean change predicts a context's by a factor {slope:.2f} "
             f"over {pairs} (perturbation, context) pair{'' if pairs == 1 else 's'}")
    if slope < AUTO_MIN_CARRY:
        return PredictorChoice(NO_ANCHOR, f"auto: {carry}; an anchor needs {AUTO_MIN_CARRY:g}")
    return PredictorChoice(AUTO_ANCHOR_PREDICTOR, f"auto: {carry}")


def fit_anchor(
    name: str, data: PerturbationData, train: Sequence[str | Condition], held_out: Sequence[str] = ()
) -> Predictor | None:
    """The anchor predictor ``name`` fitted on the training conditions ``train``, told the context fields the
    test holds out (:meth:`~perturbdiff_core.data.dataset.PerturbationData.held_out_fields`, so a training set's
    shift is predicted as a test set's will be); ``None`` for ``none``."""
    check_anchor(name)
    if name == AUTO_ANCHOR:
        raise ConfigError("model.anchor: auto depends on the data and the split; resolve it first with resolve_anchor.")
    return None if name == NO_ANCHOR else fit_predictor(name, data, train, held_out)


def fit_predictor(name: str, data: PerturbationData, train: Sequence[str | Condition], held_out: Sequence[str]) -> Predictor:
    """The ``perturbdiff.predictors`` plug-in ``name``, its :attr:`~Predictor.held_out` fields set, fitted on ``train``."""
    predictor = as_predictor(name)
    predictor.held_out = tuple(held_out)
    return predictor.fit(data, train)


def anchor_shifts(
    anchor: Predictor | None, data: PerturbationData, conditions: Sequence[str | Condition]
) -> dict[str, np.ndarray] | None:
    """Condition label -> the anchor's ``(G,)`` float32 shift; ``None`` without an anchor."""
    if anchor is None:
        return None
    chosen = [data.condition(c) for c in conditions]
    return {c.label: np.asarray(anchor.shift(data, c), dtype=np.float32) for c in chosen}
