"""PerturbationData: conditions and control cells against pandas, reading rows, genes, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scanpy as sc

from perturbdiff_core.data import UNKNOWN, Context, DataConfig, PerturbationData
from perturbdiff_core.errors import DataError

CFG = DataConfig(cell_type_key="cell_type", batch_key="batch")


@pytest.fixture
def adata(make_adata):
    return make_adata(n_cells=480, batches=("b1", "b2"))


def test_conditions_and_controls_match_pandas(adata):
    data = PerturbationData(adata, CFG)
    obs = adata.obs
    seen = 0
    for condition in data.conditions:
        mask = (obs["cell_type"] == condition.cell_type) & (obs["batch"] == condition.batch)
        mask &= obs["perturbation"] == condition.perturbation
        expected = np.flatnonzero(mask.to_numpy())
        np.testing.assert_array_equal(data.cells(condition.label), expected)
        assert condition.n_cells == len(expected) and condition.is_control == (condition.perturbation == "control")
        assert condition.label == "|".join([condition.perturbation, condition.cell_type, condition.batch])
        seen += len(expected)
    assert seen == adata.n_obs
    assert len(data.perturbed_conditions) == 4 * 2 * 2 and len(data.contexts) == 4
    ctx = Context("t2", "b1")
    expected = np.flatnonzero(
        ((obs["perturbation"] == "control") & (obs["cell_type"] == "t2") & (obs["batch"] == "b1")).to_numpy()
    )
    np.testing.assert_array_equal(data.control_cells(ctx), expected)
    with pytest.raises(DataError, match="zero control cells"):
        data.control_cells(Context("t9", "b1"))
    with pytest.raises(DataError, match="'Z|t1|b1' has zero cells"):
        data.cells("Z|t1|b1")


def test_dose_and_covariates_split_conditions(adata):
    adata.obs["time"] = np.random.default_rng(1).choice(["d1", "d2"], adata.n_obs)
    config = DataConfig(cell_type_key="cell_type", dose_key="dose", covariate_keys=["time"], min_cells_per_condition=1)
    data = PerturbationData(adata, config)  # every condition kept, however small: this checks the indexing
    obs = adata.obs
    for condition in data.perturbed_conditions:
        mask = (obs["perturbation"] == condition.perturbation) & (obs["dose"] == condition.dose)
        mask &= (obs["cell_type"] == condition.cell_type) & (obs["time"] == condition.context.covariates[0])
        np.testing.assert_array_equal(data.cells(condition), np.flatnonzero(mask.to_numpy()))
    assert data.condition("A@2|t1|d1").context == Context("t1", None, ("d1",))
    assert len(data.perturbed_conditions) == len(
        obs[obs["perturbation"] != "control"].groupby(["perturbation", "dose", "cell_type", "time"], observed=True)
    )


def test_combination_doses_are_summed(make_adata):
    adata = make_adata(perturbations=("A", "A+B"))
    adata.obs["dose"] = np.where(adata.obs["perturbation"] == "A+B", "1+0.5", "2")
    data = PerturbationData(adata, DataConfig(dose_key="dose"))
    assert {c.label: c.dose for c in data.perturbed_conditions} == {"A+B@1.5": 1.5, "A@2": 2.0}


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("backed", [False, True])
def test_read_rows_in_any_order_with_repeats(make_adata, tmp_path, backed, sparse):
    adata = make_adata(n_cells=480, sparse=sparse)
    source = adata
    if backed:
        source = tmp_path / "screen.h5ad"
        adata.write_h5ad(source)
    genes = ["g7", "g1", "g30", "g2"]
    data = PerturbationData(source, DataConfig(cell_type_key="cell_type", gene_list=genes, backed=backed))
    rows = np.array([300, 5, 5, 120, 0, 479])
    dense = adata.X.toarray() if sparse else adata.X
    expected = dense[:, [adata.var_names.get_loc(g) for g in genes]][rows]
    out = data.read(rows)
    assert out.dtype == np.float32 and out.shape == (6, 4)
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_dense_x_and_all_genes(make_adata):
    adata = make_adata(sparse=False)
    data = PerturbationData(adata, DataConfig())
    assert data.genes == list(adata.var_names)
    np.testing.assert_array_equal(data.read(np.array([3, 1])), adata.X[[3, 1]])


def test_highly_variable_genes_match_scanpy(adata):
    data = PerturbationData(adata, DataConfig(n_genes=12))
    reference = sc.pp.highly_variable_genes(adata, n_top_genes=12, flavor="seurat", inplace=False)
    picked = set(adata.var_names[reference["highly_variable"].to_numpy()])
    score = reference["dispersions_norm"].set_axis(adata.var_names)
    assert len(data.genes) == 12 and set(data.genes) <= picked
    cut = score[data.genes].min()
    assert all(score[g] == cut for g in picked - set(data.genes))  # scanpy keeps ties at the cut
    assert data.genes == [g for g in adata.var_names if g in set(data.genes)]  # data order


def test_gene_list_from_file_keeps_its_order(adata, tmp_path):
    path = tmp_path / "genes.txt"
    path.write_text("g3\ng0\n\ng9\n")
    data = PerturbationData(adata, DataConfig(gene_list=str(path)))
    assert data.genes == ["g3", "g0", "g9"]
    with pytest.raises(DataError, match="twice"):
        PerturbationData(adata, DataConfig(gene_list=["g1", "g1"]))


def test_vocabularies_and_encoder_come_from_training_conditions(adata):
    data = PerturbationData(adata, CFG)
    with pytest.raises(DataError, match=r"not fitted; call data.fit\(split.train\)"):
        data.encode(["A|t1|b1"])
    data.fit([c.label for c in data.perturbed_conditions if c.cell_type == "t1" and c.perturbation != "C"])
    assert data.vocabularies["cell_type"] == [UNKNOWN, "t1"] and data.vocabularies["batch"] == [UNKNOWN, "b1", "b2"]
    assert data.context_indices(Context("t2", "b2")) == (0, 2)  # held-out cell type -> unknown
    assert data.encoder.dim == 2  # A and B
    with pytest.raises(DataError, match="never seen in training: 'C'"):
        data.encode(["C|t2|b1"])


def _state(adata):
    data = PerturbationData(adata, DataConfig(cell_type_key="cell_type", n_genes=10)).fit()
    return data, json.loads(json.dumps(data.to_state()))


def test_state_round_trip_on_new_data_aligns_genes_by_name(adata, make_adata):
    data, state = _state(adata)
    new = make_adata(n_cells=200, seed=5)
    new = new[:, list(reversed(new.var_names))].copy()  # same genes, other order
    again = PerturbationData.from_state(state, new, DataConfig(cell_type_key="cell_type"))
    assert again.genes == data.genes and again.vocabularies == data.vocabularies
    rows = np.array([0, 10, 199])
    np.testing.assert_array_equal(again.read(rows), new[:, data.genes].X.toarray()[rows])
    np.testing.assert_array_equal(again.encode(["A+B|t1"]), data.encode(["A+B|t1"]))


def test_state_with_missing_genes_zero_fills_or_refuses(adata):
    data, state = _state(adata)
    drop = data.genes[:1]
    fewer = adata[:, [g for g in adata.var_names if g not in drop]].copy()
    with pytest.warns(UserWarning, match=f"1 of the model's 10 genes are missing.*{drop[0]}"):
        again = PerturbationData.from_state(state, fewer, DataConfig(cell_type_key="cell_type"))
    assert again.missing_genes == drop
    rows = np.array([4, 2])
    out = again.read(rows)
    assert not out[:, 0].any()
    np.testing.assert_array_equal(out[:, 1:], adata[:, data.genes[1:]].X.toarray()[rows])
    most = adata[:, [g for g in adata.var_names if g not in data.genes[:5]]].copy()
    with pytest.raises(DataError, match=r"5 of the model's 10 genes \(50%\) are missing.*at most 10%"):
        PerturbationData.from_state(state, most, DataConfig(cell_type_key="cell_type"))
    with pytest.raises(DataError, match="not a perturbdiff data state"):
        PerturbationData.from_state({"genes": []}, adata, DataConfig())
