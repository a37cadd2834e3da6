"""A TileDB-SOMA experiment written from the bundled kang18 file reads like the file itself; marginal
pre-training on it from the command line. Skips where tiledbsoma (the ``soma`` extra) is absent."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from perturbdiff_core.cli import main
from perturbdiff_core.data import DataConfig, PerturbationData, make_loader
from perturbdiff_core.data.anndata_io import shared_data_dir
from perturbdiff_core.errors import ConfigError, DataError

tiledbsoma = pytest.importorskip("tiledbsoma", reason="tiledbsoma is not installed (pip install 'perturbdiff[soma]')")

KANG = shared_data_dir() / "kang18_pbmc_ifnb.h5ad"
KEYS = {"perturbation_key": "condition", "cell_type_key": "cell_type", "set_size": 32}

pytestmark = [
    pytest.mark.skipif(not KANG.exists(), reason=f"the bundled data are not in {KANG.parent}"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> str:
    """kang18 as a local SOMA experiment (``tiledbsoma.io.from_h5ad``, measurement ``RNA``)."""
    import tiledbsoma.io

    uri = str(tmp_path_factory.mktemp("soma") / "kang18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy file's uns layout and repeated obs names
        tiledbsoma.io.from_h5ad(uri, str(KANG), measurement_name="RNA")
    return uri


@pytest.mark.parametrize("obs_filter", [None, "cell_type == 'B'", "cell_type in ['B', 'NK'] and condition == 'control'"])
def test_a_soma_experiment_reads_like_the_file_it_was_written_from(experiment: str, obs_filter) -> None:
    soma = PerturbationData(experiment, DataConfig(source="soma", obs_filter=obs_filter, **KEYS, min_cells_per_condition=1))
    h5ad = PerturbationData(KANG, DataConfig(obs_filter=obs_filter, **KEYS, min_cells_per_condition=1))
    assert soma.conditions == h5ad.conditions and soma.genes == h5ad.genes
    for condition in h5ad.conditions:
        np.testing.assert_array_equal(soma.cells(condition), h5ad.cells(condition))
    rows = np.array([0, soma.matrix.shape[0] - 1, 5, 5, 17])
    np.testing.assert_array_equal(soma.read(rows), h5ad.read(rows))
    assert soma.source_report.startswith(f"SOMA experiment {experiment}, RNA/data: ")


def test_soma_errors_name_the_problem(experiment: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="obs has no column 'perturbation' .*perturbation_key: null"):
        PerturbationData(experiment, DataConfig(source="soma", cell_type_key="cell_type"))
    with pytest.raises(DataError, match="data.obs_filter 'n_counts \\+ 1 > 2' cannot be applied"):  # TileDB's own syntax
        PerturbationData(experiment, DataConfig(source="soma", obs_filter="n_counts + 1 > 2", **KEYS))
    with pytest.raises(ConfigError, match="is not an expression"):
        PerturbationData(experiment, DataConfig(source="soma", obs_filter="cell_type = = 'B'", **KEYS))
    with pytest.raises(DataError, match="No cell of .* passes data.obs_filter"):
        PerturbationData(experiment, DataConfig(source="soma", obs_filter="cell_type == 'none'", **KEYS))
    with pytest.raises(DataError, match="has no measurement 'ATAC' \\(data.soma_measurement\\); it has: RNA"):
        PerturbationData(experiment, DataConfig(source="soma", soma_measurement="ATAC", **KEYS))
    with pytest.raises(DataError, match="Cannot open .* as a SOMA experiment"):
        PerturbationData(str(tmp_path / "nothing"), DataConfig(source="soma", **KEYS))


def test_workers_read_a_soma_experiment_spawned(experiment: str) -> None:
    """TileDB is not fork-safe: the loader starts its workers with spawn and they read the same sets."""
    data = PerturbationData(experiment, DataConfig(source="soma", **KEYS)).fit()
    data.read(np.arange(3))  # the parent has read with TileDB: a forked worker would hang now
    assert data.worker_start_method == "spawn"
    labels = [c.label for c in data.perturbed_conditions]
    alone = [b.target for b in make_loader(data, labels, batch_size=4, num_workers=0)]
    spawned = [b.target for b in make_loader(data, labels, batch_size=4, num_workers=1)]
    for a, b in zip(alone, spawned, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_marginal_pretraining_on_a_soma_experiment_then_fine_tuning(experiment: str, tmp_path: Path) -> None:
    """``perturbdiff train`` with ``train.objective: marginal`` on the control B and NK cells of the
    experiment, every cell read as unperturbed, then ``--init-from`` on the file's screen."""
    small = {"model": {"denoiser_params": {"size": "tiny", "hidden": 16, "depth": 1, "heads": 2}, "anchor": "none"},
             "train": {"steps": 2, "batch_size": 2, "val_every": 0, "device": "cpu", "num_workers": 0}}
    pre = tmp_path / "pre.yaml"
    pre.write_text(yaml.safe_dump({
        "data": {"source": "soma", "path": experiment, "obs_filter": "condition == 'control' and cell_type in ['B', 'NK']",
                 "perturbation_key": None, "cell_type_key": "cell_type", "set_size": 16},
        **small, "train": {**small["train"], "objective": "marginal"},
    }))
    assert main(["train", str(pre), "--out", str(tmp_path / "pre"), "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "pre" / "config.yaml").read_text())
    assert saved["data"]["path"] == experiment and saved["data"]["source"] == "soma"
    fine = tmp_path / "fine.yaml"
    fine.write_text(yaml.safe_dump({"data": {"path": str(KANG), **KEYS, "set_size": 16}, **small}))
    assert main(["train", str(fine), "--out", str(tmp_path / "fine"), "--init-from", str(tmp_path / "pre"), "--quiet"]) == 0
    assert (tmp_path / "fine" / "transfer.json").exists()
