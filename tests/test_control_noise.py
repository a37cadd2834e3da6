"""sample.control_shrinkage: an unseen context's control mean moved towards the training contexts' by its share of noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from test_training import tiny_config

from perturbdiff_core.data.config import DataConfig
from perturbdiff_core.data.dataset import PerturbationData
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError, DataError, InputError
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint
from perturbdiff_core.runs.config import config_from_dict
from perturbdiff_core.runs.control_noise import AUTO_MIN_SHARE, ControlShrinkage, mean_and_noise
from perturbdiff_core.runs.model_predictor import DiffusionPredictor
from perturbdiff_core.runs.prediction import run_control_shrinkage, training_data
from perturbdiff_core.runs.summary import run_summary
from perturbdiff_core.runs.training import Trainer

GENES = 200


REPLICATES = ("r1", "r2", "r3", "r4")


def replicates(n_cells: int, seed: int) -> ad.AnnData:
    """Four batches of one cell type: the same rates, so their control means differ only by sampling noise."""
    return synthetic_screen(n_cells, GENES, cell_types=("t1",), batches=REPLICATES, seed=seed)


def read(adata: ad.AnnData, batch_key: str | None = "batch") -> PerturbationData:
    return PerturbationData(adata, DataConfig(cell_type_key="cell_type", batch_key=batch_key))


def training_labels(data: PerturbationData, held_out: str) -> list[str]:
    """Perturbed conditions outside the context with batch (or cell type) ``held_out``."""
    return [c.label for c in data.perturbed_conditions if held_out not in (c.context.batch, c.context.cell_type)]


def context_of(data: PerturbationData, name: str):
    return next(c for c in data.contexts if name in (c.batch, c.cell_type))


def own_mean_and_noise(data: PerturbationData, context) -> tuple[np.ndarray, np.ndarray]:
    return mean_and_noise(data, data.control_cells(context), np.random.default_rng(0))


def test_the_share_is_the_method_of_moments_posterior_weight() -> None:
    """Against the formula written out in float64 on random means and noises."""
    rng = np.random.default_rng(0)
    means, noise = rng.normal(size=(4, GENES)), rng.gamma(2.0, 0.05, size=(4, GENES))
    mean, own = rng.normal(size=GENES), rng.gamma(2.0, 0.05, size=GENES)
    stacked, noises = np.vstack([means, mean]), np.vstack([noise, own])
    tau2 = np.maximum(stacked.var(0, ddof=1) - noises.mean(0), 0.0)
    expected = 1.0 - tau2.sum() / (tau2.sum() + own.sum())
    shrinkage = ControlShrinkage("auto", means, noise)
    assert shrinkage.estimate(mean, own) == pytest.approx(expected, rel=1e-12)
    assert expected < AUTO_MIN_SHARE and shrinkage.share(mean, own) == 0.0  # distinct contexts keep their mean
    noisy = 50.0 * own  # the same means seen through few cells: mostly noise
    tau2 = np.maximum(stacked.var(0, ddof=1) - np.vstack([noise, noisy]).mean(0), 0.0)
    assert shrinkage.share(mean, noisy) == pytest.approx(1.0 - tau2.sum() / (tau2.sum() + noisy.sum()), rel=1e-12)
    assert shrinkage.share(mean, noisy) >= AUTO_MIN_SHARE
    assert ControlShrinkage(0.3, means, noise).share(mean, own) == 0.3  # a number is used as given
    assert shrinkage.estimate(mean, np.full(GENES, np.nan)) == 0.0  # one control cell: no noise estimate, no shrinkage
    assert ControlShrinkage("auto", means[:0], noise[:0]).estimate(mean, own) == 0.0  # no training context


def test_replicates_are_shrunk_and_distinct_cell_types_are_not() -> None:
    """Four replicates of one cell type with 15 control cells each: the held-out one's control mean is mostly noise,
    and moving it by the estimated share brings it closer to the true level (the mean of 6000 control cells drawn with
    the same rates). Four cell types with their own rates: almost nothing moves."""
    data = read(replicates(240, seed=1))
    shrinkage = ControlShrinkage.fit("auto", data, training_labels(data, "r4"))
    context = context_of(data, "r4")
    observed = data.read(data.control_cells(context)).mean(0)
    offset = shrinkage.offset(data, context)
    truth = synthetic_screen(24000, GENES, cell_types=("t1",), batches=["r1"], seed=1)  # the same rates, many cells
    level = np.asarray(truth[truth.obs.perturbation == "control"].X.mean(0)).ravel()
    assert np.mean((observed + offset - level) ** 2) < 0.7 * np.mean((observed - level) ** 2)
    assert shrinkage.share(*own_mean_and_noise(data, context)) >= AUTO_MIN_SHARE
    types = read(synthetic_screen(240, GENES, cell_types=("t0", "t1", "t2", "t3"), seed=1), batch_key=None)
    distinct = ControlShrinkage.fit("auto", types, training_labels(types, "t3"))
    share, estimate = distinct.context_share(types, context_of(types, "t3"))
    assert 0.0 < estimate < 0.1 and share == 0.0
    assert not distinct.offset(types, context_of(types, "t3")).any()


def test_no_perturbed_cell_reaches_the_offset() -> None:
    adata = replicates(240, seed=2)
    data = read(adata)
    before = ControlShrinkage.fit("auto", data, training_labels(data, "r4")).offset(data, context_of(data, "r4"))
    dense = adata.X.toarray()
    dense[(adata.obs.perturbation != "control").to_numpy()] = 9.0  # every perturbed cell, held out or not, changed
    changed = read(ad.AnnData(dense, obs=adata.obs, var=adata.var))
    after = ControlShrinkage.fit("auto", changed, training_labels(changed, "r4")).offset(changed, context_of(changed, "r4"))
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_the_setting_is_checked() -> None:
    assert config_from_dict({}).sample.control_shrinkage == "auto"
    assert config_from_dict({"sample": {"control_shrinkage": 0}}).sample.control_shrinkage == 0
    with pytest.raises(ConfigError, match="control_shrinkage"):
        config_from_dict({"sample": {"control_shrinkage": 1.5}})
    with pytest.raises(InputError, match=r"auto or a number in \[0, 1\]"):
        ControlShrinkage.fit(2.0, read(replicates(240, seed=0)), [])


def test_the_predictor_moves_only_unseen_contexts_by_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "reps.h5ad"
    replicates(360, seed=3).write_h5ad(path)
    trainer = Trainer(tiny_config(path, "data.batch_key=batch", "split.kind=holdout_batch", "split.holdout=[r4]"),
                      tmp_path / "run", progress=False)
    share, estimate = trainer.control_shrinkage.context_share(trainer.data, context_of(trainer.data, "r4"))
    assert AUTO_MIN_SHARE <= share == estimate < 1.0
    assert f"control means moved towards the training contexts': t1|r4 {share:.0%} (auto" in "\n".join(run_summary(trainer))
    trainer.fit()
    data, train = trainer.data, trainer.split.train
    sample = dataclasses.replace(
        trainer.config.sample, output_space="continuous", change_z=None, nonnegative=False, decrease="shift", change_spread=1.0
    )
    plain = DiffusionPredictor(trainer.model, sample, anchor=trainer.anchor)
    half = ControlShrinkage.fit(0.5, data, train)
    shrunk = DiffusionPredictor(trainer.model, sample, anchor=trainer.anchor, control_shrinkage=half)
    unseen = next(c for c in data.perturbed_conditions if c.context.batch == "r4")
    trained = next(c for c in data.perturbed_conditions if c.context.batch == "r1")
    moved = shrunk.predict(data, unseen, 40, seed=1) - plain.predict(data, unseen, 40, seed=1)
    np.testing.assert_allclose(moved, np.broadcast_to(half.offset(data, unseen.context), moved.shape), atol=1e-5)
    assert np.abs(moved).max() > 1e-3
    np.testing.assert_array_equal(shrunk.predict(data, trained, 40, seed=1), plain.predict(data, trained, 40, seed=1))


def test_predict_moves_an_unseen_context_as_the_run_did(tmp_path: Path) -> None:
    """``perturbdiff predict`` fits the same control means from the run's data as the run itself."""
    path = tmp_path / "reps.h5ad"
    replicates(360, seed=3).write_h5ad(path)
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(path, "data.batch_key=batch", "split.kind=holdout_batch", "split.holdout=[r4]"), run,
                      progress=False)
    trainer.fit(stop_at=2)
    checkpoint = load_checkpoint(checkpoint_path(run))
    unseen = [c for c in trainer.data.perturbed_conditions if c.context.batch == "r4"]
    refitted = run_control_shrinkage(checkpoint, lambda: training_data(checkpoint, trainer.data), unseen, trainer.data)
    context = unseen[0].context
    np.testing.assert_array_equal(refitted.offset(trainer.data, context), trainer.control_shrinkage.offset(trainer.data, context))
    trained = [c for c in trainer.data.perturbed_conditions if c.context.batch == "r1"]
    assert run_control_shrinkage(checkpoint, lambda: pytest.fail("read the run's data"), trained, trainer.data) is None
    path.unlink()  # predicting another file's cells of r4 needs the training contexts' controls, no longer here
    with pytest.raises(DataError, match="fitted on its training data, .*reps.h5ad, which is not available here"):
        training_data(checkpoint, None)


def test_a_run_without_unseen_contexts_reads_no_control_means(tmp_path: Path) -> None:
    path = tmp_path / "reps.h5ad"
    replicates(360, seed=3).write_h5ad(path)
    trainer = Trainer(tiny_config(path, "data.batch_key=batch"), tmp_path / "run", progress=False)  # A+B held out
    assert trainer.control_shrinkage is None
    assert "control means moved" not in "\n".join(run_summary(trainer))
