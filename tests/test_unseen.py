"""sample.unseen_context_change: the leave-one-context-out factor, its auto rule, and where the predictor applies it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_training import tiny_config

from perturbdiff_core.data.dataset import Context, nearest_contexts
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import InputError
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint
from perturbdiff_core.runs.model_predictor import DiffusionPredictor
from perturbdiff_core.runs.summary import run_summary
from perturbdiff_core.runs.training import Trainer
from perturbdiff_core.runs.unseen import leave_one_context_out_slope, resolve_unseen_context_change

GENES = 40


@pytest.fixture(scope="module")
def three_types(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic screen of 3 cell types x (A, B, C, A+B) and controls."""
    path = tmp_path_factory.mktemp("three") / "three.h5ad"
    synthetic_screen(900, GENES, cell_types=("t1", "t2", "t3"), seed=4).write_h5ad(path)
    return path


def held_out_t3(path: Path, *overrides: str):
    """t3 held out, read centred (where ``auto`` measures the factor) unless ``overrides`` say otherwise."""
    return tiny_config(path, "split.kind=holdout_cell_type", "split.holdout=[t3]", "model.control_levels=centred", *overrides)


def test_the_factor_is_the_least_squares_fit_of_each_context_on_the_others_mean() -> None:
    rng = np.random.default_rng(0)
    c1, c2, c3 = Context("c1"), Context("c2"), Context("c3")
    contexts = {"A": [c1, c2, c3], "B": [c1, c3], "C": [c2]}  # C, in one context, gives no pair
    changes = {(p, c): rng.normal(size=GENES) + (1.0 if p == "A" else -0.5) for p, cs in contexts.items() for c in cs}
    xs, ys = [], []
    for p, cs in contexts.items():
        for c in cs:
            others = [changes[(p, o)] for o in cs if o != c]
            if others:
                xs.append(np.mean(others, axis=0))
                ys.append(changes[(p, c)])
    reference = np.linalg.lstsq(np.concatenate(xs)[:, None], np.concatenate(ys), rcond=None)[0][0]
    slope, pairs = leave_one_context_out_slope(changes)
    assert pairs == 5
    assert slope == pytest.approx(reference, rel=1e-12)
    same = {(p, c): np.arange(GENES, dtype=float) for p, c in changes}
    assert leave_one_context_out_slope(same) == (pytest.approx(1.0), 5)  # a change every context shares
    assert leave_one_context_out_slope({("A", c1): np.ones(GENES)}) == (None, 0)  # nothing seen twice


def test_the_factor_predicts_a_context_from_its_own_cell_type_in_other_batches_first() -> None:
    """(t1, b1) and (t1, b2) are predicted from each other alone; (t2, b1), with no other t2, from both t1 contexts."""
    rng = np.random.default_rng(1)
    t1b1, t1b2, t2b1 = Context("t1", "b1"), Context("t1", "b2"), Context("t2", "b1")
    changes = {("A", c): rng.normal(size=GENES) for c in (t1b1, t1b2, t2b1)}
    xs = [changes[("A", t1b2)], changes[("A", t1b1)], (changes[("A", t1b1)] + changes[("A", t1b2)]) / 2]
    ys = [changes[("A", c)] for c in (t1b1, t1b2, t2b1)]
    reference = np.linalg.lstsq(np.concatenate(xs)[:, None], np.concatenate(ys), rcond=None)[0][0]
    assert leave_one_context_out_slope(changes) == (pytest.approx(reference, rel=1e-12), 3)


