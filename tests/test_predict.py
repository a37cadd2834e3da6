"""Prediction: DiffusionPredictor, predictions.h5ad (obs keys, genes, real controls unchanged), new files."""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from test_training import tiny_config

from perturbdiff_core.cli.commands.predict import predictions
from perturbdiff_core.cli.commands.predict import run as predict_command
from perturbdiff_core.data import DataConfig, PerturbationData, prediction_conditioning
from perturbdiff_core.data.output_space import cell_units, on_lattice
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import DataError, InputError, PerturbDiffWarning
from perturbdiff_core.evaluation.predictors import POPULATION_KEY, first_population
from perturbdiff_core.runs import model_predictor
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint
from perturbdiff_core.runs.config import SampleConfig
from perturbdiff_core.runs.model_predictor import DiffusionPredictor
from perturbdiff_core.runs.prediction import resolve_conditions
from perturbdiff_core.runs.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    return synthetic_screen(600, 40, seed=3)


@pytest.fixture(scope="module")
def trained(screen: ad.AnnData, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """A tiny model trained for a few steps on the synthetic screen (test split: A+B in t1 and t2)."""
    folder = tmp_path_factory.mktemp("trained")
    path = folder / "screen.h5ad"
    screen.write_h5ad(path)
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(path, "train.steps=4", "train.val_every=0"), folder / "run", progress=False)
    trainer.fit()
    return trainer


def args(run: Path, **values) -> argparse.Namespace:
    defaults = {"run": str(run), "checkpoint": None, "data": None, "conditions": None, "n_cells": None, "seed": None,
                "device": "cpu", "out": None, "populations": 1}
    return argparse.Namespace(**{**defaults, **values})


def dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


def test_predictor_samples_n_cells_deterministically(trained: Trainer) -> None:
    data = trained.data
    condition = data.condition("A+B|t1")
    # an untrained model decodes to zeros, and its changes are not significant: sample continuous values, keep all
    continuous = SampleConfig(steps=4, chunk_sets=2, output_space="continuous", change_z=None)
    predictor = DiffusionPredictor(trained.model, continuous, device="cpu")
    cells = predictor.predict(data, condition, 29, seed=1)  # 3 sets of 12, the last one cut
    assert cells.shape == (29, data.n_genes) and cells.dtype == np.float32
    assert (cells >= 0).all() and np.isfinite(cells).all()
    np.testing.assert_array_equal(cells, predictor.predict(data, condition, 29, seed=1))
    assert not np.array_equal(cells, predictor.predict(data, condition, 29, seed=2))
    raw = DiffusionPredictor(trained.model, replace(continuous, nonnegative=False)).predict(data, condition, 29, seed=1)
    np.testing.assert_array_equal(cells, np.maximum(raw, 0.0))
    assert (raw < 0).any()


def test_predicted_cells_lie_on_the_count_lattice_of_the_controls(trained: Trainer) -> None:
    """The synthetic screen is log1p(counts / total * 1e4): ``auto`` decodes onto that lattice."""
    data = trained.data
    condition = data.condition("A+B|t1")
    model = copy.deepcopy(trained.model)
    with torch.no_grad():  # an output layer that predicts 0 to 8 across the genes: some decode to 0, some not
        for net in (model.denoiser, model.ema.module):
            net.final.linear.bias.copy_(torch.linspace(0.0, 8.0, data.n_genes))
    cells = DiffusionPredictor(model, SampleConfig(steps=4)).predict(data, condition, 40, seed=0)
    assert 0 < (cells > 0).mean() < 1 and on_lattice(torch.from_numpy(cells))
    control_steps = cell_units(torch.from_numpy(data.read(data.control_cells(condition.context)))).numpy()
    for cell in cells:  # the lattice of one of the context's control cells: integral counts at its step
        counts = np.expm1(cell[cell > 0].astype(np.float64))[None] / control_steps[:, None]
        assert (np.abs(counts - counts.round()) < 0.01).all(axis=1).any()


def test_predictor_uses_one_random_control_set_per_generated_set(trained: Trainer, monkeypatch) -> None:
    """Each set of a prediction is conditioned on its own control draw of the condition's context."""
    seen = []
    original = trained.model.sample

    def spy(cond, *a, **k):
        seen.append(cond.control.clone())
        return original(cond, *a, **k)

    monkeypatch.setattr(trained.model, "sample", spy)
    data = trained.data
    condition = data.condition("A+B|t2")
    DiffusionPredictor(trained.model, SampleConfig(steps=2, chunk_sets=2)).predict(data, condition, 40, seed=0)
    controls = torch.cat(seen)
    assert controls.shape == (4, data.config.set_size, data.n_genes)  # ceil(40 / 12) sets in chunks of 2
    pool = data.read(data.control_cells(condition.context))
    for s in controls:  # every control cell is a real control cell of the context
        assert all((np.abs(pool - row.numpy()).sum(1) == 0).any() for row in s)
    assert not torch.equal(controls[0], controls[1])


