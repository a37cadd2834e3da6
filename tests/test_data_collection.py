"""Collections of .h5ad shards read as one screen: paths, genes, obs, index cache, lazy files, filters."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from perturbdiff_core.data import DataConfig, PerturbationData, SplitConfig, sharded
from perturbdiff_core.data.anndata_io import normalize_rows
from perturbdiff_core.data.collection import collection_paths
from perturbdiff_core.data.shard_index import INDEX_DIR, cache_locations
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError, DataError
from perturbdiff_core.names import STATE_FILE
from perturbdiff_core.runs.config import load_config
from perturbdiff_core.runs.pretraining import prepare_marginal
from perturbdiff_core.runs.training import Trainer

#: Consecutive row ranges of the 900-cell screen that become its three shards.
CUTS = ((0, 300), (300, 650), (650, 900))


def write_shards(screen: ad.AnnData, folder: Path, cuts=CUTS) -> list[Path]:
    """``screen`` cut into shards by rows, each with only the perturbation categories it has."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (start, stop) in enumerate(cuts):
        part = screen[start:stop].copy()
        part.obs["perturbation"] = part.obs["perturbation"].cat.remove_unused_categories()
        paths.append(folder / f"plate{i}.h5ad")
        part.write_h5ad(paths[-1])
    return paths


@pytest.fixture
def screen(tmp_path: Path) -> tuple[Path, list[Path]]:
    whole = synthetic_screen(900, 30, batches=("b1", "b2"), seed=1)
    whole.write_h5ad(tmp_path / "whole.h5ad")
    return tmp_path / "whole.h5ad", write_shards(whole, tmp_path / "plates")


CONFIG = DataConfig(cell_type_key="cell_type", batch_key="batch", dose_key="dose", set_size=16)


@pytest.mark.parametrize("form", ["folder", "glob", "list"])
def test_a_collection_reads_like_the_file_it_was_cut_from(screen, form: str) -> None:
    whole, shards = screen
    path = {"folder": str(shards[0].parent), "glob": str(shards[0].parent / "plate*.h5ad"),
            "list": [str(p) for p in shards]}[form]
    one = PerturbationData(whole, CONFIG)
    many = PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": path}))
    assert many.conditions == one.conditions  # every condition spans shards: each holds some of its cells
    for condition in one.conditions:
        np.testing.assert_array_equal(many.cells(condition), one.cells(condition))
    rows = np.array([5, 899, 300, 299, 5, 650, 0])
    np.testing.assert_array_equal(many.read(rows), one.read(rows))
    assert many.source_report.startswith("collection of 3 shards, 900 cells; genes (intersect): 30 kept, none dropped")
    assert one.source_report is None  # a single file is read as before


def test_collection_paths(tmp_path: Path, screen) -> None:
    _, shards = screen
    assert collection_paths(str(shards[0])) is None  # one file: today's reading
    assert collection_paths(str(shards[0].parent)) == shards
    assert collection_paths([str(shards[2]), str(shards[0])]) == [shards[2], shards[0]]  # a list keeps its order
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .h5ad file.*data.source: soma"):
        collection_paths(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="No file matches"):
        collection_paths(str(tmp_path / "nothing*.h5ad"))
    with pytest.raises(DataError, match="names a shard twice"):
        collection_paths([str(shards[0]), str(shards[0])])
    with pytest.raises(DataError, match="No such shard"):
        collection_paths([str(shards[0]), str(tmp_path / "missing.h5ad")])