def test_nearest_contexts_leave_out_the_held_out_fields_then_prefer_the_cell_type() -> None:
    t1b1, t1b2, t2b1, t2b2 = Context("t1", "b1"), Context("t1", "b2"), Context("t2", "b1"), Context("t2", "b2")
    others = [t1b2, t2b1, t2b2]
    assert nearest_contexts(t1b1, others) == [t1b2]  # its own cell type in another donor
    assert nearest_contexts(t1b1, others, ("batch",)) == [t1b2]
    assert nearest_contexts(t1b1, others, ("cell_type",)) == [t2b1, t2b2]  # as a held-out cell type is predicted
    assert nearest_contexts(t1b1, [t2b1, t2b2]) == [t2b1, t2b2]  # no other of its cell type: all
    assert nearest_contexts(t1b1, [t1b2], ("cell_type",)) == []
    changes = {("A", c): np.full(GENES, value) for c, value in ((t1b1, 1.0), (t1b2, 1.0), (t2b1, -1.0), (t2b2, -1.0))}
    assert leave_one_context_out_slope(changes) == (pytest.approx(1.0), 4)
    assert leave_one_context_out_slope(changes, ("cell_type",)) == (pytest.approx(-1.0), 4)


def _training_slope(adata: ad.AnnData, train: list[str]) -> tuple[float, int]:
    """The factor computed from the AnnData directly (pandas group means), for the given condition labels."""
    frame = pd.DataFrame(adata.X.toarray().astype(np.float64), index=adata.obs_names)
    frame["perturbation"], frame["cell_type"] = adata.obs["perturbation"].to_numpy(), adata.obs["cell_type"].to_numpy()
    means = frame.groupby(["perturbation", "cell_type"]).mean()
    labels = [label.split("|") for label in train]
    changes = {(p, Context(t)): (means.loc[(p, t)] - means.loc[("control", t)]).to_numpy() for p, t in labels}
    return leave_one_context_out_slope(changes)


def test_auto_is_measured_on_the_training_conditions_and_never_reads_held_out_cells(three_types: Path, tmp_path: Path) -> None:
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    data, split = trainer.data, trainer.split
    assert {data.condition(c).cell_type for c in split.train} == {"t1", "t2"}
    slope, pairs = _training_slope(ad.read_h5ad(three_types), split.train)
    resolved = resolve_unseen_context_change("auto", data, split, seed=5, control_levels="centred")
    assert resolved.pairs == pairs == 8  # A, B, C, A+B in t1 and t2
    assert resolved.slope == pytest.approx(slope, rel=1e-9)
    assert resolved.scale == pytest.approx(min(max(slope, 0.0), 1.0))
    assert trainer.unseen_context_change == resolved

    scrambled = ad.read_h5ad(three_types)
    held = (scrambled.obs["cell_type"] == "t3").to_numpy()
    dense = scrambled.X.toarray()
    dense[held] = np.random.default_rng(1).permutation(dense[held].ravel()).reshape(dense[held].shape) * 2.0  # still log1p-sized values
    scrambled.X = dense
    other = Trainer(held_out_t3(three_types), tmp_path / "scrambled", source=scrambled, progress=False)
    assert resolve_unseen_context_change("auto", other.data, other.split, seed=5, control_levels="centred") == resolved
    assert resolve_unseen_context_change(0.3, data, split, seed=5, control_levels="centred").scale == 0.3  # as given
    for levels in ("hull", "absolute"):  # the denoiser reads the context's levels: its change is kept whole
        kept = resolve_unseen_context_change("auto", data, split, seed=5, control_levels=levels)
        assert (kept.scale, kept.pairs, kept.slope) == (1.0, 0, None)


def test_the_summary_names_the_unseen_contexts_and_the_measured_factor(three_types: Path, tmp_path: Path) -> None:
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    change = trainer.unseen_context_change
    expected = (
        f"sample predictions for t3 (unseen in training) keep {change.scale:.0%} of the sampled change (auto: in training, "
        f"the other contexts' mean change predicts a context's by a factor {change.slope:.2f}, over 8 (perturbation, context) pairs)"
    )
    assert expected in run_summary(trainer)
    hull = Trainer(held_out_t3(three_types, "model.control_levels=hull"), tmp_path / "hull", progress=False)
    assert hull.unseen_context_change.scale == 1.0
    assert (
        "sample predictions for t3 (unseen in training) keep 100% of the sampled change "
        "(auto: the denoiser reads their control cells' levels, control_levels hull)"
    ) in run_summary(hull)
    combination = Trainer(tiny_config(three_types), tmp_path / "combo", progress=False)  # A+B held out in trained types
    assert not any("unseen in training" in line for line in run_summary(combination))


