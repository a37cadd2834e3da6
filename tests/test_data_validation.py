"""Every invalid input gets one clear one-line DataError (problem and fix), and nothing is written."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from perturbdiff_core.data import DataConfig, PerturbationData, SplitConfig, prepare
from perturbdiff_core.data.anndata_io import MAX_LOG1P, TARGET_SUM
from perturbdiff_core.errors import ConfigError, DataError, PerturbDiffError, PerturbDiffWarning

CFG = {"cell_type_key": "cell_type"}


def _error(adata, message, *, split=None, error=DataError, **config):
    """Assert preparing ``adata`` raises ``error`` matching ``message`` as a single line."""
    with pytest.raises(error, match=message) as info:
        prepare(DataConfig(**{**CFG, **config}), split or SplitConfig(), adata)
    assert "\n" not in str(info.value)
    return info.value


def _with_x(adata, transform):
    x = adata.X.toarray()
    transform(x)
    return ad.AnnData(sp.csr_matrix(x), obs=adata.obs, var=adata.var)


def test_missing_obs_key_lists_columns(make_adata):
    _error(
        make_adata(),
        r"obs has no column 'celltype' \(the cell type key\).*perturbation, cell_type, dose",
        cell_type_key="celltype",
    )


def test_missing_control_label_lists_values(make_adata):
    _error(make_adata(), r"Control label 'ctrl' not found.*values found: A, A\+B, B, C, control", control_label="ctrl")


def test_cells_without_a_label(make_adata):
    adata = make_adata()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("cell_type")] = np.nan
    _error(adata, r"obs\['cell_type'\].*1 cells without a value")


@pytest.mark.parametrize("key, text", [("perturbation", "nan"), ("cell_type", "None"), ("perturbation", " ")])
def test_labels_a_missing_value_left_as_text_are_refused(make_adata, key, text):
    adata = make_adata()
    labels = adata.obs[key].astype(str).to_numpy().copy()
    labels[[3, 7]] = text  # as astype(str) leaves NaN and None
    adata.obs[key] = pd.Categorical(labels)
    _error(adata, rf"obs\['{key}'\].*2 cells labelled '{text}', text a missing value leaves")


def test_a_control_label_spelt_none_is_a_label(make_adata):
    adata = make_adata()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(str).replace({"control": "None"})
    data = PerturbationData(adata, DataConfig(cell_type_key="cell_type", control_label="None"))
    assert data.control_cells(data.perturbed_conditions[0].context).size > 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf(make_adata, bad):
    def poke(x):
        x[5, 2] = bad

    _error(_with_x(make_adata(), poke), "NaN or Inf")


def test_negative_values(make_adata):
    def centre(x):
        x -= x.mean(0)

    _error(_with_x(make_adata(), centre), "negative values.*not scaled or centred")


def test_raw_counts_are_refused_or_normalised_like_scanpy(make_adata, tmp_path):
    counts = make_adata(counts=True)
    error = _error(counts, r"raw counts.*data.normalize: true")
    assert "layers" not in str(error)
    with_layer = counts.copy()
    with_layer.layers["log1p"] = make_adata().X  # the expression wanted, in a layer
    _error(with_layer, r"raw counts.*The file has layers 'log1p': if one holds the expression asked for, name it in "
           r"data.layer")
    with_layer.write_h5ad(tmp_path / "layered.h5ad")  # a file names its layers too
    _error(str(tmp_path / "layered.h5ad"), r"raw counts.*The file has layers 'log1p'")
    data, _ = prepare(DataConfig(**CFG, normalize=True), SplitConfig(), counts)
    reference = counts.copy()  # scanpy on the whole matrix is the reference
    sc.pp.normalize_total(reference, target_sum=TARGET_SUM)
    sc.pp.log1p(reference)
    rows = np.array([7, 0, 7, 150])
    np.testing.assert_allclose(data.read(rows), reference.X[rows].toarray(), rtol=1e-5, atol=1e-6)


def test_expression_never_log_transformed_is_refused(make_adata):
    def unlog(x):
        np.expm1(x * 3.0, out=x)  # normalised values up to a few thousand, not whole numbers

    error = _error(_with_x(make_adata(), unlog), r"reaches .*not log-transformed.*sc.pp.log1p")
    assert "data.normalize: true" in str(error)

    def just_below(x):  # the largest log1p values real data reach stay accepted
        x *= (MAX_LOG1P - 0.5) / x.max()

    data, _ = prepare(DataConfig(**CFG), SplitConfig(), _with_x(make_adata(), just_below))
    assert data.n_genes > 0


@pytest.mark.parametrize("log", [np.log2, np.log10])
def test_a_base_2_or_10_log_of_counts_is_refused(make_adata, log):
    counts = make_adata(counts=True)
    logged = counts.copy()
    logged.X = sp.csr_matrix(log(counts.X.toarray() + 1.0).astype(np.float32))
    _error(logged, r"base-2 or base-10 logarithm of raw counts.*1 or log10\(2\) = 0.301 as their smallest.*data.normalize: true")
    natural = counts.copy()  # the natural log1p of raw counts is a count lattice (step 1): accepted
    natural.X = sp.csr_matrix(np.log1p(counts.X.toarray()).astype(np.float32))
    assert prepare(DataConfig(**CFG), SplitConfig(), natural)[0].n_genes > 0


def test_normalize_requested_on_log_data_is_refused(make_adata):
    _error(make_adata(), "does not hold raw counts.*data.normalize: false", normalize=True)


def test_non_unique_gene_names(make_adata):
    adata = make_adata()
    adata.var_names = ["g0"] * 2 + list(adata.var_names[2:])
    _error(adata, r"not unique.*var_names_make_unique")


def test_fewer_genes_than_requested(make_adata):
    _error(
        make_adata(n_genes=30), "Fewer genes than requested: data.n_genes is 50 but the data has only 30", n_genes=50
    )
    _error(make_adata(), r"Fewer genes than requested: 1 of the 3 genes.*nope", gene_list=["g1", "nope", "g2"])
    _error(make_adata(), "either data.n_genes", n_genes=5, gene_list=["g1"], error=ConfigError)


def test_context_without_controls(make_adata):
    adata = make_adata()
    keep = ~((adata.obs["cell_type"] == "t2") & (adata.obs["perturbation"] == "control")).to_numpy()
    _error(adata[keep].copy(), r"No control cells \('control'\) in context\(s\) t2")


def test_held_out_value_absent_lists_valid_values(make_adata):
    _error(
        make_adata(),
        r"Held-out cell type 't3' does not exist in the data; valid values: t1, t2",
        split=SplitConfig(kind="holdout_cell_type", holdout=["t3"]),
    )


def test_condition_with_zero_cells(make_adata):
    adata = make_adata()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["t3"])  # declared, no cell has it
    _error(
        adata,
        r"Held-out cell type 't3' has zero perturbed cells \(a category no cell has\)",
        split=SplitConfig(kind="holdout_cell_type", holdout=["t3"]),
    )


def test_invalid_dose(make_adata):
    adata = make_adata()
    adata.obs["dose"] = adata.obs["dose"].astype(str)
    adata.obs.iloc[np.flatnonzero(adata.obs["perturbation"] == "A")[0], adata.obs.columns.get_loc("dose")] = "high"
    _error(adata, r"obs\['dose'\] has 1 perturbed cells without a valid dose \(e.g. 'high'\)", dose_key="dose")


@pytest.mark.parametrize("case", ["nan", "absent_holdout", "counts", "onehot_unseen"])
def test_nothing_is_written_when_validation_fails(make_adata, tmp_path, case):
    adata, split = make_adata(), SplitConfig()
    if case == "nan":
        adata = _with_x(adata, lambda x: x.__setitem__((0, 0), np.nan))
    elif case == "absent_holdout":
        split = SplitConfig(kind="holdout_perturbation", holdout=["Z"])
    elif case == "counts":
        adata = make_adata(counts=True)
    else:  # one-hot cannot encode a held-out perturbation: refused before training, not after
        split = SplitConfig(kind="holdout_perturbation", holdout=["C"])
    out = tmp_path / "run"
    with pytest.raises(PerturbDiffError):
        prepare(DataConfig(**CFG), split, adata, out_dir=out)
    assert not out.exists()


def test_valid_data_writes_split_and_state(make_adata, tmp_path):
    prepare(DataConfig(**CFG), SplitConfig(), make_adata(), out_dir=tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data_state.json", "split.json"]


def test_obs_names_need_not_be_unique(make_adata):
    adata = make_adata()
    adata.obs_names = ["same"] * adata.n_obs
    data = PerturbationData(adata, DataConfig(**CFG))
    control = data.control_cells(data.contexts[0])
    expected = np.flatnonzero(((adata.obs["perturbation"] == "control") & (adata.obs["cell_type"] == "t1")).to_numpy())
    np.testing.assert_array_equal(control, expected)
    pd.testing.assert_index_equal(adata.obs_names, pd.Index(["same"] * adata.n_obs))  # not modified


def test_whole_number_counts_with_a_small_maximum_are_counts(make_adata):
    """A shallow screen's counts can all be <= 20: integrality, not the maximum, tells counts from log1p."""
    counts = make_adata(counts=True)
    counts.X = counts.X.minimum(3)
    assert counts.X.max() <= 3
    _error(counts, r"raw counts \(every value is a whole number, up to 3\).*data.normalize: true")
    prepare(DataConfig(**CFG, normalize=True), SplitConfig(), counts)  # normalising them is accepted


