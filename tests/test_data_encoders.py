"""Perturbation encoders: one-hot and lookup tables, combinations as sums, doses, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from perturbdiff_core import registry
from perturbdiff_core.data.encoders import PerturbationEncoder, perturbation_parts
from perturbdiff_core.errors import DataError
from perturbdiff_plugins.encoders import LookupEncoder, OneHotEncoder

TRAIN = ["B", "A", "control", "A+B", "C"]


def test_parts_split_combinations_and_drop_control():
    assert perturbation_parts("A+B") == ["A", "B"]
    assert perturbation_parts("KLF1+ctrl", control_label="ctrl") == ["KLF1"]
    assert perturbation_parts("control") == []
    assert perturbation_parts("x;y", separator=";") == ["x", "y"]


def test_onehot_sum_of_parts_against_indicator_reference():
    enc = OneHotEncoder().fit(TRAIN)
    assert enc.vocabulary == ["A", "B", "C"] and enc.dim == 3
    names = ["A+B", "C", "control", "B+A", "A+C+B"]
    expected = np.zeros((len(names), 3))
    for row, name in enumerate(names):
        for part in name.split("+"):
            if part != "control":
                expected[row, enc.vocabulary.index(part)] += 1
    out = enc.encode(names)
    assert out.dtype == torch.float32 and out.shape == (5, 3)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_onehot_unseen_perturbation_is_a_clear_error():
    enc = OneHotEncoder().fit(TRAIN)
    with pytest.raises(DataError, match=r"never seen in training: 'D'.*lookup"):
        enc.encode(["A+D"])


def test_unfitted_encoder_says_fit_first():
    with pytest.raises(DataError, match="not fitted"):
        OneHotEncoder().encode(["A"])


def test_dose_feature_is_log1p_and_zero_for_control():
    enc = OneHotEncoder().fit(TRAIN, use_dose=True)
    doses = [10.0, 0.5, 3.0]
    out = enc.encode(["A", "A+B", "control"], doses).numpy()
    assert enc.dim == 4
    np.testing.assert_allclose(out[:, -1], [np.log(11.0), np.log(1.5), 0.0], rtol=1e-6)
    assert not out[2].any()
    with pytest.raises(DataError, match="one dose per perturbation"):
        enc.encode(["A"])
    with pytest.raises(DataError, match="not a finite non-negative"):
        enc.encode(["A"], [-1.0])
    with pytest.raises(DataError, match="fitted without a dose"):
        OneHotEncoder().fit(TRAIN).encode(["A"], [1.0])


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(3)
    names = ["A", "B", "C", "D"]
    vectors = rng.normal(size=(4, 6))
    return names, vectors


def _write(kind, tmp_path, names, vectors):
    if kind == "npz":
        path = tmp_path / "emb.npz"
        np.savez(path, names=np.array(names), vectors=vectors)
    else:
        frame = pd.DataFrame(vectors, columns=[f"f{i}" for i in range(vectors.shape[1])])
        frame.insert(0, "name", names)
        path = tmp_path / f"emb.{kind}"
        frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet", "npz"])
def test_lookup_table_formats_sum_and_unseen_with_vector(kind, tmp_path, table):
    names, vectors = table
    enc = LookupEncoder(path=str(_write(kind, tmp_path, names, vectors))).fit(["A", "B", "A+B", "control"])
    out = enc.encode(["A+B", "D", "control", "C+D"]).numpy().astype(np.float64)
    expected = np.stack([vectors[0] + vectors[1], vectors[3], np.zeros(6), vectors[2] + vectors[3]])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(DataError, match=r"No vector for perturbation\(s\) 'E'"):
        enc.encode(["A+E"])


def test_lookup_refuses_training_perturbations_without_vectors(tmp_path, table):
    names, vectors = table
    path = _write("csv", tmp_path, names, vectors)
    with pytest.raises(DataError, match="'Z'"):
        LookupEncoder(path=str(path)).fit(["A", "Z"])


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,f0\nA,1\nA,2\n", "names some perturbations twice"),
        ("name,f0\nA,1\nB,nan\n", "NaN or Inf"),
        ("name,f0\nA,1\nB,x\n", "non-numeric"),
        ("name\nA\n", "one non-empty vector"),
    ],
)
def test_bad_lookup_tables(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        LookupEncoder(path=str(path)).fit(["A"])


def test_lookup_missing_file_and_npz_arrays(tmp_path):
    with pytest.raises(DataError, match="No such lookup table"):
        LookupEncoder(path=str(tmp_path / "none.csv")).fit(["A"])
    np.savez(tmp_path / "x.npz", keys=np.array(["A"]))
    with pytest.raises(DataError, match="'names' and 'vectors'"):
        LookupEncoder(path=str(tmp_path / "x.npz")).fit(["A"])


@pytest.mark.parametrize("name", ["onehot", "lookup"])
def test_registry_build_and_json_state_round_trip(name, tmp_path, table):
    names, vectors = table
    params = {"path": str(_write("npz", tmp_path, names, vectors))} if name == "lookup" else {}
    enc = registry.load("perturbdiff.encoders", name, **params)
    assert isinstance(enc, PerturbationEncoder)
    enc.fit(["A", "B", "C+A"], separator="+", use_dose=True)
    state = json.loads(json.dumps(enc.state_dict()))
    again = registry.load("perturbdiff.encoders", name, **params).load_state_dict(state)
    query, doses = ["A+B", "C", "control"], [1.0, 2.0, 0.0]
    assert again.dim == enc.dim
    torch.testing.assert_close(again.encode(query, doses), enc.encode(query, doses))


def test_lookup_encoder_predicts_a_held_out_perturbation(make_adata, tmp_path, table):
    from perturbdiff_core.data import DataConfig, SplitConfig, prepare

    names, vectors = table
    path = _write("csv", tmp_path, names, vectors)
    config = DataConfig(cell_type_key="cell_type", encoder="lookup", encoder_params={"path": str(path)})
    data, split = prepare(config, SplitConfig(kind="holdout_perturbation", holdout=["C"]), make_adata())
    assert sorted(split.test) == ["C|t1", "C|t2"]
    np.testing.assert_allclose(data.encode(["C|t1"]).numpy()[0], vectors[2], rtol=1e-6)
