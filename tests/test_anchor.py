"""model.anchor: fitted on training conditions only, leave-one-out shifts for training conditions, wired to the
model, and the auto rule (context_fold for unseen contexts read centred whose response carries, else none)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from test_baselines import donors_screen
from test_training import tiny_config

from perturbdiff_core.data import ConditionSets, DataConfig, PerturbationData, SplitConfig, collate_sets, make_split
from perturbdiff_core.data.dataset import Context
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.evaluation.predictors import predict_anndata
from perturbdiff_core.runs.anchor import AUTO_MIN_CARRY, PredictorChoice, anchor_shifts, fit_anchor, resolve_anchor
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint
from perturbdiff_core.runs.config import config_from_dict
from perturbdiff_core.runs.ensemble import resolve_ensemble
from perturbdiff_core.runs.model_predictor import DiffusionPredictor
from perturbdiff_core.runs.prediction import checkpoint_predictor, run_anchor, run_ensemble, training_data
from perturbdiff_core.runs.summary import resolved_predictors, run_summary
from perturbdiff_core.runs.training import Trainer
from perturbdiff_core.runs.unseen import UnseenContextChange, leave_one_context_out_slope, training_changes

TEST = ["A+B|t1", "A+B|t2"]


@pytest.fixture()
def data() -> PerturbationData:
    data = PerturbationData(synthetic_screen(600, 30, seed=5), DataConfig(cell_type_key="cell_type"))
    return data.fit([c.label for c in data.perturbed_conditions if c.label not in TEST])


def train_of(data: PerturbationData) -> list[str]:
    return [c.label for c in data.perturbed_conditions if c.label not in TEST]


def test_no_held_out_cell_reaches_the_anchor(data: PerturbationData, monkeypatch) -> None:
    read: list[np.ndarray] = []
    original = data.read
    monkeypatch.setattr(data, "read", lambda rows: read.append(np.asarray(rows)) or original(rows))
    for name in ("context_mean", "context_fold", "context_mixture", "linear", "random_train", "control"):
        anchor = fit_anchor(name, data, train_of(data))
        anchor_shifts(anchor, data, [*train_of(data), *TEST])
    held_out = np.concatenate([data.cells(c) for c in TEST])
    assert read and not np.isin(np.concatenate(read), held_out).any()


def test_training_shifts_leave_the_condition_out(data: PerturbationData) -> None:
    """context_mean's shift of a training condition is the mean shift of the same perturbation elsewhere."""
    shifts = anchor_shifts(fit_anchor("context_mean", data, train_of(data)), data, train_of(data))

    def mean_shift(label: str) -> np.ndarray:
        c = data.condition(label)
        return data.read(data.cells(c)).mean(0, dtype=np.float64) - data.read(data.control_cells(c.context)).mean(0, dtype=np.float64)

    np.testing.assert_allclose(shifts["A|t1"], mean_shift("A|t2"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shifts["A|t2"], mean_shift("A|t1"), rtol=1e-5, atol=1e-6)
    held_out = anchor_shifts(fit_anchor("context_mean", data, train_of(data)), data, TEST)
    np.testing.assert_allclose(held_out["A+B|t1"], mean_shift("A|t1") + mean_shift("B|t1"), rtol=1e-5, atol=1e-6)
    assert fit_anchor("none", data, train_of(data)) is None and anchor_shifts(None, data, TEST) is None


def test_sets_carry_their_condition_shift(data: PerturbationData) -> None:
    shifts = {label: np.full(data.n_genes, float(i), dtype=np.float32) for i, label in enumerate(train_of(data))}
    sets = ConditionSets(data, train_of(data), set_size=5, shifts=shifts)
    batch = collate_sets([sets[i] for i in range(3)])
    expected = torch.tensor([shifts[label][0] for label in batch.condition])
    assert batch.cond.shift.shape == (3, data.n_genes)
    torch.testing.assert_close(batch.cond.shift[:, 0], expected)
    assert collate_sets([ConditionSets(data, train_of(data), set_size=5)[0]]).cond.shift is None


def test_anchor_config() -> None:
    assert config_from_dict({"model": {"relative_to_control": True}}).model.anchor_name == "control"
    assert config_from_dict({"model": {"anchor": "context_mean"}}).model.anchor_name == "context_mean"
    assert config_from_dict({}).model.anchor_name == "auto"
    assert config_from_dict({"model": {"anchor": "none"}}).model.anchor_name == "none"
    assert config_from_dict({"train": {"objective": "marginal"}}).model.anchor_name == "auto"  # resolves to none there
    with pytest.raises(ConfigError, match="model.anchor = 'contxt_mean' is not a predictor.*context_mean"):
        config_from_dict({"model": {"anchor": "contxt_mean"}})
    with pytest.raises(ConfigError, match="marginal"):
        config_from_dict({"model": {"anchor": "context_mean"}, "train": {"objective": "marginal"}})


@pytest.fixture(scope="module")
def three_types(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic screen of 3 cell types x (A, B, C, A+B) and controls; each perturbation acts alike in all."""
    path = tmp_path_factory.mktemp("three") / "three.h5ad"
    synthetic_screen(900, 30, cell_types=("t1", "t2", "t3"), seed=4).write_h5ad(path)
    return path


def held_out_t3(path: Path, *overrides: str):
    """t3 held out, its control cells read centred (as control_levels auto reads contexts training does not span)
    unless ``overrides`` set ``model.control_levels`` again."""
    return tiny_config(path, "split.kind=holdout_cell_type", "split.holdout=[t3]", "model.control_levels=centred", *overrides)


@pytest.mark.parametrize("levels", ["centred", "hull"])
def test_auto_anchors_an_unseen_context_whose_response_carries(three_types: Path, tmp_path: Path, levels: str) -> None:
    """Whether the denoiser reads the held-out context's levels (hull) or not (centred), auto anchors it."""
    trainer = Trainer(held_out_t3(three_types, f"model.control_levels={levels}"), tmp_path / "run", progress=False)
    data, split = trainer.data, trainer.split
    slope, pairs = leave_one_context_out_slope(training_changes(data, split.train, 5))
    assert slope >= AUTO_MIN_CARRY and pairs == 8
    assert trainer.anchor_choice == resolve_anchor("auto", data, split, 5)
    assert trainer.anchor_choice.name == "context_fold" and f"factor {slope:.2f} over 8" in trainer.anchor_choice.why
    assert trainer.anchor is not None and trainer.train_sets.shift is not None  # training sets carry the shifts
    assert f"anchor context_fold ({trainer.anchor_choice.why})" in "\n".join(run_summary(trainer))
    assert resolve_anchor("linear", data, split, 5).name == "linear"  # a name is kept as given
    measured = UnseenContextChange(0.2, pairs=3, slope=0.2)  # a factor the run measured already is not read again
    assert "factor 0.20 over 3" in resolve_anchor("auto", data, split, 5, measured).why
    assert resolve_anchor("auto", data, split, 5, measured).name == "none"
    assert resolve_anchor("auto", data, split, 5, UnseenContextChange(0.3)).name == "context_fold"  # unmeasured
    combination = Trainer(tiny_config(three_types), tmp_path / "combo", progress=False)  # A+B in trained types
    assert combination.anchor_choice.name == "none" and "every test context was trained" in combination.anchor_choice.why
    assert combination.anchor is None and combination.train_sets.shift is None
    # with auto the config does not say which baselines shape the prediction: the summary and report do, none included
    assert "anchor none (auto: every test context was trained)" in "\n".join(run_summary(combination))
    facts = resolved_predictors(trainer)
    assert facts["anchor"] == f"context_fold ({trainer.anchor_choice.why})"
    assert facts["ensemble"].startswith(f"context_mixture, weight 0.5, averaged into the mean change of {len(split.test)} of "
                                        f"{len(split.test)} test conditions (auto: unseen contexts")


def test_a_checkpoints_predictor_samples_what_the_run_did(three_types: Path, tmp_path: Path) -> None:
    """``perturbdiff predict``'s predictor (``checkpoint_predictor``) refits every rule the run resolved, anchor and
    ensemble included, so it gives the run's own cells; the model alone (``from_checkpoint``) does not."""
    run = tmp_path / "run"
    trainer = Trainer(held_out_t3(three_types), run, progress=False)
    trainer.fit(stop_at=4)
    assert trainer.anchor is not None and trainer.ensemble is not None
    checkpoint = load_checkpoint(checkpoint_path(run))
    data, test = trainer.data, [trainer.data.condition(c) for c in trainer.split.test]
    refitted = checkpoint_predictor(checkpoint, "cpu", lambda: training_data(checkpoint, data), test, data)
    ran = predict_anndata(trainer.predictor(), data, test, seed=3, progress=False)
    np.testing.assert_array_equal(predict_anndata(refitted, data, test, seed=3, progress=False).X, ran.X)
    bare = predict_anndata(DiffusionPredictor.from_checkpoint(checkpoint), data, test, seed=3, progress=False)
    assert not np.array_equal(bare.X, ran.X)


def test_auto_leaves_out_the_anchor_where_responses_do_not_carry(three_types: Path, tmp_path: Path) -> None:
    """In t2 each perturbation's cells are relabelled as another's, so a change in one context says nothing of it in
    the other: the factor falls below AUTO_MIN_CARRY and auto keeps no anchor."""
    swapped = ad.read_h5ad(three_types)
    names = swapped.obs["perturbation"].astype(str).to_numpy()
    in_t2 = (swapped.obs["cell_type"] == "t2").to_numpy()
    relabel = {"A": "B", "B": "C", "C": "A+B", "A+B": "A", "control": "control"}
    swapped.obs["perturbation"] = np.where(in_t2, [relabel[n] for n in names], names)
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", source=swapped, progress=False)
    slope, _ = leave_one_context_out_slope(training_changes(trainer.data, trainer.split.train, 5))
    assert slope < AUTO_MIN_CARRY
    assert trainer.anchor_choice.name == "none" and f"an anchor needs {AUTO_MIN_CARRY:g}" in trainer.anchor_choice.why


def test_the_checkpoint_carries_the_resolved_anchor(three_types: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(held_out_t3(three_types), run, progress=False)
    trainer.fit(stop_at=4)
    checkpoint = load_checkpoint(checkpoint_path(run))
    assert checkpoint.run_config.model.anchor == "auto" and checkpoint.anchor_name == "context_fold"
    refitted = run_anchor(checkpoint, lambda: training_data(checkpoint, trainer.data))
    unseen = trainer.data.condition("A|t3")
    np.testing.assert_allclose(refitted.shift(trainer.data, unseen), trainer.anchor.shift(trainer.data, unseen))
    resumed = Trainer(held_out_t3(three_types), run, resume=True, progress=False)
    assert resumed.anchor_choice.name == "context_fold" and "as the run resolved it" in resumed.anchor_choice.why
    payload = torch.load(checkpoint_path(run), weights_only=True)
    older = tmp_path / "older.pt"
    torch.save({k: v for k, v in payload.items() if k != "anchor"}, older)
    assert load_checkpoint(older).anchor_name == "none"  # written before auto existed: trained without an anchor


def test_an_anchored_prediction_keeps_the_anchor_where_the_model_adds_nothing_significant(three_types: Path, tmp_path: Path) -> None:
    """With a change test no sampled change passes, each predicted cell is its control cell plus the anchor's shift
    (scaled by the run's unseen-context factor): the anchor is a prior the test does not erase."""
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    trainer.fit()
    data, condition = trainer.data, trainer.data.condition("A|t3")
    sample = dataclasses.replace(
        trainer.config.sample, output_space="continuous", change_z=1e9, nonnegative=False, decrease="shift",
        control_mean="donors",
    )
    scale = 0.5
    predictor = DiffusionPredictor(trainer.model, sample, anchor=trainer.anchor, unseen_context_change=scale)
    cells = predictor.predict(data, condition, 40, seed=3)
    controls = data.read(data.control_cells(condition.context))
    shift = scale * trainer.anchor.shift(data, condition)
    assert np.abs(shift).max() > 0.1
    assert all((np.abs(controls + shift - cell).max(axis=1) < 1e-5).any() for cell in cells)


def test_auto_ensemble_averages_where_the_model_extrapolates(three_types: Path, tmp_path: Path) -> None:
    """``sample.ensemble: auto``: context_mixture, fitted on the training conditions, for an anchored run's unseen
    contexts and for combinations never trained whose parts were; a trained perturbation in a trained context,
    and an unanchored run's unseen contexts, keep the model's mean change."""
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    data = trainer.data
    assert trainer.anchor_choice.name == "context_fold" and trainer.ensemble.choice.name == "context_mixture"
    assert type(trainer.ensemble.predictor).__name__ == "ContextMixtureBaseline"
    assert trainer.ensemble.applies(data, data.condition("A|t3")) and not trainer.ensemble.applies(data, data.condition("A|t1"))
    assert "averaged with context_mixture's shift (weight 0.5; auto: unseen contexts" in "\n".join(run_summary(trainer))
    unseen = data.condition("A|t3")
    refitted = fit_anchor("context_mixture", data, trainer.split.train)
    np.testing.assert_array_equal(trainer.ensemble.predictor.shift(data, unseen), refitted.shift(data, unseen))
    assert resolve_ensemble("linear", "none") == PredictorChoice("linear")
    assert "new combinations of trained parts (the run has no anchor" in resolve_ensemble("auto", "none").why
    off = Trainer(held_out_t3(three_types, "sample.ensemble=none"), tmp_path / "off", progress=False)
    assert off.ensemble is None and "averaged with" not in "\n".join(run_summary(off))
    combination = Trainer(tiny_config(three_types), tmp_path / "combo", progress=False)  # A+B held out in trained types
    assert combination.anchor_choice.name == "none"
    ensemble, combo_data = combination.ensemble, combination.data
    assert ensemble.applies(combo_data, combo_data.condition("A+B|t1")) and not ensemble.unseen_contexts
    assert not ensemble.applies(combo_data, combo_data.condition("A|t1"))
    np.testing.assert_allclose(  # the sum of the parts' shifts in the same cell type
        ensemble.predictor.shift(combo_data, combo_data.condition("A+B|t1")),
        fit_anchor("context_mean", combo_data, combination.split.train).shift(combo_data, combo_data.condition("A+B|t1")),
    )


def test_the_ensemble_moves_the_unseen_contexts_prediction_only(three_types: Path, tmp_path: Path) -> None:
    """The ensemble changes a held-out context's predicted cells and, refitted by ``perturbdiff predict``, the same
    way; at weight 0 it changes nothing but the genes its response gate keeps from moving; a condition it does not
    apply to is predicted as without it."""
    run = tmp_path / "run"
    trainer = Trainer(held_out_t3(three_types), run, progress=False)
    trainer.fit(stop_at=4)
    data, unseen = trainer.data, trainer.data.condition("A|t3")
    sample = trainer.config.sample

    def predict(ensemble, weight: float = sample.ensemble_weight, condition=unseen) -> np.ndarray:
        config = dataclasses.replace(sample, ensemble_weight=weight)
        predictor = DiffusionPredictor(trainer.model, config, anchor=trainer.anchor, ensemble=ensemble)
        return predictor.predict(data, condition, 40, seed=2)

    alone, averaged = predict(None), predict(trainer.ensemble)
    assert not np.array_equal(alone, averaged)
    ungated = dataclasses.replace(trainer.ensemble, support=None)  # sample.response_fdr: null
    np.testing.assert_array_equal(predict(ungated, 0.0), alone)
    reach = trainer.ensemble.reach(data, unseen).numpy()  # at weight 0 the gate alone acts, on the genes outside its reach
    assert 0 < reach.sum() < data.n_genes
    np.testing.assert_array_equal(predict(trainer.ensemble, 0.0)[:, reach], alone[:, reach])
    trained = data.condition("A|t1")
    np.testing.assert_array_equal(predict(trainer.ensemble, condition=trained), predict(None, condition=trained))
    checkpoint = load_checkpoint(checkpoint_path(run))
    refitted = run_ensemble(checkpoint, lambda: training_data(checkpoint, data), [unseen], data)
    np.testing.assert_array_equal(predict(refitted), averaged)
    np.testing.assert_array_equal(refitted.errors.errors, trainer.ensemble.errors.errors)  # later populations alike
    read = []
    assert run_ensemble(checkpoint, lambda: read.append(1) or data, [trained], data) is None and not read  # nothing to fit


def test_later_populations_spread_where_the_model_extrapolates(three_types: Path, tmp_path: Path) -> None:
    """The first population is ``predict``'s; a later one with the same seed differs only where the model
    extrapolates, and predict_anndata asks each population by its index."""
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    trainer.fit(stop_at=4)
    data, unseen, trained = trainer.data, trainer.data.condition("A|t3"), trainer.data.condition("A|t1")
    predictor = DiffusionPredictor(trainer.model, trainer.config.sample, anchor=trainer.anchor, ensemble=trainer.ensemble)
    first = predictor.predict_population(data, unseen, 40, 7, 0)
    np.testing.assert_array_equal(first, predictor.predict(data, unseen, 40, seed=7))
    assert not np.array_equal(first, predictor.predict_population(data, unseen, 40, 7, 3))
    np.testing.assert_array_equal(
        predictor.predict_population(data, trained, 40, 7, 3), predictor.predict_population(data, trained, 40, 7, 0)
    )
    asked = []

    class Recording(DiffusionPredictor):
        def predict_population(self, data, condition, n_cells, seed, population):
            asked.append(population)
            return super().predict_population(data, condition, n_cells, seed, population)

    recording = Recording(trainer.model, trainer.config.sample, anchor=trainer.anchor, ensemble=trainer.ensemble)
    predict_anndata(recording, data, [unseen], n_cells=10, seed=0, populations=3, progress=False)
    assert asked == [0, 1, 2]


def test_an_unanchored_unseen_context_spreads_without_averaging(three_types: Path, tmp_path: Path) -> None:
    """Without an anchor, auto's predictor is not averaged into an unseen context's mean change, yet its errors
    on training conditions held out alike still spread the later populations there."""
    config = held_out_t3(three_types, "model.anchor=none", "sample.populations=3")
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.fit(stop_at=4)
    data, unseen = trainer.data, trainer.data.condition("A|t3")
    ensemble = trainer.ensemble
    assert not ensemble.applies(data, unseen) and ensemble.spreads(data, unseen)
    assert ensemble.errors.errors.shape == (8, data.n_genes)  # A, B, C, A+B in t1 and in t2
    summary = "\n".join(run_summary(trainer))
    assert "averaged with" not in summary and "A|t3" in summary and "errors on 8 training conditions" in summary
    predictor = DiffusionPredictor(trainer.model, trainer.config.sample, ensemble=ensemble)
    alone = DiffusionPredictor(trainer.model, trainer.config.sample)
    np.testing.assert_array_equal(predictor.predict(data, unseen, 40, seed=7), alone.predict(data, unseen, 40, seed=7))
    assert not np.array_equal(predictor.predict_population(data, unseen, 40, 7, 1), alone.predict_population(data, unseen, 40, 7, 1))


def test_an_unknown_ensemble_predictor_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="sample.ensemble = 'contxt_mixture' is not a predictor.*context_mixture"):
        config_from_dict({"sample": {"ensemble": "contxt_mixture"}})


def test_auto_anchors_a_held_out_donor_on_its_own_cell_types_response() -> None:
    """Two cell types responding oppositely, in three donors, donor b3 held out: each training context's change is
    predicted from its own cell type in the other donor (factor about 1), so auto anchors; averaged over every other
    context instead, the opposite response would cancel it (factor below AUTO_MIN_CARRY) and auto would not."""
    data = PerturbationData(donors_screen(), DataConfig(cell_type_key="cell_type", batch_key="donor"))
    split = make_split(data, SplitConfig(kind="holdout_batch", holdout=["b3"], val_fraction=0.0))
    data.fit(split.train)
    changes = training_changes(data, split.train, 0)
    slope, pairs = leave_one_context_out_slope(changes)
    assert pairs == 4 and slope > 0.9
    assert resolve_anchor("auto", data, split, 0).name == "context_fold"
    every_other = {(p, Context(c.label)): change for (p, c), change in changes.items()}  # no two share a cell type
    assert leave_one_context_out_slope(every_other)[0] < AUTO_MIN_CARRY
