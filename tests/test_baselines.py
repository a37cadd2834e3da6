"""Baselines: each recovers the shift it is built for (against a float64 NumPy reference and the
known truth), samples only what it may, never reads the cells it predicts, and is seeded; plus
the classic held-out checks on the real kang18 and norman19 files."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.meta_analysis import combine_effects

from perturbdiff_core.data import DataConfig, PerturbationData, SplitConfig, make_split, prepare
from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.evaluation import aggregate, compare
from perturbdiff_core.evaluation.predictors import (
    Predictor,
    as_predictor,
    first_population,
    predict_anndata,
    real_anndata,
)
from perturbdiff_plugins.baselines import (
    ContextFoldBaseline,
    ContextMeanBaseline,
    ContextMixtureBaseline,
    ControlBaseline,
    LinearBaseline,
    RandomTrainBaseline,
    random_effects,
    squared_standard_errors,
)

NAMES = ("control", "context_mean", "context_fold", "context_mixture", "linear", "random_train")
CELL_TYPES = ("t1", "t2", "t3")


def additive_screen(
    perturbations: Sequence[str] = ("A", "B", "C", "A+B"),
    *,
    genes: int = 30,
    cells: int = 40,
    context_shift: float = 0.0,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[ad.AnnData, dict[tuple[str, str], np.ndarray]]:
    """log1p-like cells ``base_t + shift + noise`` and the true shifts ``{(perturbation, cell type): (G,)}``.

    A perturbation's shift is the sum of its parts' effects plus ``u_t`` (scaled by
    ``context_shift``: 0 makes the shift the same in every cell type). Baselines stay far from 0,
    so nothing is clipped. Control cell counts differ from the conditions' to exercise resampling.
    """
    rng = np.random.default_rng(seed)
    parts = sorted({p for name in perturbations for p in name.split("+")})
    effect = {p: np.clip(rng.normal(0, 0.5, genes), -1, 1) for p in parts}
    blocks, labels, types, truth = [], [], [], {}
    for t in CELL_TYPES:
        base = rng.uniform(3.0, 4.0, genes)
        u = context_shift * rng.normal(0, 1, genes)
        for name in ("control", *perturbations):
            shift = np.zeros(genes) if name == "control" else sum(effect[p] for p in name.split("+")) + u
            n = cells + 7 if name == "control" else cells
            blocks.append(base + shift + noise * rng.normal(size=(n, genes)))
            labels += [name] * n
            types += [t] * n
            if name != "control":
                truth[(name, t)] = shift
    obs = pd.DataFrame({"perturbation": labels, "cell_type": types}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=obs.astype("category"))
    adata.var_names = [f"g{i}" for i in range(genes)]
    return adata, truth


def _data(adata: ad.AnnData, kind: str, holdout: list[str]) -> tuple[PerturbationData, list[str], list[str]]:
    """Data fitted on the training conditions of a split (no encodability check: any perturbation may be held out)."""
    data = PerturbationData(adata, DataConfig(cell_type_key="cell_type"))
    split = make_split(data, SplitConfig(kind=kind, holdout=holdout, val_fraction=0.0))
    data.fit(split.train)
    return data, split.train, split.test


def _cells(adata: ad.AnnData, perturbation: str, cell_type: str) -> np.ndarray:
    mask = (adata.obs.perturbation == perturbation) & (adata.obs.cell_type == cell_type)
    return np.asarray(adata.X[mask.to_numpy()], dtype=np.float64)


def _shift(adata: ad.AnnData, perturbation: str, cell_type: str) -> np.ndarray:
    """Reference shift: mean of the condition minus the mean of its cell type's controls, float64."""
    return _cells(adata, perturbation, cell_type).mean(0) - _cells(adata, "control", cell_type).mean(0)


def _predicted_shift(predictor: Predictor, data: PerturbationData, label: str) -> np.ndarray:
    """Mean predicted minus control mean, with as many cells as controls (each control drawn once)."""
    condition = data.condition(label)
    controls = data.read(data.control_cells(condition.context)).astype(np.float64)
    cells = predictor.predict(data, condition, len(controls), seed=0)
    return cells.mean(0, dtype=np.float64) - controls.mean(0)


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(x, dtype=np.float32)}


# --- each baseline recovers its shift -----------------------------------------------------------


def test_context_mean_recovers_the_shift_of_a_held_out_cell_type() -> None:
    adata, truth = additive_screen()
    data, train, test = _data(adata, "holdout_cell_type", ["t3"])
    baseline = ContextMeanBaseline().fit(data, train)
    assert sorted(test) == ["A+B|t3", "A|t3", "B|t3", "C|t3"]
    for label in test:
        p = label.split("|")[0]
        expected = np.mean([_shift(adata, p, t) for t in ("t1", "t2")], axis=0)
        np.testing.assert_allclose(_predicted_shift(baseline, data, label), expected, atol=1e-5)
        np.testing.assert_allclose(expected, truth[(p, "t3")], atol=0.08)  # and that is the true shift


