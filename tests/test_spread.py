"""The spread of later populations: a predictor's errors on training conditions held out alike (runs/spread.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff_core.data import DataConfig, PerturbationData
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.evaluation.predictors import as_predictor
from perturbdiff_core.runs import spread
from perturbdiff_core.runs.spread import ExtrapolationErrors, extrapolation_errors, held_out_alike

TEST = ["A+B|t1"]


@pytest.fixture(scope="module")
def data() -> PerturbationData:
    """Two cell types x (A, B, C, A+B); A+B|t1 held out, so A+B|t2 is a trained combination of trained parts."""
    data = PerturbationData(synthetic_screen(800, 30, seed=3), DataConfig(cell_type_key="cell_type"))
    return data.fit(train_of(data))


def train_of(data: PerturbationData) -> list[str]:
    return [c.label for c in data.perturbed_conditions if c.label not in TEST]


def mean_change(data: PerturbationData, label: str) -> np.ndarray:
    """Float64 mean of a condition's cells minus its context's control mean, read whole."""
    condition = data.condition(label)
    cells = data.read(data.cells(condition)).astype(np.float64).mean(0)
    return cells - data.read(data.control_cells(condition.context)).astype(np.float64).mean(0)


def test_held_out_alike(data: PerturbationData) -> None:
    def labels(training: list[str]) -> list[str]:
        return [c.label for c in held_out_alike(data, [data.condition(t) for t in training])]

    assert labels(["A|t1", "A|t2", "B|t1"]) == ["A|t1", "A|t2"]  # A trained in another cell type; B only in t1
    assert labels(["A+B|t2", "A|t1", "B|t2"]) == ["A+B|t2"]  # a combination of trained parts
    assert labels(["A+B|t2", "A|t2", "C|t2"]) == []  # B never trained


def test_errors_are_real_changes_minus_the_leave_one_out_prediction(data: PerturbationData) -> None:
    """Against a float64 reference: context_mean predicts a training single from the same perturbation in the
    other cell type, and the trained combination A+B|t2 from its own cell type's parts (its twin A+B|t1 is held out)."""
    training = [data.condition(label) for label in train_of(data)]
    errors = extrapolation_errors(as_predictor("context_mean").fit(data, training), data, training, seed=0)
    other = {"t1": "t2", "t2": "t1"}
    expected = []
    for condition in training:
        real = mean_change(data, condition.label)
        if "+" in condition.perturbation:
            predicted = sum(mean_change(data, f"{part}|{condition.cell_type}") for part in ("A", "B"))
        else:
            predicted = mean_change(data, f"{condition.perturbation}|{other[condition.cell_type]}")
        expected.append(real - predicted)
    assert len(training) == 7 and errors.errors.shape == (7, data.n_genes)
    np.testing.assert_allclose(errors.errors, np.stack(expected), rtol=1e-4, atol=1e-5)
    assert np.abs(errors.errors).max() > 0.05  # not all zeros


def test_errors_are_capped_and_absent_without_a_condition_held_out_alike(data: PerturbationData, monkeypatch) -> None:
    training = [data.condition(label) for label in train_of(data)]
    predictor = as_predictor("context_mean").fit(data, training)
    full = extrapolation_errors(predictor, data, training, seed=0).errors
    monkeypatch.setattr(spread, "ERROR_CONDITIONS", 3)
    capped = extrapolation_errors(predictor, data, training, seed=1).errors
    assert capped.shape == (3, data.n_genes)
    assert all(np.isclose(full, row, rtol=1e-5, atol=1e-6).all(axis=1).any() for row in capped)
    singles_in_t1 = [c for c in training if c.cell_type == "t1"]  # nothing trained elsewhere, no combination
    assert extrapolation_errors(as_predictor("context_mean").fit(data, singles_in_t1), data, singles_in_t1, 0) is None


def test_a_draw_is_one_error_times_a_normal_factor() -> None:
    """Each draw is a multiple of one error vector; over many draws each gene's mean square is the errors' (E xi^2 = 1)."""
    rng = np.random.default_rng(0)
    errors = ExtrapolationErrors(rng.normal(size=(3, 20)))
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([errors.draw(generator) for _ in range(6000)]).numpy()
    for draw in draws[:50]:  # parallel to one of the errors
        assert min(np.linalg.norm(draw - (draw @ e) / (e @ e) * e) for e in errors.errors) < 1e-9
    np.testing.assert_allclose((draws**2).mean(0), (errors.errors**2).mean(0), rtol=0.12)
    assert abs(draws.mean(0)).max() < 0.1


def test_no_held_out_cell_reaches_the_errors(data: PerturbationData, monkeypatch) -> None:
    training = [data.condition(label) for label in train_of(data)]
    predictor = as_predictor("context_mixture").fit(data, training)
    read: list[np.ndarray] = []
    original = data.read
    monkeypatch.setattr(data, "read", lambda rows: read.append(np.asarray(rows)) or original(rows))
    extrapolation_errors(predictor, data, training, seed=0)
    held_out = np.concatenate([data.cells(data.condition(label)) for label in TEST])
    assert read and not np.isin(np.concatenate(read), held_out).any()
