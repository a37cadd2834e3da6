"""The notebook API (``import perturbdiff as pdiff``): the same numbers as the command line for the
same config and seed, resumable training, save and load, and options as dotted or nested keys."""

from __future__ import annotations

import gc
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import perturbdiff as pdiff
from perturbdiff_core.cli import main
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.runs.checkpoint import load_run_checkpoint
from perturbdiff_core.runs.config import load_config
from perturbdiff_core.runs.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT = {"kind": "holdout_combination", "holdout": ["A+B"], "val_fraction": 0.3}
#: A tiny run, as dotted keys (what --set takes).
OPTIONS = {
    "seed": 2,
    "data.set_size": 12,
    "model.denoiser_params": {"size": "tiny", "hidden": 16, "depth": 1, "heads": 2},
    "model.ema_decay": 0.9,
    "train.steps": 4,
    "train.batch_size": 3,
    "train.lr": 0.003,
    "train.warmup_steps": 1,
    "train.log_every": 2,
    "train.val_every": 2,
    "train.val_sampling_steps": 3,
    "train.checkpoint_every": 2,
    "train.device": "cpu",
    "train.threads": 1,
    "sample.steps": 4,
    "sample.populations": 1,
    "evaluate.max_cells": 60,
}


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api") / "screen.h5ad"
    synthetic_screen(600, 40, seed=3).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def cli_run(screen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``perturbdiff run`` of the same config as :data:`OPTIONS`, from a YAML file."""
    folder = tmp_path_factory.mktemp("cli")
    config = {"data": {"path": str(screen), "cell_type_key": "cell_type"}, "split": SPLIT}
    for key, value in OPTIONS.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(folder / "tiny.yaml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def trained(screen: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pdiff.PerturbDiff, ad.AnnData]:
    adata = ad.read_h5ad(screen)
    model = pdiff.PerturbDiff(
        adata, perturbation_key="perturbation", control_label="control", cell_type_key="cell_type", split=SPLIT,
        run_dir=tmp_path_factory.mktemp("api_run") / "run", **OPTIONS,
    )
    model.train(progress=False)
    return model, adata


def _same_metrics(a: pd.DataFrame, b: pd.DataFrame, **tolerance: float) -> None:
    key = ["condition", "metric", "method"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key], b[key])
    np.testing.assert_allclose(a.value.to_numpy(float), b.value.to_numpy(float), equal_nan=True, **tolerance)


def test_the_api_and_the_cli_give_the_same_numbers(trained, cli_run: Path) -> None:
    model, adata = trained
    cli = load_run_checkpoint(cli_run)
    api = load_run_checkpoint(model.run_dir)
    assert api.step == cli.step == 4
    for name, value in cli.model_state.items():
        assert torch.equal(value, api.model_state[name]), name  # the same weights, bit for bit
    pred = model.predict(progress=False)
    written = ad.read_h5ad(cli_run / "predictions.h5ad")
    np.testing.assert_array_equal(pred.X, written.X)
    pd.testing.assert_frame_equal(pred.obs, written.obs)
    cli_metrics = pd.read_csv(cli_run / "metrics.csv")
    _same_metrics(model.evaluate(progress=False), cli_metrics, rtol=1e-12, atol=0)  # model and baselines
    model_rows = cli_metrics[cli_metrics.method == "model"]
    _same_metrics(pdiff.evaluate(pred, adata), model_rows, rtol=1e-9, atol=1e-12)  # against the whole screen
    assert (model.run_dir / "report.html").is_file() and model.report == model.run_dir / "report.html"


def test_train_resumes_an_interrupted_run_exactly(trained, screen: Path, tmp_path: Path) -> None:
    model, adata = trained
    folder = tmp_path / "run"
    config = pdiff.run_config(data={"cell_type_key": "cell_type"}, split=SPLIT, options=OPTIONS)
    Trainer(config, folder, source=adata, progress=False).fit(stop_at=2)  # as if stopped after two steps
    resumed = pdiff.PerturbDiff(adata, cell_type_key="cell_type", split=SPLIT, run_dir=folder, **OPTIONS)
    assert resumed.trained_steps == 2
    log = resumed.train(progress=False)
    assert resumed.trained_steps == 4 and list(log.step) == [2, 4]
    expected = load_run_checkpoint(model.run_dir).model_state
    assert all(torch.equal(v, expected[k]) for k, v in load_run_checkpoint(folder).model_state.items())
    assert resumed.train(progress=False).equals(log)  # trained already: nothing to do


def test_save_and_load_give_the_same_predictions(trained, tmp_path: Path) -> None:
    model, adata = trained
    saved = model.save(tmp_path / "saved")
    assert (saved / "checkpoints" / "last.pt").is_file() and not (saved / ".perturbdiff.lock").exists()
    loaded = pdiff.PerturbDiff.load(saved, adata)
    assert loaded.config == model.config and loaded.trained_steps == 4
    first, again = model.predict(progress=False), loaded.predict(progress=False)
    np.testing.assert_array_equal(first.X, again.X)
    with pytest.raises(InputError, match="not an empty folder"):
        model.save(saved)
    with pytest.raises(InputError, match="trained from an AnnData in memory; pass it"):
        pdiff.PerturbDiff.load(saved)
    with pytest.raises(InputError, match="holds no trained model"):
        pdiff.PerturbDiff.load(tmp_path)


def test_a_temporary_run_folder_moves_on_save_and_goes_with_the_model(screen: Path, tmp_path: Path) -> None:
    def temporary_model() -> pdiff.PerturbDiff:
        model = pdiff.PerturbDiff(
            ad.read_h5ad(screen), perturbation_key="perturbation", control_label="control", cell_type_key="cell_type",
            split=SPLIT, **OPTIONS,
        )
        model.train(progress=False)
        return model

    model = temporary_model()
    temporary = model.run_dir
    assert temporary.name.startswith("perturbdiff-") and temporary.is_dir()
    saved = model.save(tmp_path / "saved")
    assert not temporary.exists() and model.run_dir == saved and str(saved) in repr(model)
    assert model.trained_steps == 4 and model.predict(progress=False).n_obs > 0  # it lives in the saved folder
    unsaved = temporary_model()
    temporary = unsaved.run_dir
    del unsaved
    gc.collect()
    assert not temporary.exists()


def test_predict_other_conditions_and_populations(trained) -> None:
    model, _ = trained
    pred = model.predict(["C|t2"], n_cells=7, populations=2, progress=False)
    perturbed = pred.obs[pred.obs.perturbation == "C"]
    assert len(perturbed) == 14 and sorted(perturbed.population.unique()) == ["0", "1"]
    assert pred.uns["perturbdiff"]["perturbation_key"] == "perturbation"


def test_a_prediction_written_and_read_back_still_evaluates(trained, tmp_path: Path) -> None:
    model, adata = trained
    pred = model.predict(progress=False)
    pred.write_h5ad(tmp_path / "pred.h5ad")
    again = ad.read_h5ad(tmp_path / "pred.h5ad")
    _same_metrics(pdiff.evaluate(again, adata), pdiff.evaluate(pred, adata), rtol=0, atol=0)


def test_options_are_dotted_or_nested_and_typos_fail_at_once(screen: Path) -> None:
    dotted = pdiff.run_config(options={"model.kernel": "rbf", "train.steps": 7})
    nested = pdiff.run_config(options={"model": {"kernel": "rbf"}, "train": {"steps": 7}})
    assert dotted == nested and dotted.model.kernel == "rbf" and dotted.train.steps == 7
    split = pdiff.run_config(split={"kind": "holdout_cell_type", "holdout": ["t1"]}).split
    assert (split.kind, split.holdout) == ("holdout_cell_type", ["t1"])
    example = Path(__file__).resolve().parents[1] / "examples" / "kang18_holdout_celltype.yaml"
    assert pdiff.run_config(config=example, options={"train.steps": 3}) == load_config(example, ["train.steps=3"])
    with pytest.raises(ConfigError, match="stepz"):
        pdiff.PerturbDiff(ad.read_h5ad(screen), **{"train.stepz": 3})
    with pytest.raises(InputError, match="not trained yet"):
        pdiff.PerturbDiff(ad.read_h5ad(screen)).predict()