def _gene_shards(tmp_path: Path) -> list[Path]:
    """Two shards on overlapping genes: g0..g9 and g2..g11 (the second in reverse order)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, genes in enumerate([[f"g{j}" for j in range(10)], [f"g{j}" for j in range(11, 1, -1)]]):
        x = sp.csr_matrix(np.log1p(rng.poisson(1.0, (40, len(genes))).astype(np.float32)))
        obs = pd.DataFrame({"perturbation": pd.Categorical(["control"] * 20 + [f"P{i}"] * 20)}, index=[f"c{i}_{k}" for k in range(40)])
        adata = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))
        paths.append(tmp_path / f"s{i}.h5ad")
        adata.write_h5ad(paths[-1])
    return paths


def test_genes_are_aligned_by_name(tmp_path: Path) -> None:
    paths = _gene_shards(tmp_path)
    stored = [ad.read_h5ad(p) for p in paths]
    config = DataConfig(path=[str(p) for p in paths], min_cells_per_condition=1)

    shared = PerturbationData(None, config)
    assert shared.genes == [f"g{j}" for j in range(2, 10)]
    assert "8 kept, 4 dropped (e.g. g0, g1, g11)" in shared.source_report
    np.testing.assert_array_equal(shared.read(np.array([45])), stored[1][5:6, shared.genes].X.toarray())

    union = PerturbationData(None, DataConfig(**{**config.to_dict(), "genes": "union"}))
    assert union.genes == [f"g{j}" for j in range(10)] + ["g11", "g10"]
    assert "12 kept, none dropped; 2 shard(s) lack some of them, read as 0 there" in union.source_report
    first = union.read(np.array([3]))[0]
    np.testing.assert_array_equal(first[:10], stored[0].X[3].toarray()[0])
    assert (first[10:] == 0).all()  # g11, g10: not measured in the first shard

    listed = tmp_path / "genes.txt"
    listed.write_text("g11\ng0\n")
    from_file = PerturbationData(None, DataConfig(**{**config.to_dict(), "genes": str(listed)}))
    assert from_file.genes == ["g11", "g0"] and "genes (from genes.txt): 2 kept" in from_file.source_report
    listed.write_text("g0\nnope\n")
    with pytest.raises(DataError, match="genes of data.genes .* are in no shard \\(nope\\)"):
        PerturbationData(None, DataConfig(**{**config.to_dict(), "genes": str(listed)}))


def test_a_shard_lacking_a_configured_column_is_named(screen) -> None:
    _, shards = screen
    broken = ad.read_h5ad(shards[1])
    del broken.obs["batch"]
    broken.write_h5ad(shards[1])
    with pytest.raises(DataError, match=f"Shard {shards[1]} has no obs column 'batch' \\(the batch key\\)"):
        PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": str(shards[0].parent)}))


def test_shards_of_counts_and_of_log_values_are_refused_naming_the_shard(screen) -> None:
    _, shards = screen
    counts = ad.read_h5ad(shards[2])
    counts.X = sp.csr_matrix(np.round(np.expm1(counts.X.toarray())))
    counts.write_h5ad(shards[2])
    with pytest.raises(DataError, match=f"X of shard {shards[2]} looks like raw counts"):
        PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": str(shards[0].parent)}))


def test_counts_are_normalised_per_shard_over_all_its_genes(tmp_path: Path) -> None:
    paths = _gene_shards(tmp_path)
    for path in paths:  # turn the shards into counts
        adata = ad.read_h5ad(path)
        adata.X = sp.csr_matrix(np.round(np.expm1(adata.X.toarray())))
        adata.write_h5ad(path)
    data = PerturbationData(None, DataConfig(path=[str(p) for p in paths], normalize=True, min_cells_per_condition=1))
    first = ad.read_h5ad(paths[0])
    expected = normalize_rows(first.X[:5]).toarray()[:, 2:10]  # normalised over g0..g9, then g2..g9 kept
    np.testing.assert_allclose(data.read(np.arange(5)), expected, rtol=1e-6)


def test_the_index_is_cached_beside_the_shards_and_rebuilt_when_a_shard_changes(screen, monkeypatch) -> None:
    _, shards = screen
    config = DataConfig(**{**CONFIG.to_dict(), "path": str(shards[0].parent)})
    PerturbationData(None, config)
    assert sorted(p.name for p in (shards[0].parent / INDEX_DIR).iterdir()) == [f"{p.name}.npz" for p in shards]

    def no_scan(*args, **kwargs):
        raise AssertionError("a current index was rebuilt")

    monkeypatch.setattr("perturbdiff_core.data.collection.build_index", no_scan)
    PerturbationData(None, config)  # every index from the cache: no shard is read
    os.utime(shards[1], ns=(1, 1))  # the shard changed: its index is stale
    with pytest.raises(AssertionError, match="rebuilt"):
        PerturbationData(None, config)
    monkeypatch.undo()


def test_a_column_a_later_run_needs_is_added_to_the_index_without_a_new_scan(screen, monkeypatch) -> None:
    _, shards = screen
    config = DataConfig(path=str(shards[0].parent), cell_type_key="cell_type", set_size=16)
    PerturbationData(None, config)  # indexes perturbation and cell_type

    def no_scan(*args, **kwargs):
        raise AssertionError("the values were scanned again")

    monkeypatch.setattr("perturbdiff_core.data.shard_index.summarize_values", no_scan)
    data = PerturbationData(None, DataConfig(**{**config.to_dict(), "batch_key": "batch"}))
    assert {c.batch for c in data.conditions} == {"b1", "b2"}


def test_a_collection_folder_that_cannot_be_written_keeps_its_index_in_the_user_cache(screen, tmp_path, monkeypatch) -> None:
    _, shards = screen
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = shards[0].parent
    (folder / INDEX_DIR).write_text("a file in the way of the index folder")  # refused even to root, unlike chmod
    PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": str(folder)}))
    assert all(cache_locations(p)[1].exists() for p in shards)

    def no_scan(*args, **kwargs):
        raise AssertionError("a current index was rebuilt")

    monkeypatch.setattr("perturbdiff_core.data.collection.build_index", no_scan)
    PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": str(folder)}))  # found in the user cache


def test_shards_open_lazily_and_at_most_max_open_at_once(screen, monkeypatch) -> None:
    _, shards = screen
    monkeypatch.setattr(sharded, "MAX_OPEN_SHARDS", 2)
    data = PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": str(shards[0].parent)}))
    matrix = data.matrix
    is_open = lambda: [s._opened is not None for s in matrix.shards]  # noqa: E731
    assert is_open() == [False, False, False]  # nothing open after start-up
    data.read(np.array([310]))
    assert is_open() == [False, True, False]  # only the shard read from
    data.read(np.array([0, 700]))
    assert sum(is_open()) == 2 and is_open()[0] and is_open()[2]  # the least recently read one was closed


def test_an_obs_filter_keeps_the_cells_it_selects(screen) -> None:
    whole, shards = screen
    for path in (str(whole), str(shards[0].parent)):
        data = PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": path, "obs_filter": "cell_type == 't2' and dose < 3"}))
        assert {c.cell_type for c in data.conditions} == {"t2"}
        assert {c.dose for c in data.perturbed_conditions} == {1.0, 2.0}  # the filter compares doses as numbers
        assert "cells pass" in data.source_report
    with pytest.raises(DataError, match="reads obs column\\(s\\) nope"):
        PerturbationData(whole, DataConfig(**{**CONFIG.to_dict(), "obs_filter": "nope == 1"}))
    with pytest.raises(ConfigError, match="is not an expression"):
        PerturbationData(whole, DataConfig(**{**CONFIG.to_dict(), "obs_filter": "cell_type =="}))
    with pytest.raises(DataError, match="No cell passes"):
        PerturbationData(whole, DataConfig(**{**CONFIG.to_dict(), "obs_filter": "cell_type == 'none'"}))


def test_without_a_perturbation_key_every_cell_is_a_control_for_marginal_pretraining(tmp_path: Path) -> None:
    atlas = synthetic_screen(300, 20, control_fraction=1.0, seed=2)  # an unperturbed atlas ...
    del atlas.obs["perturbation"]  # ... without any perturbation column
    paths = write_shards_plain(atlas, tmp_path)
    config = DataConfig(path=str(tmp_path), perturbation_key=None, cell_type_key="cell_type", set_size=8)
    data, split = prepare_marginal(config, SplitConfig(val_fraction=0.0))
    assert [c.label for c in data.conditions] == ["control|t1", "control|t2"] and split.train == ["control|t1", "control|t2"]
    assert sum(c.n_cells for c in data.conditions) == 300 == sum(ad.read_h5ad(p).n_obs for p in paths)
    with pytest.raises(DataError, match="perturbation_key: null reads every cell as unperturbed"):
        PerturbationData(None, DataConfig(path=str(tmp_path), cell_type_key="cell_type"))


def write_shards_plain(adata: ad.AnnData, folder: Path) -> list[Path]:
    """``adata`` cut into two shards by rows."""
    paths = [folder / "a.h5ad", folder / "b.h5ad"]
    adata[: adata.n_obs // 2].copy().write_h5ad(paths[0])
    adata[adata.n_obs // 2:].copy().write_h5ad(paths[1])
    return paths


def test_a_run_on_a_collection_resumes_only_on_the_same_shards(screen, tmp_path: Path) -> None:
    whole, shards = screen
    settings = [
        "data.cell_type_key=cell_type", "data.set_size=8", "split.kind=random", "split.val_fraction=0",
        "model.denoiser_params={size: tiny, hidden: 16, depth: 1, heads: 2}", "train.steps=2", "train.batch_size=2",
        "train.val_every=0", "train.device=cpu",
    ]
    config = load_config(None, [f"data.path={shards[0].parent}", *settings])
    run = tmp_path / "run"
    Trainer(config, run, progress=False).fit(stop_at=1)
    state = json.loads((run / STATE_FILE).read_text())
    assert state["parts"] == [["plate0.h5ad", 300], ["plate1.h5ad", 350], ["plate2.h5ad", 250]]
    Trainer(config, run, resume=True, progress=False).fit()  # the same shards: resumed
    shutil.copy(shards[0], shards[0].parent / "plate3.h5ad")
    with pytest.raises(DataError, match="The data changed since the run was saved \\(plate3.h5ad added\\)"):
        Trainer(config, run, resume=True, progress=False)
    Trainer(load_config(None, [f"data.path={whole}", *settings]), tmp_path / "one", progress=False).fit(stop_at=1)
    assert "parts" not in json.loads((tmp_path / "one" / STATE_FILE).read_text())  # one file: the state as before


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, Path, ad.AnnData]:
    """The screen's cells in random order, as one file and cut into three shards: every condition
    and every context's controls then have cells in every shard."""
    whole = synthetic_screen(900, 30, batches=("b1", "b2"), seed=1)
    whole = whole[np.random.default_rng(4).permutation(whole.n_obs)].copy()
    whole.write_h5ad(tmp_path / "mixed.h5ad")
    write_shards(whole, tmp_path / "mixed")
    return tmp_path / "mixed.h5ad", tmp_path / "mixed", whole


