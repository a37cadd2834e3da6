"""Splits: each kind against a direct selection of conditions, JSON round trip, clear errors."""

from __future__ import annotations

import json

import pytest

from perturbdiff_core.data import (
    DataConfig,
    PerturbationData,
    Split,
    SplitConfig,
    make_split,
)
from perturbdiff_core.errors import ConfigError, DataError


@pytest.fixture
def data(make_adata):
    adata = make_adata(
        n_cells=1200, perturbations=("A", "B", "C", "A+B", "C+D"), cell_types=("t1", "t2", "t3"), batches=("b1", "b2")
    )
    return PerturbationData(adata, DataConfig(cell_type_key="cell_type", batch_key="batch"))


def _labels(data, keep):
    return sorted(c.label for c in data.perturbed_conditions if keep(c))


def _check_partition(data, split):
    assert not set(split.train) & set(split.test)
    assert sorted(split.train + split.test) == _labels(data, lambda c: True)
    assert set(split.val) <= set(split.train)


def test_holdout_cell_type_and_batch(data):
    split = make_split(data, SplitConfig(kind="holdout_cell_type", holdout=["t2"]))
    assert split.test == _labels(data, lambda c: c.cell_type == "t2")
    _check_partition(data, split)
    split = make_split(data, SplitConfig(kind="holdout_batch", holdout=["b1"]))
    assert split.test == _labels(data, lambda c: c.batch == "b1")
    _check_partition(data, split)


def test_holdout_perturbation_takes_combinations_with_the_part(data):
    split = make_split(data, SplitConfig(kind="holdout_perturbation", holdout=["A"]))
    assert split.test == _labels(data, lambda c: c.perturbation in ("A", "A+B"))
    _check_partition(data, split)
    split = make_split(data, SplitConfig(kind="holdout_perturbation", holdout=["B+A"]))
    assert split.test == _labels(data, lambda c: c.perturbation == "A+B")


def test_holdout_combination_requires_parts_seen_alone(data):
    split = make_split(data, SplitConfig(kind="holdout_combination", holdout=["B+A"]))
    assert split.test == _labels(data, lambda c: c.perturbation == "A+B")
    _check_partition(data, split)
    with pytest.raises(
        DataError, match=r"'C\+D' cannot be held out as a combination: its part\(s\) D are never trained on alone"
    ):
        make_split(data, SplitConfig(kind="holdout_combination", holdout=["C+D"]))
    with pytest.raises(DataError, match=r"'A' is not a combination.*holdout_perturbation"):
        make_split(data, SplitConfig(kind="holdout_combination", holdout=["A"]))
    with pytest.raises(DataError, match=r"'A\+C' does not exist in the data; valid values: A\+B, C\+D"):
        make_split(data, SplitConfig(kind="holdout_combination", holdout=["A+C"]))


def test_few_shot_moves_a_share_of_the_held_out_context_into_training(data):
    split = make_split(data, SplitConfig(kind="few_shot", holdout=["t3"], few_shot_fraction=0.3, seed=4))
    held = _labels(data, lambda c: c.cell_type == "t3")
    moved = sorted(set(held) - set(split.test))
    assert set(split.test) < set(held) and len(moved) == round(0.3 * len(held))
    assert set(moved) <= set(split.train)
    _check_partition(data, split)


def test_random_split_and_validation_share(data):
    n = len(data.perturbed_conditions)
    split = make_split(data, SplitConfig(kind="random", test_fraction=0.25, val_fraction=0.2, seed=1))
    assert len(split.test) == round(0.25 * n) and len(split.val) == round(0.2 * len(split.train))
    _check_partition(data, split)
    again = make_split(data, SplitConfig(kind="random", test_fraction=0.25, val_fraction=0.2, seed=1))
    other = make_split(data, SplitConfig(kind="random", test_fraction=0.25, val_fraction=0.2, seed=2))
    assert again == split and other.test != split.test


def test_saved_split_reloads_exactly(data, tmp_path):
    split = make_split(data, SplitConfig(kind="few_shot", holdout=["t1"], seed=9))
    path = tmp_path / "out" / "split.json"
    split.save(path)
    assert json.loads(path.read_text())["format"] == "perturbdiff.split/1"
    assert Split.load(path) == split
    assert make_split(data, SplitConfig(kind="random", file=str(path))) == split


