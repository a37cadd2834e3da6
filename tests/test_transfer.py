"""Marginal pre-training, init-from with genes / vocabularies aligned by name, and train_fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from perturbdiff_core.cli import main
from perturbdiff_core.data import DataConfig, SplitConfig, collate_sets, prepare
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.runs.checkpoint import CheckpointError, load_checkpoint
from perturbdiff_core.runs.config import load_config
from perturbdiff_core.runs.pretraining import UnperturbedSource, concat_unperturbed
from perturbdiff_core.runs.training import Trainer, build_model
from perturbdiff_core.runs.transfer import TRANSFER_FILE, transfer_weights

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = [
    "data.cell_type_key=cell_type",
    "data.set_size=10",
    "model.denoiser_params={size: tiny, hidden: 16, depth: 1, heads: 2}",
    "model.ema_decay=0.9",
    "train.steps=3",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.val_every=0",
    "train.context_drop_prob=0.3",
    "train.device=cpu",
    "seed=1",
]
HOLDOUT = ["split.kind=holdout_combination", "split.holdout=[A+B]"]


def train(path: Path, run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(None, [*BASE, f"data.path={path}", *overrides]), run_dir, progress=False)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def screens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pre-training screen (genes g0..g29) and a fine-tuning screen with some of its genes
    (reordered), new genes, and a cell type the first lacks."""
    folder = tmp_path_factory.mktemp("screens")
    pre = synthetic_screen(300, 30, cell_types=("t1", "t2"), seed=3)
    fine = synthetic_screen(300, 20, cell_types=("t2", "t3"), seed=4)
    fine.var_names = [f"g{i}" for i in range(25, 13, -1)] + [f"new{i}" for i in range(8)]
    pre.write_h5ad(folder / "pre.h5ad")
    fine.write_h5ad(folder / "fine.h5ad")
    return folder / "pre.h5ad", folder / "fine.h5ad"