def test_conditions_and_controls_span_shards_and_controls_stay_in_their_context(mixed) -> None:
    from perturbdiff_core.data.pairing import make_pairing

    file, folder, whole = mixed
    one = PerturbationData(file, CONFIG)
    many = PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": str(folder)}))
    assert many.contexts == one.contexts and len(many.contexts) == 4
    obs = whole.obs
    pairing = make_pairing("random").fit(many)
    spread = []
    for condition in many.conditions:
        rows = many.cells(condition)
        np.testing.assert_array_equal(rows, one.cells(condition))
        spread.append(len(set(many.matrix.shard_of(rows))))
    assert min(spread) >= 2 and spread.count(3) > 0.9 * len(spread)  # conditions have cells in several shards
    for context in many.contexts:
        controls = many.control_cells(context)
        np.testing.assert_array_equal(controls, one.control_cells(context))
        assert set(many.matrix.shard_of(controls)) == {0, 1, 2}
        drawn = pairing.pair(many, context, None, 200, np.random.default_rng(0))  # what a training set draws
        assert set(many.matrix.shard_of(drawn)) == {0, 1, 2}
        assert (obs.perturbation.iloc[drawn] == "control").all()
        assert (obs.cell_type.iloc[drawn].astype(str) == context.cell_type).all()
        assert (obs.batch.iloc[drawn].astype(str) == context.batch).all()