def test_reloaded_split_on_data_without_its_conditions(data, make_adata, tmp_path):
    path = tmp_path / "split.json"
    make_split(data, SplitConfig(kind="holdout_cell_type", holdout=["t3"])).save(path)
    smaller = PerturbationData(
        make_adata(n_cells=400, batches=("b1", "b2")), DataConfig(cell_type_key="cell_type", batch_key="batch")
    )
    with pytest.raises(DataError, match="has zero cells in this data"):
        make_split(smaller, SplitConfig(file=str(path)))
    with pytest.raises(DataError, match="No such split file"):
        Split.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a perturbdiff split file"):
        Split.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "config, error, message",
    [
        (SplitConfig(kind="holdout_cell_type"), ConfigError, "needs split.holdout"),
        (SplitConfig(kind="holdout_batch", holdout=["b9"]), DataError, "'b9' does not exist.*valid values: b1, b2"),
        (SplitConfig(kind="holdout_perturbation", holdout=["control"]), DataError, "zero perturbed cells"),
        (
            SplitConfig(kind="holdout_perturbation", holdout=["E"]),
            DataError,
            r"'E' does not exist.*A, A\+B, B, C, C\+D",
        ),
        (
            SplitConfig(kind="few_shot", holdout=["t1"], few_shot_fraction=1.0),
            ConfigError,
            r"split.few_shot_fraction = 1.0 is out of range; set split.few_shot_fraction to a number in \(0, 1\)",
        ),
        (SplitConfig(kind="random", holdout=["t1"]), ConfigError, "leave split.holdout empty"),
        (SplitConfig(kind="holdout_cell_type", holdout=["t1", "t2", "t3"]), DataError, "no training conditions"),
        (SplitConfig(kind="holdout_donor"), ConfigError, "choose one of holdout_cell_type"),
    ],
)
def test_split_errors(data, config, error, message):
    with pytest.raises(error, match=message):
        make_split(data, config)


def test_a_held_out_batch_left_out_for_too_few_cells_says_so(make_adata):
    adata = make_adata(n_cells=1200, perturbations=("A", "B"), cell_types=("t1",), batches=("b1", "b2", "b3"))
    obs = adata.obs
    in_b3 = (obs.batch == "b3").to_numpy()
    few_controls = ~(in_b3 & (obs.perturbation == "control").to_numpy() & (obs.groupby("batch", observed=True).cumcount() >= 3).to_numpy())
    few_perturbed = ~(in_b3 & (obs.perturbation != "control").to_numpy() & (obs.groupby(["batch", "perturbation"], observed=True).cumcount() >= 2).to_numpy())
    for keep, why in ((few_controls, "it has 3 control cell"), (few_perturbed, "each of its 2 perturbed condition")):
        with pytest.warns(UserWarning, match="left out"):
            data = PerturbationData(adata[keep].copy(), DataConfig(cell_type_key="cell_type", batch_key="batch"))
        with pytest.raises(DataError, match=f"Held-out batch 'b3' was left out of the data: {why}.*min_cells_per_condition = 5"):
            make_split(data, SplitConfig(kind="holdout_batch", holdout=["b3"]))


def test_kind_needs_its_key(make_adata):
    data = PerturbationData(make_adata(), DataConfig(cell_type_key="cell_type"))
    with pytest.raises(ConfigError, match="holdout_batch needs data.batch_key"):
        make_split(data, SplitConfig(kind="holdout_batch", holdout=["b1"]))
    patients = PerturbationData(make_adata(batches=("b1", "b2")), DataConfig(batch_key="batch"))  # the patient as the batch
    with pytest.raises(ConfigError, match=r"needs data.cell_type_key .*; or, to hold out values of data.batch_key \('batch'\), split.kind holdout_batch"):
        make_split(patients, SplitConfig(kind="holdout_cell_type", holdout=["b1"]))
    assert len(make_split(data, SplitConfig(kind="random")).test) == round(0.2 * 8)  # 4 perturbations x 2 cell types