def test_predictions_file_matches_the_input(trained: Trainer, screen: ad.AnnData, tmp_path: Path) -> None:
    run = trained.run_dir
    adata = predictions(load_checkpoint(checkpoint_path(run)), args(run))
    keys = ("perturbation", "cell_type")
    assert set(keys) <= set(adata.obs.columns)
    assert list(adata.var_names) == list(screen.var_names)
    counts = adata.obs.groupby(list(keys), observed=True).size()
    real = screen.obs.groupby(list(keys), observed=True).size()
    for cell_type in ("t1", "t2"):
        assert counts[("A+B", cell_type)] == real[("A+B", cell_type)]
        assert counts[("control", cell_type)] == real[("control", cell_type)]
    assert set(adata.obs.perturbation) == {"A+B", "control"}
    for cell_type in ("t1", "t2"):  # the real control cells, unchanged and in order
        mask = (adata.obs.perturbation == "control").to_numpy() & (adata.obs.cell_type == cell_type).to_numpy()
        source = ((screen.obs.perturbation == "control") & (screen.obs.cell_type == cell_type)).to_numpy()
        np.testing.assert_array_equal(adata.X[mask], dense(screen.X[source]).astype(np.float32))


def test_n_cells_and_conditions_by_name_or_label(trained: Trainer) -> None:
    run = trained.run_dir
    checkpoint = load_checkpoint(checkpoint_path(run))
    adata = predictions(checkpoint, args(run, conditions=["C", "A|t2"], n_cells=7))
    perturbed = adata.obs[adata.obs.perturbation != "control"]
    assert perturbed.groupby(["perturbation", "cell_type"], observed=True).size().to_dict() == {
        ("A", "t2"): 7, ("C", "t1"): 7, ("C", "t2"): 7
    }
    with pytest.raises(InputError, match="--n-cells"):
        predictions(checkpoint, args(run, conditions=["A+C|t1"]))
    with pytest.raises(InputError, match="perturbation|cell_type"):
        predictions(checkpoint, args(run, conditions=["A|t1|extra"], n_cells=3))
    with pytest.raises(DataError, match="t1, t2"):
        predictions(checkpoint, args(run, conditions=["A|t9"], n_cells=3))
    with pytest.raises(DataError, match="never seen"):
        predictions(checkpoint, args(run, conditions=["Z"], n_cells=3))


def test_new_condition_without_cells_is_predicted_with_n_cells(trained: Trainer) -> None:
    run = trained.run_dir
    adata = predictions(load_checkpoint(checkpoint_path(run)), args(run, conditions=["A+C|t1"], n_cells=5))
    assert (adata.obs.perturbation == "A+C").sum() == 5