def test_context_mean_sums_the_parts_of_an_unseen_combination() -> None:
    adata, truth = additive_screen(context_shift=0.3)
    data, train, test = _data(adata, "holdout_combination", ["A+B"])
    baseline = ContextMeanBaseline().fit(data, train)
    for t in CELL_TYPES:
        expected = _shift(adata, "A", t) + _shift(adata, "B", t)  # the parts in the same cell type
        np.testing.assert_allclose(_predicted_shift(baseline, data, f"A+B|{t}"), expected, atol=1e-5)


def test_context_mean_of_an_unseen_perturbation_is_the_mean_shift_of_its_cell_type() -> None:
    adata, _ = additive_screen()
    data, train, test = _data(adata, "holdout_perturbation", ["C"])
    baseline = ContextMeanBaseline().fit(data, train)
    assert "C|t2" in test
    expected = np.mean([_shift(adata, p, "t2") for p in ("A", "B", "A+B")], axis=0)
    np.testing.assert_allclose(_predicted_shift(baseline, data, "C|t2"), expected, atol=1e-5)


def donors_screen(genes: int = 20, cells: int = 40, seed: int = 0, cell_types: Sequence[str] = ("t1", "t2")) -> ad.AnnData:
    """Cell types (t1, t2, ...), each in donors b1, b2 and b3 (own levels per cell type and donor), where A's
    response depends on the cell type (t1 up, t2 down, t3 up, ...) and barely on the donor."""
    rng = np.random.default_rng(seed)
    response = {t: (-1) ** i * rng.uniform(0.5, 1.0, genes) for i, t in enumerate(cell_types)}
    blocks, obs = [], []
    for t in cell_types:
        for b in ("b1", "b2", "b3"):
            base = rng.uniform(3.0, 4.0, genes)
            for name in ("control", "A"):
                shift = response[t] + 0.05 * rng.normal(size=genes) if name == "A" else 0.0
                blocks.append(base + shift + 0.1 * rng.normal(size=(cells, genes)))
                obs += [(name, t, b)] * cells
    frame = pd.DataFrame(obs, columns=["perturbation", "cell_type", "donor"], index=[f"c{i}" for i in range(len(obs))])
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=frame.astype("category"))
    adata.var_names = [f"g{i}" for i in range(genes)]
    return adata


def _donor_shift(adata: ad.AnnData, perturbation: str, cell_type: str, donor: str) -> np.ndarray:
    """Reference shift in one (cell type, donor) context of :func:`donors_screen`, float64."""
    obs = adata.obs
    in_context = ((obs.cell_type == cell_type) & (obs.donor == donor)).to_numpy()

    def mean(name: str) -> np.ndarray:
        return np.asarray(adata.X[in_context & (obs.perturbation == name).to_numpy()], np.float64).mean(0)

    return mean(perturbation) - mean("control")


def test_a_held_out_donor_takes_its_own_cell_types_response_from_the_other_donors() -> None:
    """context_mean, context_mixture and random_train predict (A, t1, b3) from t1 in b1 and b2 only, against a
    float64 reference; a cell type that no other donor has would take every context's mean (here none)."""
    adata = donors_screen()
    data = PerturbationData(adata, DataConfig(cell_type_key="cell_type", batch_key="donor"))
    split = make_split(data, SplitConfig(kind="holdout_batch", holdout=["b3"], val_fraction=0.0))
    data.fit(split.train)
    condition = data.condition("A|t1|b3")

    def shift(t: str, b: str) -> np.ndarray:
        return _donor_shift(adata, "A", t, b)

    expected = (shift("t1", "b1") + shift("t1", "b2")) / 2
    every_context = np.mean([shift(t, b) for t in ("t1", "t2") for b in ("b1", "b2")], axis=0)
    got = as_predictor("context_mean").fit(data, split.train).shift(data, condition)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    mixed = as_predictor("context_mixture").fit(data, split.train).shift(data, condition)
    b1, b2 = shift("t1", "b1"), shift("t1", "b2")  # a mixture of the two t1 donors' shifts only
    weight = float((mixed - b2) @ (b1 - b2) / ((b1 - b2) @ (b1 - b2)))
    assert 0.0 <= weight <= 1.0
    np.testing.assert_allclose(mixed, weight * b1 + (1 - weight) * b2, rtol=1e-5, atol=1e-5)
    assert np.abs(expected - every_context).min() > 0.2  # the other cell type's opposite response left out
    drawn = _rows(RandomTrainBaseline().fit(data, split.train).predict(data, condition, 200, seed=0))
    t1 = (adata.obs.cell_type == "t1").to_numpy() & (adata.obs.perturbation == "A").to_numpy()
    assert drawn <= _rows(adata.X[t1])


