"""Each evaluation metric against an independent float64 reference on random, structured data."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import mannwhitneyu, norm

from perturbdiff_core import load
from perturbdiff_core.evaluation import (
    DEFINITIONS,
    DEResult,
    de_metrics,
    discrimination_scores,
    log2_fold_change,
    population_variability,
    pseudobulk_metrics,
    wilcoxon_de,
)
from perturbdiff_core.evaluation.de import ControlRanks, spearman_nsig
from perturbdiff_core.evaluation.distribution import population_mmd2


def _log1p_cells(rng: np.random.Generator, n: int, rate: np.ndarray) -> np.ndarray:
    """Sparse-ish log1p expression with ties (Poisson counts over a cell size factor)."""
    size = rng.uniform(0.7, 1.3, size=(n, 1))
    return np.log1p(rng.poisson(rate * size, size=(n, rate.size)) / size)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


# --- pseudobulk -------------------------------------------------------------------------------


def test_log2_fold_change_of_geometric_means() -> None:
    mean = np.array([0.0, 0.0, 1.2, 0.7, 2.0])
    control = np.array([0.0, 0.5, 0.0, 0.7, 0.3])
    expected = []
    for m, c in zip(mean, control, strict=True):
        num, den = math.exp(m) - 1, math.exp(c) - 1
        if num == den == 0:
            expected.append(0.0)
        elif den == 0 or num == 0:
            expected.append(math.inf if den == 0 else -math.inf)
        else:
            expected.append(math.log2(num / den))
    np.testing.assert_allclose(log2_fold_change(mean, control), expected, rtol=1e-14)


def test_pseudobulk_metrics_match_numpy_formulas() -> None:
    rng = np.random.default_rng(0)
    real_ctrl, pred_ctrl = rng.gamma(1.0, 1.0, 50), rng.gamma(1.0, 1.0, 50)
    real = real_ctrl * np.exp(rng.normal(0, 0.5, 50))
    pred = pred_ctrl + 0.6 * (real - real_ctrl) + rng.normal(0, 0.2, 50)
    pred = np.abs(pred)
    got = pseudobulk_metrics(pred, real, pred_ctrl, real_ctrl)
    dp, dr = pred - pred_ctrl, real - real_ctrl
    assert got["pearson_delta"] == pytest.approx(np.corrcoef(dp, dr)[0, 1], abs=1e-12)
    assert got["mse"] == pytest.approx(sum((p - r) ** 2 for p, r in zip(pred, real, strict=True)) / 50, abs=1e-12)
    assert got["mae"] == pytest.approx(sum(abs(p - r) for p, r in zip(pred, real, strict=True)) / 50, abs=1e-12)
    assert got["mse_delta"] == pytest.approx(np.mean((dp - dr) ** 2), abs=1e-12)
    assert got["mae_delta"] == pytest.approx(np.mean(np.abs(dp - dr)), abs=1e-12)
    from sklearn.metrics import r2_score

    assert got["r2"] == pytest.approx(r2_score(real, pred), abs=1e-12)
    lfc_ref = np.log2(np.expm1(real) / np.expm1(real_ctrl))
    lfc_pred = np.log2(np.expm1(pred) / np.expm1(pred_ctrl))
    assert got["spearman_lfc"] == pytest.approx(_spearman(lfc_pred, lfc_ref), abs=1e-12)
    assert 0.3 < got["pearson_delta"] < 1.0  # the planted partial agreement shows


# --- differential expression --------------------------------------------------------------------


def _mwu_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Mann-Whitney p-value by pair counting: normal approximation, tie and continuity corrections."""
    n1, n2 = len(x), len(y)
    u1 = sum((a > b) + 0.5 * (a == b) for a in x for b in y)
    _, ties = np.unique(np.concatenate([x, y]), return_counts=True)
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - (ties**3 - ties).sum() / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (max(u1, n1 * n2 - u1) - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    return min(1.0, 2 * norm.sf(z))


def _bh_reference(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values by the step-up loop."""
    m = len(p)
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        adjusted[i] = running
    return adjusted


def test_wilcoxon_de_matches_pair_counting_and_bh() -> None:
    rng = np.random.default_rng(1)
    rate = rng.gamma(1.0, 1.5, 40)
    shift = np.where(rng.random(40) < 0.3, rng.normal(0, 1.5, 40), 0.0)
    cells, control = _log1p_cells(rng, 30, rate * np.exp(shift)), _log1p_cells(rng, 25, rate)
    cells[:, 0] = control[:, 0] = 0.0  # one gene silent in both: p = 1, fold change 0
    de = wilcoxon_de(cells, control)
    p_ref = np.array([_mwu_reference(cells[:, g], control[:, g]) for g in range(40)])
    np.testing.assert_allclose(de.pvalue, p_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(de.fdr, _bh_reference(p_ref), rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(de.log2_fold_change, log2_fold_change(cells.mean(0), control.mean(0)))
    assert de.pvalue[0] == 1.0 and de.log2_fold_change[0] == 0.0
    assert de.significant().sum() >= 3  # the planted shifts are found


@pytest.mark.parametrize("values", ["continuous", "counts"])
def test_control_ranks_match_scipy_for_every_condition(values: str) -> None:
    """One sorted control tests several conditions as SciPy's float64 Mann-Whitney U does on each joined sample."""
    rng = np.random.default_rng(4)
    genes = 60
    rate = rng.gamma(0.5, 1.0, genes)
    if values == "continuous":
        control = rng.normal(0.0, 1.0, (90, genes)).astype(np.float32)
        conditions = [rng.normal(rng.normal(0, 0.5, genes), 1.0, (n, genes)).astype(np.float32) for n in (5, 40, 200)]
    else:  # mostly zeros and few distinct values: ties everywhere, some genes silent in both
        control = _log1p_cells(rng, 90, rate).astype(np.float32)
        conditions = [_log1p_cells(rng, n, rate * rng.uniform(0.3, 3.0, genes)).astype(np.float32) for n in (5, 40, 200)]
        control[:, :3] = 0.0
        for cells in conditions:
            cells[:, :3] = 0.0
    ranks = ControlRanks(control)
    for cells in conditions:
        reference = mannwhitneyu(cells.astype(np.float64), control.astype(np.float64), axis=0, method="asymptotic")
        expected = np.nan_to_num(np.clip(reference.pvalue, 0.0, 1.0), nan=1.0)
        de = ranks.test(cells)
        np.testing.assert_allclose(de.pvalue, expected, rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(de.log2_fold_change, log2_fold_change(cells.mean(0), control.mean(0)))
        assert 0.0 < de.pvalue.min() < 0.01  # the shifted genes are found: the comparison is not of all-ones
    if values == "counts":
        assert (ranks.test(conditions[0]).pvalue[:3] == 1.0).all()


def test_control_ranks_refuse_a_gene_count_mismatch() -> None:
    ranks = ControlRanks(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="5 genes, the control cells 3"):
        ranks.test(np.zeros((2, 5)))


def _random_de(rng: np.random.Generator, genes: int, frac_sig: float) -> DEResult:
    lfc = rng.normal(0, 1, genes)
    fdr = np.where(rng.random(genes) < frac_sig, rng.uniform(0, 0.05, genes), rng.uniform(0.05, 1, genes))
    return DEResult(lfc, rng.uniform(0, 1, genes), fdr)


def _top(de: DEResult) -> list[int]:
    sig = [g for g in range(de.fdr.size) if de.fdr[g] < 0.05]
    return sorted(sig, key=lambda g: -abs(de.log2_fold_change[g]))


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Sum over distinct thresholds of (recall step) x precision."""
    total, prev_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        hit = scores >= t
        recall = (hit & labels).sum() / labels.sum()
        total += (recall - prev_recall) * (hit & labels).sum() / hit.sum()
        prev_recall = recall
    return total


def test_de_metrics_match_set_arithmetic() -> None:
    rng = np.random.default_rng(2)
    real = _random_de(rng, 300, 0.4)
    pred = DEResult(
        0.7 * real.log2_fold_change + rng.normal(0, 0.7, 300),
        real.pvalue,
        np.where(rng.random(300) < 0.6, real.fdr, rng.uniform(0, 0.1, 300)),
    )
    got = de_metrics(real, pred, top_k=(50, 100, 500))
    real_top, pred_top = _top(real), _top(pred)
    assert len(real_top) > 100 and len(pred_top) > 100  # the cut-offs below bite
    for k, key in ((len(real_top), "N"), (50, "50"), (100, "100"), (len(real_top), "500")):
        assert got[f"overlap_at_{key}"] == pytest.approx(len(set(real_top[:k]) & set(pred_top[:k])) / k)
    for k, key in ((len(pred_top), "N"), (50, "50"), (100, "100"), (len(pred_top), "500")):
        assert got[f"precision_at_{key}"] == pytest.approx(len(set(real_top[:k]) & set(pred_top[:k])) / k)
    sig = real.fdr < 0.05
    lr, lp = real.log2_fold_change[sig], pred.log2_fold_change[sig]
    assert got["de_direction_match"] == pytest.approx(np.mean([(a > 0) == (b > 0) for a, b in zip(lr, lp, strict=True)]))
    assert got["de_spearman_lfc_sig"] == pytest.approx(_spearman(lr, lp), abs=1e-12)
    assert got["de_sig_genes_recall"] == pytest.approx(len(set(real_top) & set(pred_top)) / len(real_top))
    assert got["de_nsig_counts_real"] == len(real_top) and got["de_nsig_counts_pred"] == len(pred_top)
    score = -np.log10(np.clip(pred.fdr, 1e-10, 1))
    assert got["pr_auc"] == pytest.approx(_average_precision(sig, score), abs=1e-12)
    pos, neg = score[sig], score[~sig]
    auc = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert got["roc_auc"] == pytest.approx(auc, abs=1e-12)


def test_de_metrics_without_real_de_genes_follow_cell_eval() -> None:
    rng = np.random.default_rng(3)
    real, pred = _random_de(rng, 100, 0.0), _random_de(rng, 100, 0.3)
    got = de_metrics(real, pred)
    assert got["overlap_at_N"] == got["precision_at_N"] == 0.0
    for name in ("de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall", "pr_auc", "roc_auc"):
        assert math.isnan(got[name])
    assert got["de_nsig_counts_pred"] > 0


def test_spearman_of_de_counts_skips_conditions_without_real_de_genes() -> None:
    real = np.array([0, 4, 10, 2, 7, 0], dtype=float)
    pred = np.array([9, 3, 12, 1, 2, 5], dtype=float)
    assert spearman_nsig(real, pred) == pytest.approx(_spearman(real[[1, 2, 3, 4]], pred[[1, 2, 3, 4]]))
    assert spearman_nsig(np.zeros(3), pred[:3]) == 1.0


# --- discrimination -----------------------------------------------------------------------------


def _discrimination_reference(pred: np.ndarray, real: np.ndarray, metric: str, include: np.ndarray) -> np.ndarray:
    scipy_name = {"l1": "cityblock", "l2": "euclidean", "cosine": "cosine"}[metric]
    n = len(real)
    out = []
    for i in range(n):
        d = cdist(pred[i : i + 1, include[i]], real[:, include[i]], metric=scipy_name)[0]
        out.append(1 - sum(d[j] < d[i] for j in range(n)) / n)
    return np.array(out)


@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
def test_discrimination_matches_brute_force_ranks(metric: str) -> None:
    rng = np.random.default_rng(4)
    real = rng.normal(0, 1, (8, 30))
    pred = real + rng.normal(0, 3.0, (8, 30))  # noisy enough that some ranks slip
    include = rng.random((8, 30)) > 0.1
    got = discrimination_scores(pred, real, metric, include)
    np.testing.assert_allclose(got, _discrimination_reference(pred, real, metric, include), atol=1e-12)
    assert np.all(discrimination_scores(real + 1e-3 * pred, real, metric) == 1.0)  # near-exact: all first
    assert got.min() < 1.0


def test_discrimination_of_swapped_predictions_is_worst() -> None:
    real = np.eye(4) * 3.0
    pred = real[[1, 0, 3, 2]]  # each prediction equals another condition's real delta
    scores = discrimination_scores(pred, real, "l2")
    np.testing.assert_allclose(scores, 1 - 1 / 4)  # the true condition ranks second of four


# --- distribution and variability ---------------------------------------------------------------


def _energy_reference(x: np.ndarray, y: np.ndarray, unbiased: bool) -> float:
    dxy = cdist(x, y).mean()
    if unbiased:
        n, m = len(x), len(y)
        return 2 * dxy - cdist(x, x).sum() / (n * (n - 1)) - cdist(y, y).sum() / (m * (m - 1))
    return 2 * dxy - cdist(x, x).mean() - cdist(y, y).mean()


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_population_mmd2_is_the_energy_distance(estimator: str) -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(0, 1, (40, 12)), rng.normal(0.4, 1.2, (30, 12))
    got = population_mmd2(x, y, load("perturbdiff.kernels", "energy"), load("perturbdiff.estimators", estimator))
    assert got == pytest.approx(_energy_reference(x, y, estimator == "unbiased"), rel=1e-9)


def test_population_variability_against_pairwise_reference() -> None:
    rng = np.random.default_rng(6)
    kernel, estimator = load("perturbdiff.kernels", "energy"), load("perturbdiff.estimators", "unbiased")
    batch_means = rng.normal(0, 1.0, (3, 10))
    real = [rng.normal(m, 1.0, (40, 10)) for m in batch_means]
    scattered = [rng.normal(m, 1.0, (40, 10)) for m in rng.normal(0, 1.0, (3, 10))]
    same = rng.normal(0, 1.0, (40, 10))
    collapsed = [same.copy() for _ in range(3)]

    values, reason = population_variability(scattered, real, kernel, estimator)
    ref_real = np.mean([_energy_reference(a, b, True) for a, b in combinations(real, 2)])
    ref_pred = np.mean([_energy_reference(a, b, True) for a, b in combinations(scattered, 2)])
    assert reason is None
    assert values["real"] == pytest.approx(ref_real, rel=1e-9)
    assert values["pred"] == pytest.approx(ref_pred, rel=1e-9)
    assert values["ratio"] == pytest.approx(ref_pred / ref_real, rel=1e-9)
    assert 0.3 < values["ratio"] < 3.0  # same batch-effect size as reality

    collapsed_values, _ = population_variability(collapsed, real, kernel, estimator)
    assert collapsed_values["ratio"] < 0.05  # one population every time shows as ~0

    single, reason = population_variability(collapsed, real[:1], kernel, estimator)
    assert all(math.isnan(v) for v in single.values()) and "only 1 real population" in reason


def test_every_metric_is_defined() -> None:
    families = {"pseudobulk", "de", "discrimination", "distribution", "variability", "realism", "calibration"}
    for name, definition in DEFINITIONS.items():
        assert definition.definition and definition.family in families, name


@pytest.mark.parametrize(
    ("metric", "direction", "arrow"),
    [
        ("pearson_delta", "higher is better", " \u2191"),
        ("mse", "lower is better", " \u2193"),
        ("mmd2_rbf", "lower is better", " \u2193"),  # found through the pattern mmd2_{kernel}
        ("variability_mmd2_energy_ratio", "closest to 1", " (best 1)"),
        ("de_nsig_counts_pred", "", ""),
        ("detected_genes_ratio", "closest to 1", " (best 1)"),
        ("zero_fraction_mae", "lower is better", " \u2193"),
    ],
)
def test_metric_directions_for_tables_and_plot_titles(metric: str, direction: str, arrow: str) -> None:
    from perturbdiff_core.evaluation import definition_of

    definition = definition_of(metric)
    assert (definition.direction, definition.arrow) == (direction, arrow)


def test_realism_metrics_against_an_explicit_reference() -> None:
    from perturbdiff_core.evaluation import realism_metrics

    rng = np.random.default_rng(3)
    real = rng.poisson(0.3, size=(40, 25)).astype(float) * rng.uniform(0.5, 2.0, size=(40, 1))
    pred = rng.poisson(0.6, size=(30, 25)).astype(float) * rng.uniform(0.5, 2.0, size=(30, 1))
    values = realism_metrics(np.log1p(pred), np.log1p(real))

    zero_gap = [abs(np.mean(pred[:, g] == 0) - np.mean(real[:, g] == 0)) for g in range(25)]
    assert values["zero_fraction_mae"] == pytest.approx(sum(zero_gap) / 25)
    detected = lambda x: sorted(int((row > 0).sum()) for row in x)  # noqa: E731
    median = lambda v: (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2  # noqa: E731
    assert values["detected_genes_ratio"] == pytest.approx(median(detected(pred)) / median(detected(real)))
    sums_p, sums_r = np.log1p(pred).sum(1), np.log1p(real).sum(1)
    grid = np.concatenate([sums_p, sums_r])
    ecdf_gap = max(abs(np.mean(sums_p <= v) - np.mean(sums_r <= v)) for v in grid)
    assert values["library_size_ks"] == pytest.approx(ecdf_gap)
    assert values["detected_genes_ratio"] > 1.2  # twice the rate: more genes detected per cell

    same = realism_metrics(np.log1p(real), np.log1p(real))
    assert same == {"zero_fraction_mae": 0.0, "detected_genes_ratio": 1.0, "library_size_ks": 0.0}


def _populations(rng: np.random.Generator, k: int, spread: float, n: int = 40, genes: int = 6) -> list[np.ndarray]:
    """``k`` populations of ``n`` cells, each a normal cloud moved by its own random offset of scale ``spread``."""
    return [rng.normal(size=(n, genes)) + spread * rng.normal(size=(1, genes)) for _ in range(k)]


def test_population_calibration_is_uniform_for_exchangeable_populations_and_small_outside() -> None:
    from perturbdiff_core.evaluation.distribution import population_calibration

    kernel, estimator = load("perturbdiff.kernels", "energy"), load("perturbdiff.estimators", "unbiased")
    rng = np.random.default_rng(0)
    k = 9
    exchangeable = []
    for _ in range(40):  # the real population is one more draw of the same distribution over populations
        pops = _populations(rng, k + 1, spread=1.0)
        exchangeable.append(population_calibration(pops[:k], pops[k], kernel, estimator, rng))
    values = np.array(exchangeable)
    assert set(np.round(values * (k + 1)).astype(int)) <= set(range(1, k + 2))  # (1 + count) / (K + 1)
    assert 0.35 < values.mean() < 0.65 and (values > 0.1).mean() > 0.75

    overconfident = []  # predictions all alike, the real population moved like reality's donors are
    for _ in range(10):
        pops = _populations(rng, k, spread=0.0)
        real = _populations(rng, 1, spread=1.5)[0]
        overconfident.append(population_calibration(pops, real, kernel, estimator, rng))
    assert np.mean(overconfident) < 0.2
    far = population_calibration(_populations(rng, k, spread=0.3), rng.normal(size=(40, 6)) + 10.0, kernel, estimator, rng)
    assert far == pytest.approx(1 / (k + 1))