def test_new_file_aligned_by_gene_name_with_missing_genes_reported(
    trained: Trainer, screen: ad.AnnData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    new = synthetic_screen(300, 40, seed=9, perturbations=("A", "B"))
    new = new[:, rng.permutation(new.n_vars)].copy()  # genes in another order
    missing = new.var_names[5]
    new = new[:, new.var_names != missing].copy()  # and one gene missing
    new.var["symbol"] = [f"SYM_{gene}" for gene in new.var_names]  # the file's gene annotations
    path = tmp_path / "new.h5ad"
    new.write_h5ad(path)
    run = trained.run_dir
    adata = predictions(load_checkpoint(checkpoint_path(run)), args(run, data=str(path)))
    err = capsys.readouterr().err.strip().splitlines()
    note = [line for line in err if "missing" in line]
    assert len(note) == 1 and "1 of the model's 40 genes" in note[0] and missing in note[0]
    assert list(adata.var_names) == list(screen.var_names)  # the model's genes, in the model's order
    assert set(adata.obs.perturbation) == {"A", "B", "control"}  # every perturbed condition of the new file
    mask = (adata.obs.perturbation == "control").to_numpy() & (adata.obs.cell_type == "t1").to_numpy()
    source = new[(new.obs.perturbation == "control").to_numpy() & (new.obs.cell_type == "t1").to_numpy()]
    expected = np.zeros((source.n_obs, len(screen.var_names)), dtype=np.float32)
    for j, gene in enumerate(screen.var_names):
        if gene != missing:
            expected[:, j] = dense(source[:, gene].X).ravel()
    np.testing.assert_array_equal(adata.X[mask], expected)
    assert "their predicted cells are 0 too" in note[0]
    measured = adata.var["measured"].to_numpy()
    assert list(adata.var_names[~measured]) == [missing]
    assert not dense(adata.X)[:, ~measured].any()  # predicted as its controls were read: no made-up rise
    expected_symbols = ["" if gene == missing else f"SYM_{gene}" for gene in screen.var_names]
    assert list(adata.var["symbol"]) == expected_symbols  # the file's var kept; a gene it lacks, empty
    adata.write_h5ad(tmp_path / "written.h5ad")  # and still writable
    assert list(ad.read_h5ad(tmp_path / "written.h5ad").var["symbol"]) == expected_symbols


def test_predict_from_an_unfinished_run_says_so(screen: ad.AnnData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    trainer = Trainer(tiny_config(path, "train.steps=4", "train.val_every=0"), tmp_path / "run", progress=False)
    trainer.fit(stop_at=2)  # as an interrupted run leaves it
    assert predict_command(args(trainer.run_dir, out=str(tmp_path / "p.h5ad"))) == 0
    assert "this checkpoint is at step 2 of train.steps = 4: training did not finish" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"--out .*p.csv would hold an AnnData under another extension.*\.h5ad"):
        predict_command(args(trainer.run_dir, out=str(tmp_path / "p.csv")))


def test_a_new_file_without_the_runs_obs_columns_is_named(trained: Trainer, tmp_path: Path) -> None:
    new = synthetic_screen(200, 40, seed=9, perturbations=("A",))
    new.obs = new.obs.rename(columns={"perturbation": "guide"})
    path = tmp_path / "new.h5ad"
    new.write_h5ad(path)
    with pytest.raises(DataError, match=r"lacks the obs column\(s\) the run reads: 'perturbation' \(data.perturbation_key\); "
                       r"its columns are: guide, cell_type, dose. Rename the columns"):
        predictions(load_checkpoint(checkpoint_path(trained.run_dir)), args(trained.run_dir, data=str(path)))


def test_a_new_file_in_another_form_than_the_training_data_is_told_to_match_the_run(trained: Trainer, tmp_path: Path) -> None:
    """predict cannot change the run's data.normalize, so its advice is the form the file must take, not the key."""
    new = synthetic_screen(200, 40, seed=9, perturbations=("A",))
    new.X = np.random.default_rng(0).poisson(2.0, size=new.shape).astype(np.float32)  # raw counts
    path = tmp_path / "counts.h5ad"
    new.write_h5ad(path)
    with pytest.raises(DataError, match=r"counts.h5ad holds raw counts, but the run was trained on log-normalised values "
                       r"\(data.normalize: false\). Give log-normalised values in X") as caught:
        predictions(load_checkpoint(checkpoint_path(trained.run_dir)), args(trained.run_dir, data=str(path)))
    assert "Set data.normalize" not in str(caught.value)


def test_an_unseen_cell_type_warns_when_the_run_never_trained_the_unknown_context(
    screen: ad.AnnData, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    new = tmp_path / "new.h5ad"
    synthetic_screen(200, 40, seed=9, perturbations=("A",), cell_types=("t3",)).write_h5ad(new)
    for drop, warns in (("0", True), ("0.3", False), ("auto", True)):  # auto: 0 here, the test split's A+B is in t1, t2
        run = tmp_path / f"drop{drop}"
        Trainer(tiny_config(path, "train.steps=2", "train.val_every=0", f"train.context_drop_prob={drop}"), run,
                progress=False).fit()
        recwarn.clear()
        predictions(load_checkpoint(checkpoint_path(run)), args(run, data=str(new)))
        messages = [str(w.message) for w in recwarn if issubclass(w.category, PerturbDiffWarning)]
        assert any("t3 was not in this run's training data" in m and "context_drop_prob" in m for m in messages) is warns


def test_resolve_conditions_expands_a_perturbation_name(trained: Trainer) -> None:
    data: PerturbationData = trained.data
    labels = [c.label for c in resolve_conditions(data, ["B", "A+B|t2"])]
    assert labels == ["B|t1", "B|t2", "A+B|t2"]
    with pytest.raises(InputError, match="control"):
        resolve_conditions(data, ["control|t1"])
    both = ["B+A|t2", "A+B|t2", "B", "B|t1"]  # the combination in the other order, then each condition again
    assert [c.label for c in resolve_conditions(data, both)] == ["A+B|t2", "B|t1", "B|t2"]


def test_resolve_conditions_reads_the_labels_of_older_metrics_files(trained: Trainer) -> None:
    """metrics.csv and the report wrote cell_type/perturbation before they took the data's labels."""
    data: PerturbationData = trained.data
    assert [c.label for c in resolve_conditions(data, ["t2/A+B", "t1/B", "t1/A+C"])] == ["A+B|t2", "B|t1", "A+C|t1"]
    assert [c.label for c in resolve_conditions(data, ["B"])] == ["B|t1", "B|t2"]  # a name is still a name


def test_predict_takes_the_report_labels_whose_cell_type_holds_a_plus() -> None:
    """The report's 'stimulated|CD14+Mono' (and the older 'CD14+Mono/stimulated') are that perturbation in that
    cell type, not a combination of the perturbations 'CD14' and 'Mono/stimulated'; with a batch key, in every
    batch of the cell type (the metrics pool them)."""
    screen = synthetic_screen(400, 20, seed=4, perturbations=("stimulated",), cell_types=("CD14+Mono", "CD4T"), batches=("b1", "b2"))
    for batch_key, expected in ((None, ["stimulated|CD14+Mono"]), ("batch", ["stimulated|CD14+Mono|b1", "stimulated|CD14+Mono|b2"])):
        data = PerturbationData(screen, DataConfig(cell_type_key="cell_type", batch_key=batch_key)).fit()
        for label in ("stimulated|CD14+Mono", "CD14+Mono/stimulated"):
            chosen = resolve_conditions(data, [label])
            assert [c.label for c in chosen] == expected and all(c.n_cells > 0 for c in chosen)
        with pytest.raises(DataError, match="never seen"):  # an unknown perturbation is named as one, in its cell type
            resolve_conditions(data, ["Z|CD4T"])


def test_the_metrics_label_a_condition_as_the_data_does() -> None:
    """One label format: evaluation's Condition.name is the data's label without the batch."""
    from perturbdiff_core.evaluation.paired import EvaluatedCondition as Evaluated

    screen = synthetic_screen(300, 20, seed=4, perturbations=("stimulated",), cell_types=("CD14+Mono",))
    data = PerturbationData(screen, DataConfig(cell_type_key="cell_type")).fit()
    (condition,) = data.perturbed_conditions
    assert Evaluated(condition.perturbation, condition.cell_type).name == condition.label == "stimulated|CD14+Mono"
    assert Evaluated("stimulated", None).name == "stimulated"


def test_populations_are_independent_draws_whose_first_is_the_plain_prediction(trained: Trainer) -> None:
    checkpoint = load_checkpoint(checkpoint_path(trained.run_dir))
    checkpoint.run_config.sample.output_space = "continuous"  # the barely trained model decodes to zeros
    one = predictions(checkpoint, args(trained.run_dir, seed=4))
    many = predictions(checkpoint, args(trained.run_dir, seed=4, populations=3))
    assert POPULATION_KEY not in one.obs and sorted(many.obs[POPULATION_KEY].unique()) == ["0", "1", "2"]
    first = first_population(many)
    np.testing.assert_array_equal(dense(first.X), dense(one.X))
    assert list(first.obs.columns) == list(one.obs.columns)
    perturbed = (many.obs.perturbation != "control").to_numpy()
    by_population = [dense(many[(many.obs[POPULATION_KEY] == k).to_numpy() & perturbed].X) for k in "012"]
    assert all(p.shape == by_population[0].shape for p in by_population)
    assert not np.array_equal(by_population[0], by_population[1])  # other control draws and noise


def test_genes_without_a_significant_change_keep_the_donor_values() -> None:
    from perturbdiff_core.runs.model_predictor import settle_changes

    g = torch.Generator().manual_seed(0)
    donors = torch.poisson(torch.full((200, 6), 2.0), generator=g)
    cells = donors + 0.05 * torch.randn(200, 6, generator=g)  # sampler noise around the donors
    cells[:, :2] += 1.0  # genes 0 and 1 really change
    kept = settle_changes(cells, donors, z=3.0, spread=1.0)
    torch.testing.assert_close(kept[:, :2], cells[:, :2])
    torch.testing.assert_close(kept[:, 2:], donors[:, 2:])
    everywhere = torch.where((cells - donors).mean(0) != 0, cells, donors)
    assert torch.equal(settle_changes(cells, donors, z=0.0, spread=1.0), everywhere)
    assert torch.equal(settle_changes(cells, donors, z=None, spread=1.0), cells)


def test_the_change_tests_standard_error_reads_test_size_cells() -> None:
    """A mean change of 3 standard errors at 100 cells is 0.4 at 2: it moves at 100, not at ``test_size`` 2."""
    from perturbdiff_core.runs.model_predictor import settle_changes

    donors = torch.zeros(100, 2)
    change = torch.tensor([[1.0], [-1.0]]).repeat(50, 1) + torch.tensor([0.3])  # sd 1.005, mean 0.3
    cells = donors + torch.cat([change, 10.0 + change], dim=1)  # gene 1 moves either way
    sd = float(change.std())
    assert 2.5 * sd / 10 < 0.3 < 2.5 * sd / 2**0.5  # significant at n = 100, not at n = 2
    torch.testing.assert_close(settle_changes(cells, donors, z=2.5, spread=1.0), cells)
    two = settle_changes(cells, donors, z=2.5, spread=1.0, test_size=2)
    torch.testing.assert_close(two[:, 0], donors[:, 0])
    torch.testing.assert_close(two[:, 1], cells[:, 1])


@pytest.mark.parametrize("spread", [0.0, 0.3, 0.5])
def test_change_spread_pulls_each_cells_change_towards_the_mean_change(spread: float) -> None:
    from perturbdiff_core.runs.model_predictor import settle_changes

    g = torch.Generator().manual_seed(1)
    donors = torch.poisson(torch.full((150, 8), 3.0), generator=g)
    cells = donors + torch.randn(150, 8, generator=g) * torch.linspace(0.1, 1.0, 8)
    cells[:, :4] += torch.tensor([1.5, -1.0, 0.8, 2.0])  # genes 0-3 change; 4-7 carry noise only
    change = (cells - donors).double()
    mean = change.mean(0)
    reference = donors.double() + mean + spread * (change - mean)  # float64, written out
    moved = mean.abs() > 4.0 * change.std(0) / math.sqrt(150)
    assert moved[:4].all() and not moved[4:].any()
    settled = settle_changes(cells, donors, z=4.0, spread=spread)
    torch.testing.assert_close(settled[:, :4].double(), reference[:, :4], rtol=0, atol=1e-5)
    assert torch.equal(settled[:, 4:], donors[:, 4:])  # the test reads the sampled changes, not the pulled ones
    torch.testing.assert_close((settled - donors).mean(0)[:4].double(), mean[:4], rtol=0, atol=1e-5)  # mean kept
    spread_of = (settled - donors)[:, :4].std(0).double()
    torch.testing.assert_close(spread_of, spread * change[:, :4].std(0), rtol=0, atol=1e-5)
    without_test = settle_changes(cells, donors, z=None, spread=spread)
    torch.testing.assert_close(without_test.double(), reference, rtol=0, atol=1e-5)


def test_with_an_anchor_the_change_test_reads_the_change_beyond_it_and_keeps_the_anchor() -> None:
    """With ``prior`` (the anchor's shift), a gene moves where its mean change differs from the prior by
    more than z standard errors; otherwise it takes the prior as its mean change, not the donors' values."""
    from perturbdiff_core.runs.model_predictor import changed_centre, settle_changes

    g = torch.Generator().manual_seed(3)
    donors = torch.poisson(torch.full((200, 6), 2.0), generator=g).log1p()
    prior = torch.tensor([0.4, 0.4, -0.2, 0.1, 0.0, 0.0])
    beyond = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.6, 0.0])  # genes 0 and 4 change beyond the prior
    cells = donors + prior + beyond + 0.3 * torch.randn(200, 6, generator=g)
    change = (cells - donors).double()
    mean = change.mean(0)
    moved = (mean - prior.double()).abs() > 4.0 * change.std(0) / math.sqrt(200)
    assert moved.tolist() == [True, False, False, False, True, False]
    read = donors.mean(0)
    settled = settle_changes(cells, donors, z=4.0, spread=0.5, read_levels=read, prior=prior).double()
    moved_cells = changed_centre(donors.double(), mean, read.double()) + 0.5 * (change - mean)
    kept = changed_centre(donors.double(), prior.double(), read.double())  # the anchor's shift, a decrease as a fraction
    expected = torch.where(moved, moved_cells, kept)
    torch.testing.assert_close(settled, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close((settled - donors.double()).mean(0)[[1, 3, 5]], prior.double()[[1, 3, 5]], rtol=0, atol=1e-5)
    without = settle_changes(cells, donors, z=4.0, spread=0.5, read_levels=read)  # no anchor: unmoved genes are the donors
    assert torch.equal(without[:, 5], donors[:, 5]) and not torch.equal(settled[:, 1].float(), donors[:, 1])


@pytest.mark.parametrize("with_prior", [True, False])
def test_an_ensemble_partner_averages_every_genes_mean_change(with_prior: bool) -> None:
    """With ``partner`` (``sample.ensemble``), each gene's mean change is ``(1 - w) m + w partner``, ``m`` the mean
    change it had without (sampled where it moves, else the prior or none), and moved genes keep their cells' spread."""
    from perturbdiff_core.runs.model_predictor import settle_changes

    g = torch.Generator().manual_seed(4)
    donors = 1.0 + torch.rand(300, 6, generator=g, dtype=torch.float64)  # positive levels: shifts are not clipped
    prior = torch.tensor([0.4, 0.4, -0.2, 0.1, 0.0, 0.0], dtype=torch.float64) if with_prior else None
    partner = torch.tensor([0.1, -0.3, 0.25, 0.0, 0.5, -0.05], dtype=torch.float64)
    beyond = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.6, 0.0], dtype=torch.float64)  # genes 0 and 4 change beyond the prior
    cells = donors + (0.0 if prior is None else prior) + beyond + 0.3 * torch.randn(300, 6, generator=g, dtype=torch.float64)
    change = cells - donors
    mean = change.mean(0)
    plain = settle_changes(cells, donors, z=4.0, spread=0.5, prior=prior)
    own = (plain - donors).mean(0)  # what each gene's mean change is without the partner
    w = 0.3
    settled = settle_changes(cells, donors, z=4.0, spread=0.5, prior=prior, partner=partner, partner_weight=w)
    torch.testing.assert_close((settled - donors).mean(0), (1 - w) * own + w * partner, rtol=0, atol=1e-12)
    moved = torch.tensor([True, False, False, False, True, False])
    deviation = settled - donors - (settled - donors).mean(0)
    torch.testing.assert_close(deviation[:, moved], 0.5 * (change - mean)[:, moved], rtol=0, atol=1e-12)
    assert torch.all(deviation[:, ~moved].abs() < 1e-12)  # unmoved genes: every cell shifted alike
    torch.testing.assert_close(
        settle_changes(cells, donors, z=4.0, spread=0.5, prior=prior, partner=partner, partner_weight=0.0), plain
    )