def test_a_training_condition_is_predicted_without_the_fields_the_test_holds_out() -> None:
    """With cell types held out (``held_out``), context_mean predicts a training condition from the other cell types
    only, as a held-out cell type's is predicted; without, from its own cell type in the other donors."""
    adata = donors_screen(cell_types=("t1", "t2", "t3"))
    data = PerturbationData(adata, DataConfig(cell_type_key="cell_type", batch_key="donor"))
    split = make_split(data, SplitConfig(kind="holdout_cell_type", holdout=["t3"], val_fraction=0.0))
    data.fit(split.train)
    assert data.held_out_fields(split.test) == ("cell_type",) and data.held_out_fields(split.train) == ()

    def shift(t: str, b: str) -> np.ndarray:
        return _donor_shift(adata, "A", t, b)

    training = data.condition("A|t1|b1")
    mimic = ContextMeanBaseline()
    mimic.held_out = ("cell_type",)
    mimic.fit(data, split.train)
    np.testing.assert_allclose(mimic.shift(data, training), np.mean([shift("t2", b) for b in ("b1", "b2", "b3")], axis=0),
                               rtol=1e-5, atol=1e-5)
    plain = ContextMeanBaseline().fit(data, split.train)
    np.testing.assert_allclose(plain.shift(data, training), (shift("t1", "b2") + shift("t1", "b3")) / 2, rtol=1e-5, atol=1e-5)
    every_trained = np.mean([shift(t, b) for t in ("t1", "t2") for b in ("b1", "b2", "b3")], axis=0)
    for predictor in (mimic, plain):  # a held-out cell type's shift is the same either way
        np.testing.assert_allclose(predictor.shift(data, data.condition("A|t3|b1")), every_trained, rtol=1e-5, atol=1e-5)


def mixed_cell_types(weight: float, genes: int = 20, cells: int = 60, seed: int = 0) -> ad.AnnData:
    """Cell types t1 and t2 with their own levels and responses to A, and t3 whose levels and response
    are the mixture ``weight * t1 + (1 - weight) * t2`` of theirs (plus noise)."""
    rng = np.random.default_rng(seed)
    base = {t: rng.uniform(2.0, 4.0, genes) for t in ("t1", "t2")}
    response = {t: rng.normal(0, 0.8, genes) for t in ("t1", "t2")}
    for mixed in (base, response):
        mixed["t3"] = weight * mixed["t1"] + (1 - weight) * mixed["t2"]
    blocks, labels, types = [], [], []
    for t in ("t1", "t2", "t3"):
        for name, shift in (("control", 0.0), ("A", response[t])):
            blocks.append(base[t] + shift + 0.05 * rng.normal(size=(cells, genes)))
            labels += [name] * cells
            types += [t] * cells
    obs = pd.DataFrame({"perturbation": labels, "cell_type": types}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=obs.astype("category"))
    adata.var_names = [f"g{i}" for i in range(genes)]
    return adata


@pytest.mark.parametrize("weight", [0.3, 0.8])
def test_context_mixture_weights_the_other_contexts_by_their_nearest_control_mixture(weight: float) -> None:
    """Reference: with two other contexts the nearest mixture of their control means is the projection
    onto the segment between them, ``w = clip((x - b2).(b1 - b2) / |b1 - b2|^2, 0, 1)`` (float64)."""
    adata = mixed_cell_types(weight)
    data, train, _ = _data(adata, "holdout_cell_type", ["t3"])
    shift = ContextMixtureBaseline().fit(data, train).shift(data, data.condition("A|t3"))
    b1, b2, x = (_cells(adata, "control", t).mean(0) for t in ("t1", "t2", "t3"))
    w = np.clip((x - b2) @ (b1 - b2) / ((b1 - b2) @ (b1 - b2)), 0.0, 1.0)
    expected = w * _shift(adata, "A", "t1") + (1 - w) * _shift(adata, "A", "t2")
    np.testing.assert_allclose(shift, expected, atol=1e-6)
    assert abs(w - weight) < 0.02  # the levels say which cell type t3 resembles
    truth = _shift(adata, "A", "t3")
    plain = ContextMeanBaseline().fit(data, train).shift(data, data.condition("A|t3"))
    assert np.mean((shift - truth) ** 2) < 0.2 * np.mean((plain - truth) ** 2)