def test_forked_workers_open_their_own_shards_lazily_and_give_the_batches_of_one_file(mixed) -> None:
    """A DataLoader worker forked after the parent read from every shard opens only what it reads,
    and the workers' batches over the collection are those of the file read in the main process."""
    import torch.utils.data

    from perturbdiff_core.data import make_loader

    file, folder, _ = mixed
    many = PerturbationData(None, DataConfig(**{**CONFIG.to_dict(), "path": str(folder)})).fit()
    one = PerturbationData(file, CONFIG).fit()
    many.read(np.array([0, 400, 800]))  # the parent has every shard open

    def open_here() -> list[bool]:
        return [s._opened is not None and s._opened[0] == os.getpid() for s in many.matrix.shards]

    class Probe(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> tuple[list[bool], list[bool]]:
            before = open_here()
            many.read(np.array([310]))
            return before, open_here()

    assert open_here() == [True, True, True]
    loader = torch.utils.data.DataLoader(Probe(), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork")
    (before, after), = list(loader)
    assert before == [False, False, False] and after == [False, True, False]

    labels = [c.label for c in many.perturbed_conditions]
    forked = [b for b in make_loader(many, labels, batch_size=4, num_workers=2)]
    alone = [b for b in make_loader(one, labels, batch_size=4, num_workers=0)]
    assert len(forked) == len(alone) > 1
    for a, b in zip(alone, forked, strict=True):
        np.testing.assert_array_equal(a.target.numpy(), b.target.numpy())
        np.testing.assert_array_equal(a.cond.control.numpy(), b.cond.control.numpy())


def test_marginal_pretraining_on_a_collection_from_the_command_line_then_fine_tuning(tmp_path: Path, capsys) -> None:
    """``perturbdiff train`` with ``train.objective: marginal`` and ``data.perturbation_key: null`` on
    two shards of an atlas without a perturbation column (one shard lacks a gene), then ``--init-from``."""
    from perturbdiff_core.cli import main

    atlas = synthetic_screen(400, 20, control_fraction=1.0, seed=5)
    del atlas.obs["perturbation"]
    folder = tmp_path / "atlas"
    folder.mkdir()
    atlas[:200].copy().write_h5ad(folder / "a.h5ad")
    atlas[200:, 1:].copy().write_h5ad(folder / "b.h5ad")  # lacks the first gene
    small = {"model": {"denoiser_params": {"size": "tiny", "hidden": 16, "depth": 1, "heads": 2}, "anchor": "none"},
             "train": {"steps": 3, "batch_size": 2, "val_every": 0, "device": "cpu", "num_workers": 0}}
    pre = tmp_path / "pre.yaml"
    pre.write_text(yaml.safe_dump({
        "data": {"path": str(folder), "perturbation_key": None, "cell_type_key": "cell_type", "set_size": 16},
        "split": {"val_fraction": 0.0},
        **small, "train": {**small["train"], "objective": "marginal"},
    }))
    assert main(["train", str(pre), "--out", str(tmp_path / "pre")]) == 0
    err = capsys.readouterr().err
    dropped = atlas.var_names[0]
    assert f"collection of 2 shards, 400 cells; genes (intersect): 19 kept, 1 dropped (e.g. {dropped})" in err
    state = json.loads((tmp_path / "pre" / STATE_FILE).read_text())
    assert state["genes"] == list(atlas.var_names[1:]) and state["parts"] == [["a.h5ad", 200], ["b.h5ad", 200]]
    log = pd.read_csv(tmp_path / "pre" / "train_log.csv")
    assert list(log.step)[-1] == 3 and np.isfinite(log.loss).all()

    screen = synthetic_screen(400, 20, seed=6)  # the same gene names, with perturbations
    screen.write_h5ad(tmp_path / "screen.h5ad")
    fine = tmp_path / "fine.yaml"
    fine.write_text(yaml.safe_dump({"data": {"path": str(tmp_path / "screen.h5ad"), "cell_type_key": "cell_type",
                                             "set_size": 16}, **small}))
    assert main(["train", str(fine), "--out", str(tmp_path / "fine"), "--init-from", str(tmp_path / "pre"), "--quiet"]) == 0
    transfer = json.loads((tmp_path / "fine" / "transfer.json").read_text())
    assert transfer["genes_shared"] == 19 and transfer["genes_added"] == [dropped]