@pytest.mark.parametrize("with_partner", [False, True])
def test_a_jitter_moves_every_genes_mean_change_by_itself(with_partner: bool) -> None:
    """With ``jitter``, each gene's settled value moves by exactly the jitter in every cell, genes the test left
    alone (which keep the donors' values or the prior without it) included; the per-cell spread is unchanged."""
    from perturbdiff_core.runs.model_predictor import settle_changes

    g = torch.Generator().manual_seed(5)
    genes = 300
    donors = 2.0 + torch.rand(50, genes, generator=g, dtype=torch.float64)
    moves = torch.arange(genes) % 2 == 0  # half the genes change by 0.8, half not at all
    cells = donors + 0.8 * moves + 0.1 * torch.randn(50, genes, generator=g, dtype=torch.float64)
    prior = 0.005 * torch.randn(genes, generator=g, dtype=torch.float64)  # within the test's noise
    partner = 0.8 * moves + 0.2 * torch.randn(genes, generator=g, dtype=torch.float64) if with_partner else None
    jitter = 0.3 * torch.randn(genes, generator=g, dtype=torch.float64)
    common = dict(z=4.0, spread=0.5, prior=prior, partner=partner, partner_weight=0.3)
    plain = settle_changes(cells, donors, **common)
    jittered = settle_changes(cells, donors, **common, jitter=jitter)
    torch.testing.assert_close(jittered - plain, jitter.expand_as(plain), rtol=0, atol=1e-12)
    unmoved = plain[:, 1::2] - donors[:, 1::2]  # without the jitter an unmoved gene keeps the prior exactly
    if not with_partner:
        torch.testing.assert_close(unmoved, prior[1::2].expand_as(unmoved), rtol=0, atol=1e-12)


