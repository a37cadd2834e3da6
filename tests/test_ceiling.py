"""sample.ceiling: each gene's highest value in the training cells, read from the file itself; no held-out cell
reaches it; predicted cells stay under it; the checkpoint keeps it for perturbdiff predict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from test_anchor import held_out_t3, three_types  # noqa: F401 (a fixture)

from perturbdiff_core.runs.ceiling import training_ceiling
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint
from perturbdiff_core.runs.model_predictor import DiffusionPredictor
from perturbdiff_core.runs.prediction import predict_run
from perturbdiff_core.runs.training import Trainer


def dense(adata: ad.AnnData) -> np.ndarray:
    return adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)


def test_the_ceiling_is_the_training_cells_highest_value_and_no_held_out_cell_reaches_it(
    three_types: Path, tmp_path: Path  # noqa: F811
) -> None:
    """Reference: the float64 maximum over the file's rows of the training conditions and of their cell types'
    control cells; the held-out cell type's perturbed cells, raised far above it, change nothing."""
    adata = ad.read_h5ad(three_types)
    t3_perturbed = ((adata.obs.cell_type == "t3") & (adata.obs.perturbation != "control")).to_numpy()
    raised = adata.copy()
    values = dense(raised)
    values[t3_perturbed, :5] = 15.0
    raised.X = values
    path = tmp_path / "raised.h5ad"
    raised.write_h5ad(path)
    trainer = Trainer(held_out_t3(path), tmp_path / "run", progress=False)
    obs = adata.obs
    labels = obs.perturbation.astype(str) + "|" + obs.cell_type.astype(str)
    train_types = {label.split("|")[1] for label in trainer.split.train}
    rows = labels.isin(trainer.split.train) | ((obs.perturbation == "control") & obs.cell_type.isin(train_types))
    expected = dense(adata)[rows.to_numpy()].astype(np.float64).max(0)
    genes = [adata.var_names.get_loc(g) for g in trainer.data.genes]
    np.testing.assert_array_equal(trainer.ceiling.numpy(), expected[genes])
    assert (trainer.ceiling < 15.0).all()
    assert torch.equal(training_ceiling(trainer.data, trainer.split.train, 0), trainer.ceiling)  # every condition read whole
    unset = Trainer(held_out_t3(path, "sample.ceiling=none"), tmp_path / "unset", progress=False)
    assert unset.ceiling is None


def test_predicted_cells_stay_under_the_ceiling_or_their_contexts_control_cells(
    three_types: Path, tmp_path: Path  # noqa: F811
) -> None:
    """A ceiling far below the data caps every value at the context's own control cells' highest (the donors are
    among them); the checkpoint keeps the ceiling, and ``none`` keeps none."""
    run = tmp_path / "run"
    trainer = Trainer(held_out_t3(three_types), run, progress=False)
    trainer.fit(stop_at=2)
    data, condition = trainer.data, trainer.data.condition("A|t3")
    controls = data.read(data.control_cells(condition.context)).max(0)
    low = torch.zeros(data.n_genes, dtype=torch.float64)

    def predict(ceiling: torch.Tensor | None, space: str = "auto") -> np.ndarray:
        sample = dataclasses.replace(trainer.config.sample, output_space=space)
        return DiffusionPredictor(trainer.model, sample, ceiling=ceiling).predict(data, condition, 60, seed=1)

    for space in ("counts", "continuous"):
        assert (predict(low, space) <= controls + 1e-6).all()
        assert (predict(None, space) > controls + 1e-6).any()  # without it the perturbation raises genes above the controls
    checkpoint = load_checkpoint(checkpoint_path(run))
    assert torch.equal(checkpoint.ceiling, trainer.ceiling)
    checkpoint.ceiling = low  # perturbdiff predict caps at the checkpoint's ceiling
    predicted = predict_run(checkpoint, device=torch.device("cpu"), conditions=["A|t3"], n_cells=60, progress=False)
    cells = dense(predicted[(predicted.obs.perturbation == "A").to_numpy()])
    assert len(cells) == 60 and (cells <= controls + 1e-6).all()


def test_no_training_cell_gives_no_ceiling(three_types: Path, tmp_path: Path) -> None:  # noqa: F811
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    assert training_ceiling(trainer.data, [], 0) is None