def test_context_mixture_is_context_mean_without_two_other_contexts() -> None:
    """A combination of trained parts, an unseen perturbation, or one other context: context_mean's rules."""
    adata, _ = additive_screen(context_shift=0.3)
    for kind, holdout, label in (
        ("holdout_combination", ["A+B"], "A+B|t2"),
        ("holdout_perturbation", ["C"], "C|t2"),
    ):
        data, train, _ = _data(adata, kind, holdout)
        mixture, mean = ContextMixtureBaseline().fit(data, train), ContextMeanBaseline().fit(data, train)
        np.testing.assert_array_equal(mixture.shift(data, data.condition(label)), mean.shift(data, data.condition(label)))
    data, _, _ = _data(adata, "holdout_cell_type", ["t3"])
    one_other = ["A|t1", "B|t1", "A|t2"]
    mixture, mean = ContextMixtureBaseline().fit(data, one_other), ContextMeanBaseline().fit(data, one_other)
    np.testing.assert_array_equal(mixture.shift(data, data.condition("B|t3")), mean.shift(data, data.condition("B|t3")))


@pytest.mark.parametrize("pseudocount", [0.01, 0.5])
def test_context_fold_applies_the_mean_log_fold_of_geometric_means_to_the_held_out_level(pseudocount: float) -> None:
    """``pooling="mean"``, reference (float64): per other cell type k, ``f_k = (expm1(s_k) + p) / (expm1(m_k) + p)``; the held-out cell
    type's shift is ``log1p(max(exp(mean_k log f_k) (expm1(m) + p) - p, 0)) - m``."""
    adata, _ = additive_screen(context_shift=0.3, seed=3)
    data, train, _ = _data(adata, "holdout_cell_type", ["t3"])
    shift = ContextFoldBaseline(pseudocount, pooling="mean").fit(data, train).shift(data, data.condition("A|t3"))
    log_folds = []
    for t in ("t1", "t2"):
        control = _cells(adata, "control", t).mean(0)
        perturbed = _cells(adata, "A", t).mean(0)
        log_folds.append(np.log((np.expm1(perturbed) + pseudocount) / (np.expm1(control) + pseudocount)))
    level = _cells(adata, "control", "t3").mean(0)
    moved = np.exp(np.mean(log_folds, axis=0)) * (np.expm1(level) + pseudocount) - pseudocount
    np.testing.assert_allclose(shift, np.log1p(np.maximum(moved, 0.0)) - level, rtol=1e-5, atol=1e-5)


def count_screen(types: int = 5, genes: int = 12, seed: int = 0) -> ad.AnnData:
    """log1p Poisson counts of ``types`` cell types with their own levels per gene (some barely expressed) and
    their own folds under A, so that the folds' noise and disagreement both vary by gene."""
    rng = np.random.default_rng(seed)
    blocks, labels, cell_types = [], [], []
    for t in range(types):
        rate = rng.choice([0.02, 0.3, 3.0], size=genes) * rng.uniform(0.5, 1.5, genes)
        fold = np.exp(rng.normal(0.7, 0.4, genes))
        cells = int(rng.integers(30, 90))
        for name, r in (("control", rate), ("A", rate * fold)):
            blocks.append(np.log1p(rng.poisson(r, size=(cells, genes))))
            labels += [name] * cells
            cell_types += [f"t{t}"] * cells
    obs = pd.DataFrame({"perturbation": labels, "cell_type": cell_types}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=obs.astype("category"))
    adata.var_names = [f"g{i}" for i in range(genes)]
    return adata


