"""model.anchor: fitted on training conditions only, leave-one-out shifts for training conditions, wired to the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff_core.data import ConditionSets, DataConfig, PerturbationData, collate_sets
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.runs.anchor import anchor_shifts, fit_anchor
from perturbdiff_core.runs.config import config_from_dict

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
    for name in ("context_mean", "linear", "random_train", "control"):
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
    assert config_from_dict({}).model.anchor_name == "none"
    with pytest.raises(ConfigError, match="model.anchor = 'contxt_mean' is not a predictor.*context_mean"):
        config_from_dict({"model": {"anchor": "contxt_mean"}})
    with pytest.raises(ConfigError, match="marginal"):
        config_from_dict({"model": {"anchor": "context_mean"}, "train": {"objective": "marginal"}})
