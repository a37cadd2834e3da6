"""sample.anchor_shrinkage and sample.ensemble_shrinkage: the garrote's closed form, the shifts it scales (only into
contexts training lacked), the auto rule on the training cells' number, and the same thresholds when predicting again."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from test_anchor import held_out_t3, three_types  # noqa: F401 (a fixture)

from perturbdiff_core.data.dataset import Condition, PerturbationData
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.evaluation.predictors import Predictor, as_predictor
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint
from perturbdiff_core.runs.model_predictor import DiffusionPredictor
from perturbdiff_core.runs.prediction import run_shrinkage, training_data
from perturbdiff_core.runs.shrinkage import FEW_CELLS, ShiftShrinkage, garrote, median_training_cells, wiener
from perturbdiff_core.runs.summary import run_summary
from perturbdiff_core.runs.training import Trainer


def test_garrote_drops_an_estimate_within_the_threshold_and_keeps_most_of_a_clear_one() -> None:
    """Closed form ``max(0, 1 - (k e / s)^2)``, both signs, at k = 1 and 2."""
    estimate = np.array([0.0, 0.3, -0.5, 1.0, -2.0, 10.0])
    error = np.full(6, 0.5)
    np.testing.assert_allclose(garrote(estimate, error, 1.0), [0.0, 0.0, 0.0, 0.75, 0.9375, 0.9975])
    np.testing.assert_allclose(garrote(estimate, error, 2.0), [0.0, 0.0, 0.0, 0.0, 0.75, 0.99])


class FixedShift(Predictor):
    """A predictor whose shift of one condition is given (no standard error, so never shrunk), else ``inner``'s."""

    def __init__(self, inner: Predictor, condition: Condition, shift: np.ndarray) -> None:
        self.inner, self.condition, self.fixed = inner, condition, shift

    def predict(self, data: PerturbationData, condition: Condition, n_cells: int, seed: int) -> np.ndarray:
        return self.inner.predict(data, condition, n_cells, seed)

    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        return self.fixed if condition == self.condition else self.inner.shift(data, condition)


def test_the_shrinkage_scales_the_anchors_and_the_ensembles_shift_into_an_unseen_context(three_types: Path, tmp_path: Path) -> None:  # noqa: F811
    """In an unseen context a threshold moves every sampled cell by the anchor's shift scaled by :func:`wiener` less the
    shift (exactly, where the sampled change is kept as it is), and replaces the ensemble's shift by its :func:`garrote`
    (as if that shift were given outright); 0 and a trained context change nothing, and a threshold no gene passes
    predicts as an ensemble of no change (the control baseline)."""
    trainer = Trainer(held_out_t3(three_types, "sample.ensemble_shrinkage=0", "sample.anchor_shrinkage=0"), tmp_path / "run", progress=False)
    trainer.fit(stop_at=4)
    data, unseen, trained = trainer.data, trainer.data.condition("A|t3"), trainer.data.condition("A|t1")
    anchor, ensemble = trainer.anchor, trainer.ensemble

    def predict(shrinkage: ShiftShrinkage | None, condition: Condition = unseen, sample=None, **parts) -> np.ndarray:
        predictor = DiffusionPredictor(
            trainer.model, sample or trainer.config.sample, anchor=anchor, ensemble=parts.get("ensemble", ensemble),
            shrinkage=shrinkage, unseen_context_change=0.8,
        )
        return predictor.predict(data, condition, 40, seed=2)

    def scaled(predictor: Predictor, factor) -> np.ndarray:
        shift = predictor.shift(data, unseen)
        scale = factor(shift, predictor.shift_standard_error(data, unseen), 1.0)
        assert scale.min() < 0.9 and scale.max() > 0.1  # some genes shrink, some are nearly kept
        return shift * scale

    plain = predict(None)
    np.testing.assert_array_equal(predict(ShiftShrinkage()), plain)
    as_sampled = dataclasses.replace(  # every gene keeps its sampled change as it is: no test, pull, fraction or rounding
        trainer.config.sample, change_z=None, change_spread=1.0, decrease="shift", increase="shift",
        output_space="continuous", control_mean="donors", nonnegative=False,
    )
    moved = predict(ShiftShrinkage(anchor=1.0), sample=as_sampled, ensemble=None)
    by = 0.8 * (scaled(anchor, wiener) - anchor.shift(data, unseen))
    np.testing.assert_allclose(moved - predict(None, sample=as_sampled, ensemble=None), np.broadcast_to(by, moved.shape), atol=1e-5)
    assert not np.array_equal(predict(ShiftShrinkage(anchor=1.0)), plain)
    given = dataclasses.replace(ensemble, predictor=FixedShift(ensemble.predictor, unseen, scaled(ensemble.predictor, garrote)))
    np.testing.assert_allclose(predict(ShiftShrinkage(ensemble=1.0)), predict(None, ensemble=given), atol=1e-6)
    both = ShiftShrinkage(anchor=1.0, ensemble=1.0)
    np.testing.assert_array_equal(predict(both, trained), predict(None, trained))  # a trained context is not shrunk
    nothing = dataclasses.replace(ensemble, predictor=as_predictor("control").fit(data, trainer.split.train))
    np.testing.assert_array_equal(predict(ShiftShrinkage(ensemble=1e9)), predict(None, ensemble=nothing))


