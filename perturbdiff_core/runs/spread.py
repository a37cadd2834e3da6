r"""How far apart the populations drawn for an extrapolated condition lie (``predict --populations``).

Where the model extrapolates (a context training never saw, a new combination of trained parts)
nobody knows the response exactly, and the populations drawn after the first, the point
prediction, should spread as far as the prediction's error is likely to reach: then the real
population falls among them as often as it would among draws of the truth (``population_coverage``).
The training data can measure that reach. Every training condition the ensemble's predictor
(``sample.ensemble``) would also have extrapolated to had it been held out, a perturbation
trained in another context or a combination whose parts were trained, is predicted by it from
the other training conditions (every built-in shift predictor leaves a training condition itself
out), and its real mean change minus that prediction is one error vector :math:`e_j`.

A population after the first moves every gene's mean change by :math:`\xi\,e_j`, with :math:`j`
drawn uniformly and :math:`\xi` standard normal (a wild bootstrap). Whole error vectors keep
the errors' structure across genes (a response programme too strong or too weak in a new cell
type moves its genes together), which independent draws per gene lose; the normal factor gives
each draw the error's size in expectation and either sign. Measured on the suite (README,
"Calibration"): with the earlier spread, the model's and the predictor's disagreement, the
held-out PBMC cell types and glioma lines were never covered (the two err alike there); with
these errors the real population falls within the predicted ones in 0.64-1.0 of the held-out
conditions per task family, against about 0.9 for a calibrated spread.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.dataset import Condition, Context, PerturbationData
from ..data.encoders import perturbation_parts
from ..evaluation.predictors import Predictor
from .levels import mean_changes

#: Training conditions (at most, drawn with the run's seed) whose errors are measured, and cells (at
#: most) read per condition for its mean: an atlas must not be read whole for a spread.
ERROR_CONDITIONS = 64
ERROR_CELLS = 256


@dataclass(frozen=True)
class ExtrapolationErrors:
    """A predictor's errors ``(J, G)`` on training conditions held out as the extrapolated ones are."""

    errors: np.ndarray

    def draw(self, generator: torch.Generator) -> Tensor:
        r"""``(G,)`` float64 :math:`\xi\,e_j`: a random error vector times a standard normal factor (module docstring)."""
        j = int(torch.randint(len(self.errors), (1,), generator=generator))
        factor = torch.randn(1, generator=generator, dtype=torch.float64)
        return factor * torch.from_numpy(self.errors[j])


def held_out_alike(data: PerturbationData, training: Sequence[Condition]) -> list[Condition]:
    """The conditions of ``training`` that would be extrapolations from the others: their perturbation (at its
    dose) was trained in another context, or they are combinations whose every part was trained."""
    contexts: dict[tuple[str, float | None], set[Context]] = defaultdict(set)
    for condition in training:
        contexts[(condition.perturbation, condition.dose)].add(condition.context)
    trained = {condition.perturbation for condition in training}
    cfg = data.config

    def alike(condition: Condition) -> bool:
        if contexts[(condition.perturbation, condition.dose)] - {condition.context}:
            return True
        parts = perturbation_parts(condition.perturbation, cfg.combination_separator, cfg.control_label)
        return len(parts) > 1 and all(p in trained for p in parts)  # a part is never the combination itself

    return [condition for condition in training if alike(condition)]


def extrapolation_errors(
    predictor: Predictor, data: PerturbationData, training: Sequence[Condition], seed: int
) -> ExtrapolationErrors | None:
    """The errors of ``predictor`` (fitted on ``training``) on the training conditions :func:`held_out_alike`
    from the others, at most :data:`ERROR_CONDITIONS` of them drawn with ``seed``; ``None`` where there is none."""
    chosen = held_out_alike(data, training)
    if not chosen:
        return None
    rng = np.random.default_rng(seed)
    if len(chosen) > ERROR_CONDITIONS:
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), ERROR_CONDITIONS, replace=False))]
    changes = mean_changes(data, chosen, ERROR_CELLS, rng, seed)
    errors = [change - np.asarray(predictor.shift(data, c), dtype=np.float64) for c, change in zip(chosen, changes)]
    return ExtrapolationErrors(np.stack(errors))