def _dersimonian_laird(effects: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gene by gene, statsmodels' ``combine_effects(method_re="dl")``: its random-effects mean and that mean's variance
    where its tau^2 is positive, else its fixed-effect ones (statsmodels does not truncate the moment estimate at 0;
    DerSimonian and Laird do, and at tau^2 = 0 the two fits are one)."""
    means, mean_variances = [], []
    for g in range(effects.shape[1]):
        fit = combine_effects(effects[:, g], variances[:, g], method_re="dl")
        random = fit.tau2 > 0
        means.append(fit.mean_effect_re if random else fit.mean_effect_fe)
        mean_variances.append((fit.sd_eff_w_re if random else fit.sd_eff_w_fe) ** 2)
    return np.array(means), np.array(mean_variances)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_random_effects_mean_and_variance_match_statsmodels_dersimonian_laird(k: int) -> None:
    """Reference: statsmodels' DerSimonian-Laird fit gene by gene, on random effects and variances (both signs of
    tau^2): the pooled mean and its variance."""
    rng = np.random.default_rng(k)
    effects = rng.normal(0.0, 1.0, size=(k, 40))
    variances = rng.uniform(0.01, 0.5, size=(k, 40))
    expected_mean, expected_variance = _dersimonian_laird(effects, variances)
    mean, variance = random_effects(effects, variances)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(variance, expected_variance, rtol=1e-10)


def test_squared_standard_errors_are_the_mean_variance_and_at_least_one_cell_at_the_smallest_value() -> None:
    """Reference: ``var(ddof=1) / n`` (float64); a gene no cell detects gets ``a^2 / n^2`` with ``a`` the smallest
    positive value of the cells."""
    rng = np.random.default_rng(0)
    cells = np.log1p(rng.poisson(2.0, size=(25, 5))).astype(np.float64)
    cells[:, 3] = 0.0
    a = cells[cells > 0].min()
    expected = cells.var(0, ddof=1) / 25
    expected[3] = a**2 / 25**2
    np.testing.assert_allclose(squared_standard_errors(cells), expected, rtol=1e-12)
    np.testing.assert_allclose(squared_standard_errors(np.zeros((4, 2))), np.full(2, 1 / 16))  # nothing detected: a = 1


def test_context_fold_pools_the_log_folds_by_random_effects_on_their_delta_method_variances() -> None:
    """Reference (float64, statsmodels): per other cell type k the log fold of geometric means and its variance
    ``sum over (perturbed, control) of (exp(l) / (expm1(l) + p))^2 se^2(l)``, pooled gene by gene by
    DerSimonian and Laird (:func:`_dersimonian_laird`), applied to the held-out level; on these data the weights
    move the pooled fold off the plain mean of the folds."""
    adata = count_screen()
    data, train, _ = _data(adata, "holdout_cell_type", ["t4"])
    p = 0.01
    fold = ContextFoldBaseline(p).fit(data, train)
    shift = fold.shift(data, data.condition("A|t4"))
    log_folds, variances = [], []
    for t in ("t0", "t1", "t2", "t3"):
        levels = []
        for name in ("A", "control"):
            x = _cells(adata, name, t)
            se2 = np.maximum(x.var(0, ddof=1), x[x > 0].min() ** 2 / len(x)) / len(x)
            levels.append((x.mean(0), se2))
        (s, s_se2), (m, m_se2) = levels
        log_folds.append(np.log((np.expm1(s) + p) / (np.expm1(m) + p)))
        variances.append((np.exp(s) / (np.expm1(s) + p)) ** 2 * s_se2 + (np.exp(m) / (np.expm1(m) + p)) ** 2 * m_se2)
    log_folds, variances = np.array(log_folds), np.array(variances)
    pooled, pooled_variance = _dersimonian_laird(log_folds, variances)
    level = _cells(adata, "control", "t4").mean(0)

    def shift_of(log_fold: np.ndarray) -> np.ndarray:
        return np.log1p(np.maximum(np.exp(log_fold) * (np.expm1(level) + p) - p, 0.0)) - level

    np.testing.assert_allclose(shift, shift_of(pooled), rtol=1e-5, atol=1e-6)
    assert not np.allclose(pooled, log_folds.mean(0), atol=1e-3)  # the weights matter on these data
    h = 1e-6  # the standard error: the pooled fold's, through the shift's slope (central difference)
    slope = (shift_of(pooled + h) - shift_of(pooled - h)) / (2 * h)
    error = fold.shift_standard_error(data, data.condition("A|t4"))
    np.testing.assert_allclose(error, np.abs(slope) * np.sqrt(pooled_variance), rtol=1e-4, atol=1e-9)


def resampled_screen(rng: np.random.Generator, rates: dict[tuple[str, str], np.ndarray], cells: int) -> ad.AnnData:
    """log1p Poisson counts, ``cells`` per (perturbation, cell type) of ``rates``, drawn afresh with ``rng``."""
    blocks, labels, types = [], [], []
    for (name, t), rate in rates.items():
        blocks.append(np.log1p(rng.poisson(rate, size=(cells, len(rate)))))
        labels += [name] * cells
        types += [t] * cells
    obs = pd.DataFrame({"perturbation": labels, "cell_type": types}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=obs.astype("category"))
    adata.var_names = [f"g{i}" for i in range(len(next(iter(rates.values()))))]
    return adata


@pytest.mark.parametrize(
    ("predictor", "kind", "holdout", "label"),
    [
        (ContextMeanBaseline(), "holdout_cell_type", ["t3"], "A|t3"),
        (ContextMeanBaseline(), "holdout_combination", ["A+B"], "A+B|t3"),
        (ContextMixtureBaseline(), "holdout_cell_type", ["t3"], "A|t3"),
        (ContextFoldBaseline(pooling="mean"), "holdout_cell_type", ["t3"], "A|t3"),
    ],
    ids=["mean", "sum-of-parts", "mixture", "fold"],
)
def test_shift_standard_errors_match_the_spread_of_shifts_over_resampled_cells(
    predictor: Predictor, kind: str, holdout: list[str], label: str
) -> None:
    """Reference: Monte Carlo. The same cell types and responses, their cells drawn afresh 300 times: the predicted
    shift's standard deviation over the draws matches its mean standard error: within 10% over the genes, 15% gene by
    gene (25% for the mixture, whose weights, taken as fixed, move a little with the draws)."""
    rng = np.random.default_rng(0)
    genes = 40
    rates, bases = {}, {"t1": rng.uniform(1.0, 4.0, genes), "t2": rng.uniform(1.0, 4.0, genes)}
    bases["t3"] = 0.7 * bases["t1"] + 0.3 * bases["t2"]  # the mixture's weights, estimated on 40 genes, barely move
    for t in CELL_TYPES:
        base = bases[t]
        effects = {"A": np.exp(rng.normal(0.5, 0.3, genes)), "B": np.exp(rng.normal(-0.3, 0.3, genes))}
        for name, fold in (("control", 1.0), ("A", effects["A"]), ("B", effects["B"]), ("A+B", effects["A"] * effects["B"])):
            rates[(name, t)] = base * fold
    shifts, errors = [], []
    for _ in range(300):
        data, train, _ = _data(resampled_screen(rng, rates, cells=40), kind, holdout)
        fitted = predictor.fit(data, train)
        shifts.append(fitted.shift(data, data.condition(label)))
        errors.append(fitted.shift_standard_error(data, data.condition(label)))
    spread, error = np.std(shifts, axis=0, ddof=1), np.mean(errors, axis=0)
    np.testing.assert_allclose(spread, error, rtol=0.25 if isinstance(predictor, ContextMixtureBaseline) else 0.15)
    assert abs(np.median(spread / error) - 1.0) < 0.1


def test_context_fold_pooling_must_be_known() -> None:
    """An unknown pooling is a ConfigError naming the known ones."""
    with pytest.raises(ConfigError, match="random_effects, mean"):
        ContextFoldBaseline(pooling="median")


def test_context_fold_moves_a_gene_by_the_held_out_context_own_level() -> None:
    """Two cell types double gene 0 (x3 on the geometric mean of 1 + counts, say); the held-out one expresses it at a
    tenth of their level: its predicted rise is a tenth of theirs in expression, where context_mean moves it as far
    as theirs; a combination (no other context of it) is context_mean's sum of parts."""
    rng = np.random.default_rng(0)
    genes, cells = 6, 50
    level = {"t1": 2.0, "t2": 2.0, "t3": 0.2}  # expm1 means of gene 0
    blocks, labels, types = [], [], []
    for t, e in level.items():
        for name, fold in (("control", 1.0), ("A", 3.0), ("B", 1.0), ("A+B", 3.0)):
            x = np.tile(rng.uniform(1.0, 2.0, genes), (cells, 1)) + 0.01 * rng.normal(size=(cells, genes))
            x[:, 0] = np.log1p(e * fold)
            blocks.append(x)
            labels += [name] * cells
            types += [t] * cells
    obs = pd.DataFrame({"perturbation": labels, "cell_type": types}, index=[f"c{i}" for i in range(len(labels))])
    adata = ad.AnnData(np.vstack(blocks).astype(np.float32), obs=obs.astype("category"))
    adata.var_names = [f"g{i}" for i in range(genes)]
    data, train, _ = _data(adata, "holdout_cell_type", ["t3"])
    fold = ContextFoldBaseline(pseudocount=1e-6).fit(data, train).shift(data, data.condition("A|t3"))
    mean = ContextMeanBaseline().fit(data, train).shift(data, data.condition("A|t3"))
    np.testing.assert_allclose(np.expm1(np.log1p(0.2) + fold[0]), 0.6, rtol=1e-4)
    np.testing.assert_allclose(mean[0], np.log1p(6.0) - np.log1p(2.0), rtol=1e-4)
    combination_data, combination_train, _ = _data(adata, "holdout_combination", ["A+B"])
    combination = combination_data.condition("A+B|t2")
    np.testing.assert_array_equal(
        ContextFoldBaseline().fit(combination_data, combination_train).shift(combination_data, combination),
        ContextMeanBaseline().fit(combination_data, combination_train).shift(combination_data, combination),
    )


