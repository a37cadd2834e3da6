"""``model.anchor``: a predictor whose mean shift the diffusion model starts from.

The context mean and the additive combination shift are strong priors: a held-out combination
of seen perturbations is often close to the sum of its parts' shifts. With an anchor the model
diffuses each target set relative to ``mean(control set) + anchor shift`` and adds that origin
back when sampling (:class:`~perturbdiff_core.diffusion.model.RKHSDiffusion`, ``relative_to_control``),
so it learns what the anchor misses rather than the whole response.

The anchor is fitted on the training conditions only. A training condition's shift leaves the
condition itself out (every shift baseline predicts a training condition from the others), so
the model trains on the same kind of anchor error it meets on a held-out condition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.dataset import Condition, PerturbationData
from ..errors import ConfigError
from ..evaluation.predictors import Predictor, as_predictor
from ..registry import is_registered, names

#: ``model.anchor`` value for no anchor: the model diffuses the cells themselves.
NO_ANCHOR = "none"
#: The ``perturbdiff.predictors`` group anchors come from.
PREDICTORS = "perturbdiff.predictors"


def check_anchor(name: str) -> None:
    """ConfigError unless ``name`` is ``none`` or an installed predictor."""
    if name != NO_ANCHOR and not is_registered(PREDICTORS, name):
        known = ", ".join(names(PREDICTORS))
        raise ConfigError(f"model.anchor = {name!r} is not a predictor; use {NO_ANCHOR} or one of {known}.")


def fit_anchor(name: str, data: PerturbationData, train: Sequence[str | Condition]) -> Predictor | None:
    """The anchor predictor ``name`` fitted on the training conditions ``train``; ``None`` for ``none``."""
    check_anchor(name)
    return None if name == NO_ANCHOR else as_predictor(name).fit(data, train)


def anchor_shifts(
    anchor: Predictor | None, data: PerturbationData, conditions: Sequence[str | Condition]
) -> dict[str, np.ndarray] | None:
    """Condition label -> the anchor's ``(G,)`` float32 shift; ``None`` without an anchor."""
    if anchor is None:
        return None
    chosen = [data.condition(c) for c in conditions]
    return {c.label: np.asarray(anchor.shift(data, c), dtype=np.float32) for c in chosen}