def test_sample_change_spread_reaches_the_predicted_cells(trained: Trainer) -> None:
    """``sample.change_spread`` s gives donor + mean change + s (change - mean change): linear in s,
    so with the same seed (same donors, same noise) s = 0.5 lies halfway between s = 0 and s = 1.
    36 cells are three whole sets: every sampled cell is kept, so the kept cells keep the mean change."""
    data = trained.data
    condition = data.condition("A+B|t1")
    base = SampleConfig(steps=4, chunk_sets=2, output_space="continuous", change_z=None, nonnegative=False)
    cells = {
        s: DiffusionPredictor(trained.model, replace(base, change_spread=s)).predict(data, condition, 36, seed=2)
        for s in (0.0, 0.5, 1.0)
    }
    assert not np.allclose(cells[0.0], cells[1.0], atol=1e-3)
    np.testing.assert_allclose(cells[0.5], (cells[0.0] + cells[1.0]) / 2, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cells[0.5].mean(0), cells[1.0].mean(0), rtol=0, atol=1e-5)  # the mean change is kept


def test_a_decrease_takes_the_fraction_of_the_level_read_from_every_cell() -> None:
    """``sample.decrease: fraction`` against a float64 formula: each donor keeps ``1 + mean / read``
    of its value (at least 0); a cell without the gene stays at 0; increases are still shifts."""
    from perturbdiff_core.runs.model_predictor import settle_changes

    g = torch.Generator().manual_seed(2)
    donors = torch.poisson(torch.full((300, 5), 1.5), generator=g).log1p()  # log1p counts, many zeros
    donors[:, 4] = 0.0  # a gene no donor expresses
    cells = donors + 0.2 * torch.randn(300, 5, generator=g)
    cells += torch.tensor([-0.3, 0.6, -5.0, -0.2, -0.1])  # 0, 2, 3, 4 fall (2 by more than is there), 1 rises
    change = (cells - donors).double()
    mean = change.mean(0)
    for read in (donors.mean(0), 0.5 * donors.mean(0)):  # the donors' own levels, or half of them
        settled = settle_changes(cells, donors, z=None, spread=0.0, read_levels=read).double()
        keep = 1 + (mean / read.double().clamp_min(1e-30)).clamp(-1.0, 0.0)
        decrease = (mean < 0) & (torch.arange(5) != 4)  # gene 4 has nothing to lose a fraction of: a shift
        expected = torch.where(decrease, donors.double() * keep, donors.double() + mean)
        torch.testing.assert_close(settled, expected, rtol=0, atol=1e-5)
        assert settled[:, [0, 2, 3]][donors[:, [0, 2, 3]] == 0].abs().max() == 0  # cells without the gene stay at 0
        assert settled[:, 2].abs().max() == 0  # a decrease of more than the level read switches the gene off
    at_own_level = settle_changes(cells, donors, z=None, spread=0.0, read_levels=donors.mean(0))
    torch.testing.assert_close(  # the mean change is kept where it is within the level, and no cell goes below 0
        (at_own_level - donors).mean(0)[[0, 1, 3]].double(), mean[[0, 1, 3]], rtol=0, atol=1e-5
    )
    assert at_own_level[:, :4].min() >= 0
    at_half = settle_changes(cells, donors, z=None, spread=0.0, read_levels=0.5 * donors.mean(0))
    torch.testing.assert_close((at_half - donors).mean(0)[[0, 3]].double(), 2 * mean[[0, 3]], rtol=0, atol=1e-5)
    signed = donors - 1.0  # values below 0 (not expression levels): every decrease stays a shift
    signed_cells = cells - 1.0
    torch.testing.assert_close(
        settle_changes(signed_cells, signed, z=None, spread=0.0, read_levels=signed.mean(0)).double(),
        signed.double() + mean, rtol=0, atol=1e-5,
    )
    shifted = settle_changes(cells, donors, z=None, spread=0.0)  # sample.decrease: shift
    torch.testing.assert_close(shifted.double(), donors.double() + mean, rtol=0, atol=1e-5)
    assert shifted.min() < 0