def _continuous(trainer: Trainer, scale: float) -> DiffusionPredictor:
    """Continuous cells, each its own donor plus its change (``control_mean: donors``: no re-centring)."""
    sample = dataclasses.replace(
        trainer.config.sample, output_space="continuous", change_z=None, nonnegative=False, control_mean="donors"
    )
    return DiffusionPredictor(trainer.model, sample, unseen_context_change=scale)


def test_unseen_contexts_keep_the_scaled_change_and_trained_ones_all_of_it(three_types: Path, tmp_path: Path) -> None:
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    trainer.fit()
    data = trainer.data
    unseen, trained = data.condition("A|t3"), data.condition("A|t1")
    full, none, half = (_continuous(trainer, s).predict(data, unseen, 30, seed=2) for s in (1.0, 0.0, 0.5))
    controls = data.read(data.control_cells(unseen.context))
    assert all((np.abs(controls - cell).max(axis=1) < 1e-6).any() for cell in none)  # each cell is its control cell
    assert not np.allclose(full, none)
    np.testing.assert_allclose(half, (full + none) / 2, atol=1e-5)
    np.testing.assert_array_equal(
        _continuous(trainer, 0.0).predict(data, trained, 30, seed=2), _continuous(trainer, 1.0).predict(data, trained, 30, seed=2)
    )
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        DiffusionPredictor(trainer.model, unseen_context_change=1.5)


def test_the_checkpoint_carries_the_resolved_factor(three_types: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(held_out_t3(three_types), run, progress=False)
    trainer.fit(stop_at=4)
    checkpoint = load_checkpoint(checkpoint_path(run))
    assert checkpoint.unseen_context_change == trainer.unseen_context_change.scale
    assert DiffusionPredictor.from_checkpoint(checkpoint).unseen_context_change == trainer.unseen_context_change.scale
    given = dataclasses.replace(checkpoint.run_config.sample, unseen_context_change=0.25)
    assert DiffusionPredictor.from_checkpoint(checkpoint, given).unseen_context_change == 0.25
    resumed = Trainer(held_out_t3(three_types), run, resume=True, progress=False)
    assert resumed.unseen_context_change.scale == trainer.unseen_context_change.scale
    assert "as the run resolved it when it started" in "\n".join(run_summary(resumed))
    payload = torch.load(checkpoint_path(run), weights_only=True)
    older = tmp_path / "older.pt"
    torch.save({k: v for k, v in payload.items() if k != "unseen_context_change"}, older)
    assert load_checkpoint(older).unseen_context_change == 1.0  # written before the factor: all of the change, as then


def test_the_factor_reads_a_bounded_sample_of_a_large_screen(three_types: Path, tmp_path: Path, monkeypatch) -> None:
    """At most FACTOR_PERTURBATIONS perturbations and FACTOR_CELLS cells per condition are read."""
    from perturbdiff_core.runs import unseen

    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    data, split = trainer.data, trainer.split
    full = unseen.training_changes(data, split.train, seed=5)
    monkeypatch.setattr(unseen, "FACTOR_PERTURBATIONS", 2)
    monkeypatch.setattr(unseen, "FACTOR_CELLS", 10)
    read: list[int] = []
    original = data.read
    monkeypatch.setattr(data, "read", lambda rows: read.append(len(rows)) or original(rows))
    bounded = unseen.training_changes(data, split.train, seed=5)
    assert len({p for p, _ in bounded}) == 2 and {c.cell_type for _, c in bounded} == {"t1", "t2"}
    assert set(bounded) < set(full)
    assert sorted(read)[: len(bounded)] == [10] * len(bounded)  # each condition's 10 cells, then the controls
    assert all(not np.allclose(bounded[key], full[key]) for key in bounded)  # a sample, not the whole condition