def test_all_zero_expression_is_refused(make_adata):
    _error(_with_x(make_adata(), lambda x: x.__setitem__(slice(None), 0.0)), "X is all zeros")


def test_no_cells_and_no_genes_are_named(make_adata):
    adata = make_adata()
    _error(adata[:0].copy(), r"The data has no cells \(obs has 0 rows\)")
    _error(adata[:, :0].copy(), r"The data has no genes \(var has 0 rows")


@pytest.mark.parametrize("sparse", [True, False])
def test_a_zeroed_block_of_cells_is_refused_as_damage(make_adata, sparse):
    """A zeroed region of a file shows as a run of consecutive cells without expression (stored zeros too)."""
    adata = make_adata(n_cells=600, n_genes=200, sparse=False)
    if sparse:  # a zeroed data array leaves its entries stored, as zeros
        x = sp.csr_matrix(adata.X)
        x.data[x.indptr[300]:x.indptr[400]] = 0.0
    else:
        x = adata.X.copy()
        x[300:400] = 0.0
    _error(ad.AnnData(x, obs=adata.obs, var=adata.var), r"X has 100 consecutive cells without any expression \(rows 300-399\).*zeroed or damaged")
    few = adata.X.copy()
    few[300:302] = 0.0  # two empty cells of 200 genes: biology, not damage
    prepare(DataConfig(**CFG), SplitConfig(), ad.AnnData(few, obs=adata.obs, var=adata.var))