@pytest.fixture(scope="module")
def pretrained(screens: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """A marginal pre-training of three steps."""
    return train(screens[0], tmp_path_factory.mktemp("runs") / "pre", "train.objective=marginal", "split.val_fraction=0")


def test_marginal_pretraining_trains_on_control_sets_only(pretrained: Trainer) -> None:
    data = pretrained.data
    assert pretrained.split.train == ["control|t1", "control|t2"] and pretrained.split.test == []
    assert np.isfinite(pretrained.log()["loss"]).all() and pretrained.step == 3
    for index in range(len(pretrained.train_sets)):
        item = pretrained.train_sets[(0, index)]
        condition = data.condition(item["condition"])
        assert condition.is_control
        controls = {tuple(row) for row in data.read(data.control_cells(condition.context))}
        for cells in (item["target"], item["control"]):
            assert all(tuple(row) in controls for row in cells.numpy())
    batch = collate_sets([pretrained.train_sets[(0, 0)], pretrained.train_sets[(0, 1)]])
    seen = pretrained._conditioned(batch).cond.perturbation
    assert seen.shape == (2, pretrained.model.denoiser.perturbation_dim) and not seen.any()


def _randomized(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in state.items()}


def test_gene_and_vocabulary_alignment_matches_a_hand_built_expectation(pretrained: Trainer, screens) -> None:
    checkpoint = load_checkpoint(pretrained.checkpoint_file)
    checkpoint.model_state = _randomized(checkpoint.model_state, 0)
    config = load_config(None, [*BASE, f"data.path={screens[1]}", *HOLDOUT])
    data, _ = prepare(config.data, config.split)
    model = build_model(config.model, data, "centred")
    model.load_state_dict(_randomized(model.state_dict(), 1))  # fresh weights that are not zeros
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = transfer_weights(model, checkpoint, data)
    after, old = model.state_dict(), checkpoint.model_state
    old_genes, new_genes = checkpoint.data_state["genes"], data.genes
    assert report.genes_shared == 12 and report.genes_added == [f"new{i}" for i in range(8)]
    assert sorted(report.genes_dropped) == sorted(g for g in old_genes if g not in new_genes)
    g_old, g_new = len(old_genes), len(new_genes)
    for net in ("denoiser.", "ema.module."):
        for j, gene in enumerate(new_genes):
            i = old_genes.index(gene) if gene in old_genes else None
            src, pos = (old, i) if i is not None else (before, j)
            assert torch.equal(after[net + "final.linear.weight"][j], src[net + "final.linear.weight"][pos])
            assert after[net + "final.linear.bias"][j] == src[net + "final.linear.bias"][pos]
            assert torch.equal(after[net + "embed_control.weight"][:, j], src[net + "embed_control.weight"][:, pos])
            for block in range(2):  # [x_t, self_cond] inputs: two blocks of G columns
                shift_new, shift_src = block * g_new, block * (g_old if i is not None else g_new)
                assert torch.equal(
                    after[net + "embed_target.weight"][:, shift_new + j], src[net + "embed_target.weight"][:, shift_src + pos]
                )
        old_types = checkpoint.data_state["vocabularies"]["cell_type"]
        for j, name in enumerate(data.vocabularies["cell_type"]):
            src, pos = (old, old_types.index(name)) if name in old_types else (before, j)
            assert torch.equal(after[net + "condition.cell_type.weight"][j], src[net + "condition.cell_type.weight"][pos])
        key = net + "condition.perturbation.0.weight"  # the encoders differ: fresh
        assert torch.equal(after[key], before[key])
        for key in ("condition.perturbation.0.bias", "blocks.0.target.qkv.weight", "condition.time.0.weight"):
            assert torch.equal(after[net + key], old[net + key])
    assert data.vocabularies["cell_type"] == ["<unknown>", "t2", "t3"] and report.cell_types_shared == 2
    assert report.fresh == ["denoiser.condition.perturbation.0.weight"]


def test_init_from_loads_exactly_when_genes_are_identical(screens, tmp_path: Path) -> None:
    first = train(screens[0], tmp_path / "a", *HOLDOUT)
    second = Trainer(
        load_config(None, [*BASE, f"data.path={screens[0]}", *HOLDOUT, "train.steps=0", f"train.init_from={tmp_path / 'a'}"]),
        tmp_path / "b", progress=False,
    )
    second.fit()
    saved = load_checkpoint(first.checkpoint_file).model_state
    state = second.model.state_dict()
    transferred = [k for k in saved if k.startswith(("denoiser.", "ema."))]
    assert transferred and all(torch.equal(state[k], saved[k]) for k in transferred)
    assert second.transfer.fresh == [] and second.transfer.perturbation == "copied"
    assert (tmp_path / "b" / TRANSFER_FILE).exists() and load_checkpoint(second.checkpoint_file).step == 0


def test_intersect_keeps_only_the_shared_genes(pretrained: Trainer, screens, tmp_path: Path) -> None:
    trainer = Trainer(
        load_config(None, [*BASE, f"data.path={screens[1]}", *HOLDOUT, "train.steps=0", "train.init_genes=intersect",
                           f"train.init_from={pretrained.run_dir}"]),
        tmp_path / "c", progress=False,
    )
    assert trainer.data.genes == [f"g{i}" for i in range(25, 13, -1)]
    assert trainer.transfer.genes_added == [] and trainer.transfer.genes_shared == 12


def test_bad_init_from_and_resume_give_clear_errors(screens, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = [*BASE, f"data.path={screens[0]}", *HOLDOUT]
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(load_config(None, [*config, f"train.init_from={tmp_path / 'missing'}"]), tmp_path / "x", progress=False)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(load_config(None, [*config, f"train.init_from={junk}"]), tmp_path / "y", progress=False)
    train(screens[0], tmp_path / "z0", *HOLDOUT)
    with pytest.raises(ConfigError, match="architecture"):
        Trainer(load_config(None, [*config, "model.denoiser_params={size: tiny, hidden: 8, depth: 1, heads: 2}",
                                   f"train.init_from={tmp_path / 'z0'}"]), tmp_path / "z1", progress=False)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("\n".join(line.replace("=", ": ", 1) for line in config if "{" not in line) + "\n")
    status = main(["train", str(yaml_file), "--out", str(tmp_path / "w"), "--resume", "--init-from", str(junk)])
    assert status == 2 and "give only one of them" in capsys.readouterr().err


def test_train_fraction_keeps_the_expected_cells(screens) -> None:
    data_config = DataConfig(path=str(screens[0]), cell_type_key="cell_type")
    full, split = prepare(data_config, SplitConfig(kind="holdout_combination", holdout=["A+B"]))
    part, again = prepare(data_config, SplitConfig(kind="holdout_combination", holdout=["A+B"], train_fraction=0.05))
    assert again.train == split.train
    for label in split.train:
        n = len(full.cells(label))
        assert len(part.cells(label)) == max(1, round(0.05 * n)) == part.condition(label).n_cells
        assert np.isin(part.cells(label), full.cells(label)).all()
    for label in split.test:
        assert np.array_equal(part.cells(label), full.cells(label))
    third, _ = prepare(data_config, SplitConfig(kind="holdout_combination", holdout=["A+B"], train_fraction=0.05))
    assert all(np.array_equal(third.cells(lb), part.cells(lb)) for lb in split.train)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="train_fraction"):
            prepare(data_config, SplitConfig(kind="holdout_combination", holdout=["A+B"], train_fraction=bad))


def test_evaluate_refits_baselines_on_the_run_training_fraction(screens, tmp_path: Path) -> None:
    from perturbdiff_core.runs.folder import SavedRun

    trainer = train(screens[0], tmp_path / "run", *HOLDOUT, "split.train_fraction=0.05", "train.steps=1")
    folder = SavedRun.load(tmp_path / "run")
    for label in trainer.split.train:
        assert np.array_equal(folder.data.cells(label), trainer.data.cells(label))


def test_concat_unperturbed_keeps_controls_on_shared_genes() -> None:
    screen = synthetic_screen(200, 12, seed=5)
    atlas = synthetic_screen(100, 10, seed=6)
    atlas.var_names = [f"g{i}" for i in range(5, 15)]
    out = concat_unperturbed(
        [UnperturbedSource(screen, "screen", "cell_type", "perturbation"), UnperturbedSource(atlas, "atlas", "cell_type")]
    )
    assert list(out.var_names) == [f"g{i}" for i in range(5, 12)]
    controls = (screen.obs["perturbation"] == "control").to_numpy()
    assert out.n_obs == controls.sum() + atlas.n_obs and set(out.obs["perturbation"]) == {"control"}
    expected = np.vstack([screen.X[controls][:, 5:].toarray(), atlas.X[:, :7].toarray()])
    assert np.array_equal(out.X.toarray() if sp.issparse(out.X) else out.X, expected)
    assert out.uns["genes_dropped"] == {"screen": 5, "atlas": 3}