def _ridge(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alpha: float) -> np.ndarray:
    """Closed-form ridge with an unpenalised intercept: centre, solve (X'X + aI) W = X'Y."""
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return ym + (x_new - xm) @ w


def test_linear_recovers_an_additive_shift_and_matches_closed_form_ridge() -> None:
    adata, truth = additive_screen(("A", "B", "C", "A+B", "A+C", "B+C"), context_shift=0.3)
    data, train, test = _data(adata, "holdout_combination", ["B+C"])
    alpha = 1e-3
    baseline = LinearBaseline(alpha=alpha).fit(data, train)

    def design(labels: list[str]) -> np.ndarray:  # part incidence and one-hot cell type, built here
        rows = [label.split("|") for label in labels]
        parts = [[float(p in name.split("+")) for p in ("A", "B", "C")] for name, _ in rows]
        kinds = [[float(t == k) for k in CELL_TYPES] for _, t in rows]
        return np.hstack([np.array(parts), np.array(kinds)])

    y = np.stack([_shift(adata, *label.split("|")) for label in train])
    for label in test:
        predicted = _predicted_shift(baseline, data, label)
        np.testing.assert_allclose(predicted, _ridge(design(train), y, design([label]), alpha)[0], atol=1e-5)
        np.testing.assert_allclose(predicted, truth[tuple(label.split("|"))], atol=0.08)