def test_sample_decrease_reaches_the_predicted_cells(trained: Trainer) -> None:
    """At ``change_spread: 0`` a decrease as a fraction never takes a cell below 0; as a shift it does."""
    data = trained.data
    condition = data.condition("A+B|t1")
    base = SampleConfig(
        steps=4, chunk_sets=2, output_space="continuous", change_z=None, nonnegative=False, change_spread=0.0,
        control_mean="donors",
    )
    fraction, shift, donors = (
        DiffusionPredictor(trained.model, config).predict(data, condition, 30, seed=2)
        for config in (base, replace(base, decrease="shift"), replace(base, change_z=1e9))  # the last moves no gene
    )
    assert fraction.min() >= 0 and shift.min() < 0
    rising = (shift - donors).mean(0) > 0  # genes whose mean change is an increase: the same shift either way
    assert 0 < rising.sum() < data.n_genes
    np.testing.assert_allclose(fraction[:, rising], shift[:, rising], rtol=0, atol=1e-5)
    assert not np.allclose(fraction[:, ~rising], shift[:, ~rising], atol=1e-3)


def test_sample_increase_reaches_the_predicted_cells(trained: Trainer) -> None:
    """``sample.increase: reads`` only adds reads to the donors of a rising gene; every other gene is
    decoded as with ``shift`` (same seed, same rounding draws)."""
    data = trained.data
    condition = data.condition("A+B|t1")
    base = SampleConfig(steps=4, chunk_sets=2, change_z=None, control_mean="donors")
    reads, shift, donors = (
        DiffusionPredictor(trained.model, config).predict(data, condition, 30, seed=2)
        for config in (base, replace(base, increase="shift"), replace(base, change_z=1e9))  # the last moves no gene
    )
    same = (reads == shift).all(0)
    assert 0 < same.sum() < data.n_genes
    assert (reads[:, ~same] >= donors[:, ~same] - 1e-6).all()  # a rising gene's cells only gain reads


