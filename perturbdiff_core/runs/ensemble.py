r"""``sample.ensemble``: a predictor whose shift is averaged with the model's mean change in unseen contexts.

For a cell type, donor or patient training never saw, the model's mean change is an extrapolation
from the contexts it trained on, and so is any baseline's. Two extrapolations whose errors are not
the same average to a smaller error than the worse of them, and usually than either: the predicted
mean change of each gene becomes

.. math::  (1 - w)\,\bar d^{\,\mathrm{model}}_g + w\,\mathrm{shift}_g,

with :math:`w` = ``sample.ensemble_weight`` (0.5, equal weights: with no held-out data to measure
either error on, the weights that cannot be tuned wrongly). The model still decides which genes
change in which cells (its change test and per-cell deviations, :func:`~perturbdiff_core.runs.
model_predictor.settle_changes`); only the size of each gene's mean change is averaged.

``auto`` (the default) averages with ``context_mixture`` (the perturbation's training shifts weighted
by the nearest mixture of their contexts' control means) where the run is anchored, that is where
the response carries across contexts (``model.anchor: auto``, :mod:`~perturbdiff_core.runs.anchor`);
elsewhere, and in every context training saw, the model's mean change stands alone. Measured on the
suite's held-out PBMC cell types (README, options table): mse_delta 10% lower (geometric mean over
7 cell types and 6 seeds), mmd2_energy 15% lower; the model alone is better on the monocytes, the
mixture on the small cell types (B, CD8 T, NK), whose responses the other cell types' average blurs.
Only training conditions and the target context's control cells are read.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.dataset import Condition, PerturbationData
from ..errors import ConfigError
from ..evaluation.predictors import Predictor, as_predictor
from .anchor import NO_ANCHOR, PredictorChoice, check_predictor_setting

#: ``sample.ensemble`` value for the model's mean change alone.
NO_ENSEMBLE = "none"
#: ``sample.ensemble`` value that chooses from the run's anchor (:func:`resolve_ensemble`).
AUTO_ENSEMBLE = "auto"
#: The predictor ``auto`` averages with where the run is anchored.
AUTO_ENSEMBLE_PREDICTOR = "context_mixture"


def check_ensemble(name: str) -> None:
    """ConfigError unless ``name`` is ``none``, ``auto`` or an installed predictor."""
    check_predictor_setting("sample.ensemble", name)


def resolve_ensemble(setting: str, anchor: str) -> PredictorChoice:
    """``sample.ensemble`` for a run whose resolved ``model.anchor`` is ``anchor``: a name as given; ``auto``
    :data:`AUTO_ENSEMBLE_PREDICTOR` for an anchored run, else ``none`` (module docstring)."""
    if setting != AUTO_ENSEMBLE:
        return PredictorChoice(setting)
    if anchor == NO_ANCHOR:
        return PredictorChoice(NO_ENSEMBLE, "auto: the run has no anchor, so its responses are not taken to carry across contexts")
    return PredictorChoice(AUTO_ENSEMBLE_PREDICTOR, "auto: the run is anchored, so responses carry across contexts")


def fit_ensemble(
    choice: PredictorChoice, data: PerturbationData, train: Sequence[str | Condition]
) -> Predictor | None:
    """The ensemble predictor of ``choice`` fitted on the training conditions ``train``; ``None`` for ``none``."""
    check_ensemble(choice.name)
    if choice.name == AUTO_ENSEMBLE:
        raise ConfigError("sample.ensemble: auto depends on the run's anchor; resolve it first with resolve_ensemble.")
    return None if choice.name == NO_ENSEMBLE else as_predictor(choice.name).fit(data, train)