def test_wiener_is_the_normal_posterior_mean_factor() -> None:
    """``s^2 / (s^2 + (k e)^2)``: the posterior mean of a normal mean with prior variance ``s^2`` observed with noise
    variance ``(k e)^2``, over the observation; never 0 for a non-zero estimate, so the order of ``|s|/e`` is kept."""
    rng = np.random.default_rng(3)
    estimate, error = rng.normal(size=50), rng.uniform(0.1, 2.0, 50)
    prior, noise = estimate**2, (1.5 * error) ** 2
    posterior_mean = prior / (prior + noise) * estimate  # the conjugate normal update, written out
    np.testing.assert_allclose(wiener(estimate, error, 1.5) * estimate, posterior_mean, rtol=1e-12)
    assert (wiener(estimate, error, 1.5) > 0).all()
    z = np.abs(estimate) / error
    assert (np.diff(wiener(estimate, error, 1.0)[np.argsort(z)]) >= 0).all()
    np.testing.assert_array_equal(wiener(np.zeros(2), np.zeros(2), 1.0), [1.0, 1.0])


def test_auto_shrinks_where_the_median_training_condition_has_few_cells(three_types: Path, tmp_path: Path) -> None:  # noqa: F811
    """``auto``: 1 standard error below :data:`FEW_CELLS` cells in the median perturbed training condition (as the split
    keeps them), 0 at or above; a number is taken as set, and the run summary says when and why it acts."""
    full = Trainer(held_out_t3(three_types), tmp_path / "full", progress=False)
    kept = Trainer(held_out_t3(three_types, "split.train_fraction=0.4"), tmp_path / "kept", progress=False)
    obs = ad.read_h5ad(three_types).obs
    counts = obs.groupby(["perturbation", "cell_type"], observed=True).size()
    whole = [counts[tuple(label.split("|"))] for label in full.split.train]  # counted from the file itself
    assert median_training_cells(full.data, full.split.train) == np.median(whole)
    assert median_training_cells(kept.data, kept.split.train) == np.median([max(1, round(0.4 * n)) for n in whole])
    assert median_training_cells(full.data, full.split.train) >= FEW_CELLS > median_training_cells(kept.data, kept.split.train)
    assert full.shrinkage == ShiftShrinkage(0.0, 0.0, full.shrinkage.why) and f"at least {FEW_CELLS}" in full.shrinkage.why
    assert (kept.shrinkage.anchor, kept.shrinkage.ensemble) == (1.0, 1.0) and f"fewer than {FEW_CELLS}" in kept.shrinkage.why
    assert "shrunk gene by gene" not in "\n".join(run_summary(full))
    cells = median_training_cells(kept.data, kept.split.train)
    assert (
        "shifts into unseen contexts shrunk gene by gene: the anchor context_fold's by its posterior mean at 1 standard "
        "error; the ensemble context_mixture's by the garrote at 1 standard error (auto: the median training condition "
        f"has {cells:g} cells, fewer than {FEW_CELLS}"
    ) in "\n".join(run_summary(kept))
    set_both = ShiftShrinkage.fit(2.0, 0.5, kept.data, kept.split.train)
    assert set_both == ShiftShrinkage(2.0, 0.5, "as set")
    mixed = ShiftShrinkage.fit(2.0, "auto", full.data, full.split.train)
    assert (mixed.anchor, mixed.ensemble) == (2.0, 0.0)


def test_predicting_again_resolves_the_same_thresholds_and_reads_nothing_without_an_unseen_context(
    three_types: Path, tmp_path: Path  # noqa: F811
) -> None:
    """``perturbdiff predict`` resolves ``auto`` on the run's training data as training did; a prediction in trained
    contexts only does not read the training data for it."""
    run = tmp_path / "run"
    trainer = Trainer(held_out_t3(three_types, "split.train_fraction=0.4"), run, progress=False)
    trainer.fit(stop_at=2)
    checkpoint = load_checkpoint(checkpoint_path(run))
    data = trainer.data
    again = run_shrinkage(checkpoint, lambda: training_data(checkpoint, None), [data.condition("A|t3")], data)
    assert again == trainer.shrinkage
    read = []
    assert run_shrinkage(checkpoint, lambda: read.append(1) or data, [data.condition("A|t1")], data) is None and not read


@pytest.mark.parametrize("key", ["sample.anchor_shrinkage", "sample.ensemble_shrinkage"])
def test_a_negative_or_unknown_threshold_is_a_clear_error(three_types: Path, key: str) -> None:  # noqa: F811
    for value in ("-1", "often"):
        with pytest.raises(ConfigError, match=key.split(".")[1]):
            held_out_t3(three_types, f"{key}={value}")