def test_sample_decrease_thinning_reaches_the_predicted_cells(trained: Trainer) -> None:
    """``sample.decrease: thinning`` thins the donors' reads of a falling gene to the mean ``fraction`` gives (within
    a read's step); a gene that does not fall is decoded as with ``fraction`` (same seed, same rounding draws)."""
    data = trained.data
    condition = data.condition("A+B|t1")
    base = SampleConfig(steps=4, chunk_sets=2, change_z=None, control_mean="donors", decrease="fraction")
    fraction, thinning, donors = (
        DiffusionPredictor(trained.model, config).predict(data, condition, 200, seed=2)
        for config in (base, replace(base, decrease="thinning"), replace(base, change_z=1e9))  # the last moves no gene
    )
    assert on_lattice(torch.from_numpy(thinning))
    same = (thinning == fraction).all(0)
    falling = thinning.mean(0) < donors.mean(0) - 1e-6
    assert falling.any() and not same[falling].any() and same[~falling].all()
    assert (thinning[:, falling] <= donors[:, falling] + 1e-6).all()  # reads only go
    first_read = np.where(donors > 0, donors, np.inf).min(1)  # each donor's log1p of one read
    step = first_read[np.isfinite(first_read)].max() / donors.shape[0]  # the most one read moves a gene's mean
    np.testing.assert_allclose(thinning[:, falling].mean(0), fraction[:, falling].mean(0), rtol=0, atol=2 * step)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "systematic"])
def test_sample_rounding_reaches_the_decoder(trained: Trainer, rounding: str, monkeypatch) -> None:
    """``sample.rounding`` picks the decoder's draws: none (nearest), independent, or systematic."""
    seen, decode = [], model_predictor.decode_cells

    def recording(cells, donors, generator=None, *, systematic=False, **options):
        seen.append((generator is not None, systematic))
        return decode(cells, donors, generator, systematic=systematic, **options)

    monkeypatch.setattr(model_predictor, "decode_cells", recording)
    config = SampleConfig(steps=4, chunk_sets=2, rounding=rounding)
    cells = DiffusionPredictor(trained.model, config).predict(trained.data, trained.data.condition("A+B|t1"), 30, seed=2)
    assert seen == [(rounding != "nearest", rounding == "systematic")]
    assert on_lattice(torch.from_numpy(cells))