# --- what each baseline samples -----------------------------------------------------------------


def test_control_returns_control_cells_of_the_context() -> None:
    adata, _ = additive_screen()
    data, train, _ = _data(adata, "holdout_cell_type", ["t3"])
    controls = _rows(_cells(adata, "control", "t3"))
    condition = data.condition("A|t3")
    few = ControlBaseline().predict(data, condition, 20, seed=1)
    many = ControlBaseline().fit(data, train).predict(data, condition, 200, seed=1)
    assert few.shape == (20, data.n_genes) and many.shape == (200, data.n_genes)
    assert _rows(few) <= controls and len(_rows(few)) == 20  # without replacement when there are enough
    assert _rows(many) == controls  # with replacement when fewer: every one of the 47 is drawn


def test_random_train_draws_training_cells_of_the_same_perturbation() -> None:
    adata, _ = additive_screen()
    data, train, _ = _data(adata, "holdout_cell_type", ["t3"])
    cells = _rows(RandomTrainBaseline().fit(data, train).predict(data, data.condition("A|t3"), 300, seed=0))
    t1, t2 = _rows(_cells(adata, "A", "t1")), _rows(_cells(adata, "A", "t2"))
    assert cells <= t1 | t2 and cells & t1 and cells & t2


def test_random_train_of_an_unseen_perturbation_draws_training_cells_of_its_cell_type() -> None:
    adata, _ = additive_screen()
    data, train, _ = _data(adata, "holdout_perturbation", ["C"])
    cells = RandomTrainBaseline().fit(data, train).predict(data, data.condition("C|t2"), 500, seed=0)
    allowed = set().union(*(_rows(_cells(adata, p, "t2")) for p in ("A", "B", "A+B")))
    assert _rows(cells) <= allowed and len(_rows(cells)) > 100


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("label", ["A|t3", "B|t1"], ids=["held-out", "training"])
def test_baselines_never_read_the_cells_they_predict(name: str, label: str) -> None:
    """Replacing the cells of a held-out or of a training condition by wild values leaves that
    condition's prediction unchanged (a training condition is left out of its own prediction)."""
    adata, _ = additive_screen()
    wild = adata.copy()
    perturbation, cell_type = label.split("|")
    mask = ((wild.obs.perturbation == perturbation) & (wild.obs.cell_type == cell_type)).to_numpy()
    wild.X[mask] = np.random.default_rng(5).uniform(10, 15, size=(int(mask.sum()), wild.n_vars)).astype(np.float32)
    predictions = []
    for source in (adata, wild):
        data, train, _ = _data(source, "holdout_cell_type", ["t3"])
        predictions.append(as_predictor(name).fit(data, train).predict(data, data.condition(label), 30, seed=3))
    np.testing.assert_array_equal(predictions[0], predictions[1])
    assert np.abs(predictions[0].mean(0) - wild.X[mask].mean(0)).min() > 3