def test_sparse_entries_stored_twice_are_refused_as_damage(make_adata):
    adata = make_adata()
    x = adata.X.tocsr()
    x.indices[x.indptr[10]:x.indptr[10] + 3] = x.indices[x.indptr[10]]  # a zeroed index array repeats a gene
    _error(ad.AnnData(x, obs=adata.obs, var=adata.var), r"stores \d+ entries twice for the same cell and gene")


def test_a_file_with_a_zeroed_middle_is_refused(make_adata, tmp_path):
    """200 KB zeroed in the middle of an uncompressed .h5ad: a read error or a zeroed block, either one line."""
    for sparse in (True, False):
        path = tmp_path / f"screen_{sparse}.h5ad"
        make_adata(n_cells=3000, n_genes=200, sparse=sparse, seed=1).write_h5ad(path)
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.seek(size // 2 - 100 * 1024)
            f.write(bytes(200 * 1024))
        for backed in (False, True):
            with pytest.raises(DataError, match="damaged|zeroed") as info:
                prepare(DataConfig(**CFG, backed=backed), SplitConfig(), str(path))
            assert "\n" not in str(info.value)


def test_hdf5_that_is_not_anndata_is_named(tmp_path):
    import h5py

    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.arange(3)
    _error(str(path), "is not an AnnData file.*write_h5ad")


def test_small_conditions_are_left_out_with_a_warning(make_adata):
    adata = make_adata()
    obs = adata.obs
    a_t1 = np.flatnonzero(((obs.perturbation == "A") & (obs.cell_type == "t1")).to_numpy())
    b_t2 = np.flatnonzero(((obs.perturbation == "B") & (obs.cell_type == "t2")).to_numpy())
    keep = np.setdiff1d(np.arange(adata.n_obs), np.concatenate([a_t1[1:], b_t2[3:]]))  # A|t1: 1 cell, B|t2: 3
    small = adata[keep].copy()
    expected = r"2 condition\(s\) with fewer than data.min_cells_per_condition = 5 cells.*A\|t1 \(1 cell\), B\|t2 \(3 cells\)"
    with pytest.warns(PerturbDiffWarning, match=expected):
        data = PerturbationData(small, DataConfig(**CFG))
    assert {c.label for c in data.perturbed_conditions} == {"A|t2", "B|t1", "C|t1", "C|t2", "A+B|t1", "A+B|t2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = PerturbationData(small, DataConfig(**CFG, min_cells_per_condition=1))
    assert {"A|t1", "B|t2"} <= {c.label for c in kept.perturbed_conditions}


def test_a_context_with_too_few_controls_is_left_out_with_its_conditions(make_adata):
    adata = make_adata()
    obs = adata.obs
    controls_t2 = np.flatnonzero(((obs.perturbation == "control") & (obs.cell_type == "t2")).to_numpy())
    small = adata[np.setdiff1d(np.arange(adata.n_obs), controls_t2[1:])].copy()
    with pytest.warns(PerturbDiffWarning, match=r"control\|t2 \(1 cell\); and with their too few controls, A\|t2"):
        data = PerturbationData(small, DataConfig(**CFG))
    assert {c.cell_type for c in data.conditions} == {"t1"}
    with pytest.raises(DataError, match="Every perturbed condition has fewer than data.min_cells_per_condition = 1000"):
        PerturbationData(small, DataConfig(**CFG, min_cells_per_condition=1000))


def test_runs_of_empty_cells_are_joined_across_scan_blocks():
    from perturbdiff_core.data.anndata_io import _EmptyRuns

    runs = _EmptyRuns()
    for block in ([False, True, True], [True, True, False, True], [True], [False]):
        runs.add(np.array(block))
    assert runs.longest == (1, 4)


@pytest.mark.parametrize("backed", [False, True])
def test_data_layer_reads_a_layer_as_x_would_be_read(make_adata, tmp_path, backed):
    """log1p values in a layer beside raw counts in X, from an AnnData and from a file (whole or backed): the same
    data as a file holding them in X; a layer the file lacks is named with the ones it has."""
    logged = make_adata()
    layered = make_adata(counts=True)
    layered.layers["log1p"] = logged.X.copy()
    logged.write_h5ad(tmp_path / "x.h5ad")
    layered.write_h5ad(tmp_path / "layer.h5ad")
    reference, _ = prepare(DataConfig(**CFG, backed=backed), SplitConfig(), str(tmp_path / "x.h5ad"))
    rows = np.arange(0, reference.matrix.shape[0], 7)
    for source in (layered, str(tmp_path / "layer.h5ad")):
        data, _ = prepare(DataConfig(**CFG, backed=backed, layer="log1p"), SplitConfig(), source)
        np.testing.assert_array_equal(data.read(rows), reference.read(rows))
        assert data.genes == reference.genes
    error = _error(str(tmp_path / "layer.h5ad"), r"has no layer 'counts' \(data.layer\); its layers: 'log1p'",
                   layer="counts", backed=backed)
    assert "null to read X" in str(error)
    counts = make_adata(counts=True)
    counts.layers["counts"] = counts.X.copy()  # raw counts named in data.layer are checked as X is
    _error(counts, r"layers\['counts'\] looks like raw counts", layer="counts")


def test_data_layer_is_refused_for_a_collection_and_a_soma_experiment(make_adata, tmp_path):
    for i in range(2):
        make_adata().write_h5ad(tmp_path / f"shard{i}.h5ad")
    shards = [str(tmp_path / f"shard{i}.h5ad") for i in range(2)]
    with pytest.raises(ConfigError, match="data.layer reads one .h5ad file or AnnData, not a collection"):
        prepare(DataConfig(**CFG, layer="log1p"), SplitConfig(), shards)
    with pytest.raises(ConfigError, match="a SOMA experiment's X layer is data.soma_layer"):
        prepare(DataConfig(**{**CFG, "path": "file:///nowhere"}, layer="log1p", source="soma"), SplitConfig())
