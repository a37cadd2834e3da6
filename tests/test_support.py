"""sample.response_fdr: the genes a training perturbation changes (against SciPy's Wilcoxon and BH), read from
training conditions only, and the gate they put on the model's own change where it extrapolates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from test_anchor import held_out_t3, three_types  # noqa: F401  (fixture)
from test_training import tiny_config

from perturbdiff_core.data import DataConfig, PerturbationData
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.runs.config import config_from_dict
from perturbdiff_core.runs.model_predictor import settle_changes
from perturbdiff_core.runs.summary import run_summary
from perturbdiff_core.runs.support import ResponseSupport
from perturbdiff_core.runs.training import Trainer

HELD_OUT = ["A+B|t1", "A+B|t2"]


@pytest.fixture()
def data() -> PerturbationData:
    return PerturbationData(synthetic_screen(800, 30, seed=6), DataConfig(cell_type_key="cell_type"))


def training(data: PerturbationData) -> list:
    return [c for c in data.perturbed_conditions if c.label not in HELD_OUT]


def reference_significant(data: PerturbationData, label: str, fdr: float) -> np.ndarray:
    """SciPy's two-sided asymptotic Mann-Whitney U with continuity correction, BH over genes; constant genes p = 1."""
    condition = data.condition(label)
    cells, controls = data.read(data.cells(condition)), data.read(data.control_cells(condition.context))
    with np.errstate(invalid="ignore"):
        p = stats.mannwhitneyu(cells, controls, axis=0, method="asymptotic", use_continuity=True).pvalue
    return stats.false_discovery_control(np.nan_to_num(p, nan=1.0)) < fdr


def test_responding_genes_match_scipy_in_any_training_condition(data: PerturbationData) -> None:
    support = ResponseSupport(data, training(data), 0.05, seed=0)
    a = reference_significant(data, "A|t1", 0.05) | reference_significant(data, "A|t2", 0.05)
    b = reference_significant(data, "B|t1", 0.05) | reference_significant(data, "B|t2", 0.05)
    assert 0 < a.sum() < data.n_genes and not np.array_equal(a, b)  # a test that can fail either way
    np.testing.assert_array_equal(support.genes("A"), a)
    np.testing.assert_array_equal(support.genes("A+B"), a | b)  # a combination never trained: its parts' genes
    assert support.genes("Z") is None  # nothing trained to gate by
    looser = ResponseSupport(data, training(data), 0.5, seed=0).genes("A")
    assert looser.sum() > a.sum() and np.all(looser[a])


def test_no_held_out_cell_is_read(data: PerturbationData, monkeypatch) -> None:
    read: list[np.ndarray] = []
    original = data.read
    monkeypatch.setattr(data, "read", lambda rows: read.append(np.asarray(rows)) or original(rows))
    support = ResponseSupport(data, training(data), 0.05, seed=0)
    for perturbation in ("A", "B", "C", "A+B"):
        support.genes(perturbation)
    held_out = np.concatenate([data.cells(c) for c in HELD_OUT])
    assert read and not np.isin(np.concatenate(read), held_out).any()


def test_genes_outside_the_reach_keep_the_anchor_and_the_partner() -> None:
    """A gene the model changes beyond the prior but outside ``reach`` settles as a gene that failed the test: every
    cell moved by ``(1 - w) prior + w partner``; genes inside move exactly as without ``reach``."""
    g = torch.Generator().manual_seed(7)
    donors = 1.0 + torch.rand(200, 6, generator=g, dtype=torch.float64)
    prior = torch.tensor([0.2, -0.1, 0.0, 0.3, 0.1, 0.0], dtype=torch.float64)
    partner = torch.tensor([0.1, 0.0, 0.2, 0.4, -0.1, 0.05], dtype=torch.float64)
    beyond = torch.tensor([0.8, 0.8, 0.8, 0.0, 0.0, 0.0], dtype=torch.float64)
    cells = donors + prior + beyond + 0.2 * torch.randn(200, 6, generator=g, dtype=torch.float64)
    reach = torch.tensor([True, False, True, True, False, True])
    common = dict(z=4.0, spread=0.5, prior=prior, partner=partner, partner_weight=0.5)
    free, gated = settle_changes(cells, donors, **common), settle_changes(cells, donors, **common, reach=reach)
    torch.testing.assert_close(gated[:, reach], free[:, reach], rtol=0, atol=0)
    torch.testing.assert_close(gated[:, 1], donors[:, 1] + 0.5 * prior[1] + 0.5 * partner[1], rtol=0, atol=1e-12)
    assert not torch.allclose(free[:, 1], gated[:, 1])  # gene 1 moved without the gate
    no_partner = settle_changes(cells, donors, z=None, spread=1.0, prior=prior, reach=reach)
    torch.testing.assert_close(no_partner[:, ~reach], donors[:, ~reach] + prior[~reach], rtol=0, atol=1e-12)
    torch.testing.assert_close(no_partner[:, reach], cells[:, reach], rtol=0, atol=1e-12)


def test_the_run_gates_its_unseen_contexts_only(three_types: Path, tmp_path: Path) -> None:  # noqa: F811
    trainer = Trainer(held_out_t3(three_types), tmp_path / "run", progress=False)
    data, ensemble = trainer.data, trainer.ensemble
    assert ensemble.support.fdr == 0.25
    assert "in unseen contexts only on genes a training condition of the perturbation or its parts changes (Wilcoxon FDR < 0.25" in "\n".join(
        run_summary(trainer)
    )
    reach = ensemble.reach(data, data.condition("A|t3"))
    expected = ResponseSupport(data, [data.condition(c) for c in trainer.split.train], 0.25, trainer.config.seed).genes("A")
    np.testing.assert_array_equal(reach.numpy(), expected)
    off = Trainer(held_out_t3(three_types, "sample.response_fdr=null"), tmp_path / "off", progress=False)
    assert off.ensemble.support is None and off.ensemble.reach(data, data.condition("A|t3")) is None
    assert "sample.response_fdr" not in "\n".join(run_summary(off))
    combination = Trainer(tiny_config(three_types), tmp_path / "combo", progress=False)  # A+B held out, trained types
    combo_data = combination.data
    assert combination.ensemble.applies(combo_data, combo_data.condition("A+B|t1"))
    assert combination.ensemble.reach(combo_data, combo_data.condition("A+B|t1")) is None  # epistasis may move any gene
    assert "sample.response_fdr" not in "\n".join(run_summary(combination))


@pytest.mark.parametrize("value", [0, 1.5, "often"])
def test_a_bad_response_fdr_is_a_clear_error(value) -> None:
    with pytest.raises(ConfigError, match=r"sample.response_fdr"):
        config_from_dict({"sample": {"response_fdr": value}})