@pytest.mark.parametrize("name", NAMES)
def test_predictions_depend_on_the_seed_only(name: str) -> None:
    adata, _ = additive_screen()
    data, train, _ = _data(adata, "holdout_cell_type", ["t3"])
    condition = data.condition("A+B|t3")
    runs = [as_predictor(name).fit(data, train).predict(data, condition, 25, seed=s) for s in (4, 4, 5)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert runs[0].dtype == np.float32 and (runs[0] >= 0).all()


# --- registry and errors ------------------------------------------------------------------------


def test_baselines_are_registered_by_name() -> None:
    classes = (ControlBaseline, ContextMeanBaseline, ContextFoldBaseline, ContextMixtureBaseline, LinearBaseline,
               RandomTrainBaseline)
    for name, cls in zip(NAMES, classes, strict=True):
        assert type(as_predictor(name)) is cls
    assert as_predictor("linear", alpha=2.5).alpha == 2.5
    assert as_predictor("context_fold", pseudocount=0.1).pseudocount == 0.1
    for bad in (0.0, -1.0, "0.01"):
        with pytest.raises(ConfigError, match="context_fold pseudocount must be a positive number"):
            ContextFoldBaseline(pseudocount=bad)


@pytest.mark.parametrize("name", ["context_mean", "context_fold", "context_mixture", "linear", "random_train"])
def test_predict_before_fit_is_a_clear_error(name: str) -> None:
    adata, _ = additive_screen()
    data, _, _ = _data(adata, "holdout_cell_type", ["t3"])
    with pytest.raises(InputError, match="not fitted; call fit"):
        as_predictor(name).predict(data, data.condition("A|t3"), 5, seed=0)


def test_bad_training_input_is_a_clear_error() -> None:
    adata, _ = additive_screen()
    data, train, _ = _data(adata, "holdout_cell_type", ["t3"])
    with pytest.raises(InputError, match="alpha must be a non-negative"):
        LinearBaseline(alpha=-1.0).fit(data, train)
    with pytest.raises(InputError, match="must be perturbed"):
        ContextMeanBaseline().fit(data, [*train, "control|t1"])
    with pytest.raises(InputError, match="No training conditions"):
        RandomTrainBaseline().fit(data, [])
    alone = ContextMeanBaseline().fit(data, ["A|t1"])
    with pytest.raises(InputError, match="no training condition other than 'A\\|t1'"):
        alone.predict(data, data.condition("A|t1"), 5, seed=0)


# --- the real data ------------------------------------------------------------------------------


def _baseline_metrics(path, data_config: DataConfig, split_config: SplitConfig) -> pd.DataFrame:
    data, split = prepare(data_config, split_config, path)
    predictions = {
        name: predict_anndata(as_predictor(name).fit(data, split.train), data, split.test, progress=False)
        for name in NAMES
    }
    real = real_anndata(data, split.test)
    table = compare(
        predictions, real, perturbation_key=data_config.perturbation_key, cell_type_key=data_config.cell_type_key
    )
    assert set(table.method) == set(NAMES)
    return aggregate(table)


@pytest.mark.slow
def test_kang18_held_out_cell_type(kang18_path) -> None:
    """Held-out CD14+Mono: the other cell types' IFN-beta shift explains the real one; adding it to
    every control cell calls far more genes DE than the real data has."""
    wide = _baseline_metrics(
        kang18_path,
        DataConfig(perturbation_key="condition", cell_type_key="cell_type"),
        SplitConfig(kind="holdout_cell_type", holdout=["CD14+Mono"]),
    )
    assert wide.loc["pearson_delta", "context_mean"] > wide.loc["pearson_delta", "control"] + 0.5
    assert wide.loc["mmd2_energy", "context_mean"] < wide.loc["mmd2_energy", "control"]
    assert wide.loc["de_nsig_counts_pred", "context_mean"] > 3 * wide.loc["de_nsig_counts_real", "context_mean"]


def test_norman19_held_out_combinations(norman19_path) -> None:
    """Held-out K562 double perturbations: the sum of the single parts' shifts beats no change."""
    wide = _baseline_metrics(
        norman19_path,
        DataConfig(cell_type_key="cell_type"),
        SplitConfig(kind="holdout_combination", holdout=["KLF1+MAP2K6", "MAP2K3+MAP2K6", "MAPK1+TGFBR2"]),
    )
    assert wide.loc["mse_delta", "context_mean"] < wide.loc["mse_delta", "control"] / 2
    assert wide.loc["pearson_delta", "context_mean"] > 0.5


def test_population_conditions_caps_the_conditions_that_get_later_populations() -> None:
    """With ``population_conditions`` 2 of 4 conditions, drawn with the seed, get populations 0-2 and the others
    population 0 only; every condition's population 0 is the uncapped prediction's."""
    adata, _ = additive_screen()
    data, train, test = _data(adata, "holdout_cell_type", ["t3"])
    baseline = ContextMeanBaseline().fit(data, train)
    full = predict_anndata(baseline, data, test, seed=3, populations=3, progress=False)
    capped = predict_anndata(baseline, data, test, seed=3, populations=3, population_conditions=2, progress=False)
    perturbed = capped.obs[capped.obs.perturbation != "control"]
    counts = perturbed.groupby(["perturbation", "population"], observed=True).size().unstack(fill_value=0)
    assert sorted((counts > 0).sum(axis=1).tolist()) == [1, 1, 3, 3]
    np.testing.assert_array_equal(first_population(capped).X, first_population(full).X)
    again = predict_anndata(baseline, data, test, seed=3, populations=3, population_conditions=2, progress=False)
    np.testing.assert_array_equal(again.X, capped.X)