def test_the_mean_change_reads_every_sampled_cell_not_only_the_kept_ones(trained: Trainer) -> None:
    """5 cells of a 12-cell set, pulled fully to the mean change: each is its donor plus the mean
    change of all 12 sampled cells, not of the 5 kept."""
    data = trained.data
    condition = data.condition("A+B|t1")
    config = SampleConfig(
        steps=4, output_space="continuous", nonnegative=False, change_z=None, decrease="shift", control_mean="donors"
    )
    donors = prediction_conditioning(data, [condition.perturbation], condition.context, seed=3).control[0].numpy()
    sampled = DiffusionPredictor(trained.model, config).predict(data, condition, 12, seed=3)
    pulled = DiffusionPredictor(trained.model, replace(config, change_spread=0.0)).predict(data, condition, 5, seed=3)
    mean_change = (sampled.astype(np.float64) - donors).mean(0)
    np.testing.assert_allclose(pulled - donors[:5], np.broadcast_to(mean_change, (5, data.n_genes)), rtol=0, atol=1e-5)
    assert not np.allclose(mean_change, (sampled[:5].astype(np.float64) - donors[:5]).mean(0), atol=1e-3)


@pytest.mark.parametrize("control_mean", ["context", "donors"])
def test_control_mean_context_takes_the_donors_noise_out_of_every_gene(trained: Trainer, control_mean: str) -> None:
    """With no gene changed, 7 predicted cells are their donors, recentred under ``context`` so that their mean is the
    context's control mean (float64 reference)."""
    data = trained.data
    condition = data.condition("A+B|t1")
    config = SampleConfig(
        steps=4, output_space="continuous", nonnegative=False, change_z=1e9, decrease="shift", control_mean=control_mean
    )
    donors = prediction_conditioning(data, [condition.perturbation], condition.context, seed=3).control[0, :7].numpy()
    cells = DiffusionPredictor(trained.model, config).predict(data, condition, 7, seed=3)
    context_mean = data.read(data.control_cells(condition.context)).astype(np.float64).mean(0)
    assert np.abs(context_mean - donors.astype(np.float64).mean(0)).max() > 0.05  # 7 donors' mean is a noisy one
    if control_mean == "donors":
        np.testing.assert_array_equal(cells, donors)
    else:
        np.testing.assert_allclose(cells.astype(np.float64).mean(0), context_mean, rtol=0, atol=1e-5)
        falling = context_mean < donors.astype(np.float64).mean(0)
        assert 0 < falling.sum() < data.n_genes
        assert (cells[:, falling][donors[:, falling] == 0] == 0).all()  # a falling gene's zeros stay 0


def test_recentred_moves_the_kept_mean_exactly_rises_by_shifts_and_falls_by_fractions() -> None:
    """Against a float64 reference: the kept rows' mean becomes the target; a rising gene is shifted, a falling one
    scaled (zeros kept), a gene with negative values shifted either way."""
    gen = torch.Generator().manual_seed(0)
    donors = torch.poisson(torch.full((30, 6), 1.5), generator=gen).log1p().double()
    donors[:, 5] -= 1.0  # a gene that is not an expression level
    kept = donors[:20].mean(0)
    target = kept + torch.tensor([0.3, -0.2, -5.0, 0.0, -0.1, -0.2], dtype=torch.float64)
    moved = model_predictor.recentred(donors, target, kept)
    torch.testing.assert_close(moved[:20].mean(0)[[0, 1, 3, 4, 5]], target[[0, 1, 3, 4, 5]])
    torch.testing.assert_close(moved[:, 0], donors[:, 0] + 0.3)
    torch.testing.assert_close(moved[:, 1], donors[:, 1] * (1 - 0.2 / kept[1]))
    assert (moved[:, 2] == 0).all()  # a fall beyond the whole level takes all of it, not below 0
    torch.testing.assert_close(moved[:, 5], donors[:, 5] - 0.2)


@pytest.mark.parametrize("gain", ["even", "sampled"])
def test_read_gain_hands_the_decoder_each_cells_sampled_change(trained: Trainer, gain: str, monkeypatch) -> None:
    """``sample.read_gain: sampled`` passes every kept cell's sampled change, before it is settled, to the decoder."""
    seen, decode = [], model_predictor.decode_cells

    def recording(cells, donors, generator=None, **kwargs):
        seen.append(kwargs["response"])
        return decode(cells, donors, generator, **kwargs)

    monkeypatch.setattr(model_predictor, "decode_cells", recording)
    config = SampleConfig(steps=4, chunk_sets=2, read_gain=gain)
    DiffusionPredictor(trained.model, config).predict(trained.data, trained.data.condition("A+B|t1"), 30, seed=2)
    assert (seen[0] is None) == (gain == "even")
    if gain == "sampled":
        assert seen[0].shape == (30, trained.data.n_genes) and bool(seen[0].abs().sum() > 0)
