r"""``sample.ensemble``: a predictor whose shift is averaged with the model's mean change where the model extrapolates.

The model extrapolates in two places: a cell type, donor or patient training never saw, and a
combination of perturbations never trained as such whose parts were. A baseline extrapolates
there too, differently: the perturbation's response in the cell types most like the new one, or
the sum of the parts' responses. Two predictions whose errors differ average to a smaller error
than the worse of them, and often than either: the predicted mean change of each gene becomes

.. math::  (1 - w)\,\bar d^{\,\mathrm{model}}_g + w\,\mathrm{shift}_g,

with :math:`w` = ``sample.ensemble_weight`` (0.5, equal weights: with no held-out data to measure
either error on, the weights that cannot be tuned wrongly). The model still decides which genes
change in which cells (its change test and per-cell deviations, :func:`~perturbdiff_core.runs.
model_predictor.settle_changes`); only the size of each gene's mean change is averaged.

``auto`` (the default) averages with ``context_mixture``: in an unseen context, the perturbation's
training shifts weighted by the nearest mixture of their contexts' control means, where the run is
anchored, that is where responses carry across contexts (``model.anchor: auto``,
:mod:`~perturbdiff_core.runs.anchor`); for a new combination of trained parts, the sum of the parts'
shifts (``context_mean``'s rule). Measured on the suite, re-sampled (docs/defaults.md, options table): on the
held-out PBMC cell types mse_delta 10% lower (geometric mean over 7 cell types and 6 seeds) and
mmd2_energy 15% lower; on the held-out K562 double perturbations the average of the two beats the
sum alone, which beats the model (the sum of two noisy part estimates overshoots, the model
undershoots). Everywhere else, a trained perturbation in a trained context or an unseen context
where responses do not carry, the model's mean change stands alone. Only training conditions and
the target context's control cells are read.

In a context training lacked, the ensemble's shift may first be garrotted by its standard error
(``sample.ensemble_shrinkage``, :mod:`~perturbdiff_core.runs.shrinkage`).

The predictor's errors on training conditions held out the same way also say how far the
prediction may be off wherever the model extrapolates, averaged or not: populations drawn after
the first (``predict --populations``) spread by them (:mod:`~perturbdiff_core.runs.spread`), so the
calibration metrics see the uncertainty; the first population, the point prediction, does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.dataset import Condition, PerturbationData
from ..data.encoders import perturbation_parts
from ..evaluation.predictors import Predictor
from .anchor import NO_ANCHOR, PredictorChoice, check_predictor_setting, fit_predictor
from .shrinkage import shrink
from .spread import ExtrapolationErrors, extrapolation_errors
from .support import ResponseSupport

#: ``sample.ensemble`` value for the model's mean change alone.
NO_ENSEMBLE = "none"
#: ``sample.ensemble`` value that chooses from the run's anchor (:func:`resolve_ensemble`).
AUTO_ENSEMBLE = "auto"
#: The predictor ``auto`` averages with.
AUTO_ENSEMBLE_PREDICTOR = "context_mixture"


def extrapolated(data: PerturbationData, condition: Condition, trained: frozenset[str], unseen_contexts: bool) -> bool:
    """Whether ``condition`` of ``data`` is a combination never trained (not in ``trained``) whose every part
    was, or, with ``unseen_contexts``, in a context training lacked."""
    if unseen_contexts and data.unseen_contexts([condition]):
        return True
    parts = perturbation_parts(condition.perturbation, data.config.combination_separator, data.config.control_label)
    return condition.perturbation not in trained and len(parts) > 1 and all(p in trained for p in parts)


@dataclass(frozen=True)
class Ensemble:
    """A fitted ``sample.ensemble`` predictor (``choice``: its name and why), where it is averaged with the
    model (:func:`extrapolated`): combinations never trained whose every part was (``trained``: the training
    perturbations) and, with ``unseen_contexts``, conditions in contexts training lacked; and its ``errors``
    on training conditions held out alike, which spread later populations wherever the model extrapolates
    (``None``: no training condition to measure them on); and the genes each perturbation's model change may
    reach where it applies (``support``, ``sample.response_fdr``; ``None``: every gene)."""

    choice: PredictorChoice
    predictor: Predictor
    unseen_contexts: bool
    trained: frozenset[str]
    errors: ExtrapolationErrors | None = None
    support: ResponseSupport | None = None

    def applies(self, data: PerturbationData, condition: Condition) -> bool:
        """Whether the model's mean change for ``condition`` is averaged with the predictor's shift."""
        return extrapolated(data, condition, self.trained, self.unseen_contexts)

    def shift(self, data: PerturbationData, condition: Condition, shrinkage: float) -> np.ndarray:
        """``(G,)`` the predictor's shift of ``condition``; in a context training lacked, garrotted at ``shrinkage``
        standard errors (``sample.ensemble_shrinkage``, :func:`~.shrinkage.shrink`)."""
        return shrink(self.predictor.shift(data, condition), self.predictor, data, condition, shrinkage)

    def reach(self, data: PerturbationData, condition: Condition) -> Tensor | None:
        """``(G,)`` bool: the genes the model's own change may move for ``condition`` of ``data``, in a context
        training lacked (:mod:`~.support`); ``None``: every gene (no gate, a trained context, or no training
        condition of its perturbation or parts)."""
        if self.support is None or not data.unseen_contexts([condition]):
            return None
        genes = self.support.genes(condition.perturbation)
        return None if genes is None else torch.from_numpy(genes)

    def spreads(self, data: PerturbationData, condition: Condition) -> bool:
        """Whether populations of ``condition`` after the first spread by :attr:`errors`: the model extrapolates
        there (an unseen context, averaged or not, or a new combination of trained parts) and errors were measured."""
        return self.errors is not None and extrapolated(data, condition, self.trained, True)


def check_ensemble(name: str) -> None:
    """ConfigError unless ``name`` is ``none``, ``auto`` or an installed predictor."""
    check_predictor_setting("sample.ensemble", name)


def resolve_ensemble(setting: str, anchor: str) -> PredictorChoice:
    """``sample.ensemble`` for a run whose resolved ``model.anchor`` is ``anchor``: a name as given, ``auto``
    :data:`AUTO_ENSEMBLE_PREDICTOR`; ``why`` says where ``auto`` applies it (module docstring)."""
    if setting != AUTO_ENSEMBLE:
        return PredictorChoice(setting)
    where = (
        "unseen contexts (the run is anchored, so responses carry across contexts) and new combinations of trained parts"
        if anchor != NO_ANCHOR else
        "new combinations of trained parts (the run has no anchor, so responses are not taken to carry across contexts)"
    )
    return PredictorChoice(AUTO_ENSEMBLE_PREDICTOR, f"auto: {where}")


def fit_ensemble(
    setting: str,
    anchor: str,
    data: PerturbationData,
    train: Sequence[str | Condition],
    conditions: Sequence[Condition],
    seed: int,
    conditions_data: PerturbationData | None = None,
    response_fdr: float | None = None,
) -> Ensemble | None:
    """The ``sample.ensemble`` ``setting`` of a run anchored on ``anchor``, fitted on the training conditions
    ``train`` of ``data`` and told the context fields ``conditions`` hold out, with its errors there (drawn with
    ``seed``, :func:`~.spread.extrapolation_errors`) and the genes the training perturbations change at FDR
    below ``response_fdr`` (``sample.response_fdr``, :mod:`~.support`; ``None``: no gate);
    ``None`` for ``none`` or when the model extrapolates to none of ``conditions`` (of ``conditions_data``,
    default ``data``). ``auto`` is averaged in unseen contexts only in an anchored run; a predictor named in
    the config, in every unseen context."""
    choice = resolve_ensemble(setting, anchor)
    check_ensemble(choice.name)
    if choice.name == NO_ENSEMBLE:
        return None
    training = [data.condition(c) for c in train]
    trained = frozenset(c.perturbation for c in training)
    unseen_contexts = setting != AUTO_ENSEMBLE or anchor != NO_ANCHOR
    target = data if conditions_data is None else conditions_data
    if not any(extrapolated(target, c, trained, True) for c in conditions):
        return None
    predictor = fit_predictor(choice.name, data, training, target.held_out_fields(conditions))
    errors = extrapolation_errors(predictor, data, training, seed)
    support = None if response_fdr is None else ResponseSupport(data, training, response_fdr, seed)
    return Ensemble(choice, predictor, unseen_contexts, trained, errors, support)
