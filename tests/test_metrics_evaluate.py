"""``evaluate`` end to end: table layout, known answers, cell types, variability, bad input, the
``perturbdiff evaluate`` command, and agreement with cell-eval on the same predictions."""

from __future__ import annotations

import logging
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbdiff_core.cli import main
from perturbdiff_core.data import DataConfig
from perturbdiff_core.errors import DataError, PerturbDiffError
from perturbdiff_core.evaluation import ALL_CONDITIONS, COLUMNS, DEFINITIONS, evaluate, metrics, wilcoxon_de
from perturbdiff_core.evaluation.predictors import POPULATION_KEY, condition_keys

#: Genes shifted by each synthetic perturbation: none, few, many (over the top-50 cut-off).
SHIFTED = (0, 6, 25, 70, 130, 40, 12)


def synthetic_pair(
    seed: int = 0, genes: int = 200, cells: int = 60, shifted=SHIFTED, cell_types=("A",)
) -> tuple[ad.AnnData, ad.AnnData]:
    """A (prediction, real) pair of log1p AnnData with Poisson noise and sparse low genes.

    The real condition shifts ``shifted[i]`` genes' log rates; the prediction recovers a random
    fraction of each shift plus noise, and draws its own control cells. Gene 3 is named like
    perturbation P2 (its target), and 30% of genes are rarely expressed (zeros, infinite fold changes).
    """
    rng = np.random.default_rng(seed)
    real_blocks, pred_blocks, obs = [], [], []

    def draw(log_rate: np.ndarray) -> np.ndarray:
        size = rng.uniform(0.6, 1.4, size=(cells, 1))
        return np.log1p(rng.poisson(np.exp(log_rate) * size, size=(cells, genes)) / size)

    for cell_type in cell_types:
        base = np.log(np.where(rng.random(genes) < 0.3, rng.gamma(0.3, 0.3, genes), rng.gamma(1.5, 2.0, genes)))
        real_blocks.append(draw(base))
        pred_blocks.append(draw(base))
        obs += [("control", cell_type)] * cells
        for i, k in enumerate(shifted):
            shift = np.zeros(genes)
            shift[rng.choice(genes, k, replace=False)] = rng.normal(0, 1.0, k)
            real_blocks.append(draw(base + shift))
            pred_blocks.append(draw(base + rng.uniform(0.2, 0.9) * shift + rng.normal(0, 0.35, genes)))
            obs += [(f"P{i}", cell_type)] * cells
    frame = pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"cell{i}" for i in range(len(obs))])
    var = pd.DataFrame(index=[f"g{i}" if i != 3 else "P2" for i in range(genes)])
    real = ad.AnnData(sp.csr_matrix(np.vstack(real_blocks)), obs=frame, var=var)
    pred = ad.AnnData(sp.csr_matrix(np.vstack(pred_blocks)), obs=frame.copy(), var=var.copy())
    return pred, real


@pytest.fixture(scope="module")
def pair() -> tuple[ad.AnnData, ad.AnnData]:
    return synthetic_pair(seed=0, genes=120, cells=40, shifted=(0, 10, 60, 25))


@pytest.fixture(scope="module")
def table(pair: tuple[ad.AnnData, ad.AnnData]) -> pd.DataFrame:
    return evaluate(*pair, method="toy")


def _wide(table: pd.DataFrame) -> pd.DataFrame:
    return table.pivot(index="condition", columns="metric", values="value")


def test_table_is_long_format_with_a_nan_skipping_mean(table: pd.DataFrame) -> None:
    assert tuple(table.columns) == COLUMNS
    assert set(table.method) == {"toy"}
    assert set(table.condition) == {"P0", "P1", "P2", "P3", ALL_CONDITIONS}
    assert not table.duplicated(["condition", "metric"]).any()
    wide = _wide(table)
    per_condition = wide.drop(index=ALL_CONDITIONS)
    for metric in ("pearson_edistance", "de_spearman_sig"):  # defined across conditions only
        assert per_condition[metric].isna().all() and np.isfinite(wide.loc[ALL_CONDITIONS, metric])
    means = per_condition.drop(columns=["pearson_edistance", "de_spearman_sig"]).mean(skipna=True)
    np.testing.assert_allclose(wide.loc[ALL_CONDITIONS, means.index], means.to_numpy(), rtol=1e-12)
    assert per_condition["de_nsig_counts_real"]["P0"] == 0 and math.isnan(per_condition["de_direction_match"]["P0"])
    assert any(note.startswith("no real DE gene") and note.endswith(" [P0]") for note in table.attrs["notes"])
    assert 0 < wide.loc[ALL_CONDITIONS, "pearson_delta"] < 1
    named = {m for m in table.metric} - {"mmd2_energy"}
    assert named <= set(DEFINITIONS)  # every reported metric is documented


def test_a_perfect_prediction_scores_best(pair: tuple[ad.AnnData, ad.AnnData]) -> None:
    real = pair[1]
    wide = _wide(evaluate(real.copy(), real, estimator="biased"))
    row = wide.loc[ALL_CONDITIONS]
    for metric in ("pearson_delta", "r2", "spearman_lfc", "pearson_edistance", "de_spearman_sig"):
        assert row[metric] == pytest.approx(1.0, abs=1e-12), metric
    for metric in ("mse", "mae", "mse_delta", "mae_delta"):
        assert row[metric] == pytest.approx(0.0, abs=1e-12), metric
    # GEMM-based distances: sqrt of rounding error on the zero distances between twin cells
    assert row["mmd2_energy"] == pytest.approx(0.0, abs=1e-7)
    for metric in ("discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine"):
        assert row[metric] == 1.0
    with_de = wide.drop(index=ALL_CONDITIONS).query("de_nsig_counts_real > 0")
    assert len(with_de) >= 2
    assert (with_de[["overlap_at_N", "precision_at_N", "de_sig_genes_recall", "de_direction_match"]] == 1.0).all().all()


def test_cell_types_are_separate_contexts() -> None:
    pred, real = synthetic_pair(seed=1, genes=80, cells=30, shifted=(5, 30, 15), cell_types=("A", "B"))
    joint = _wide(evaluate(pred, real, cell_type_key="cell_type")).drop(index=ALL_CONDITIONS)
    assert set(joint.index) == {f"P{i}|{t}" for t in "AB" for i in range(3)}
    for cell_type in "AB":
        keep_p, keep_r = (pred.obs.cell_type == cell_type).to_numpy(), (real.obs.cell_type == cell_type).to_numpy()
        alone = _wide(evaluate(pred[keep_p], real[keep_r], cell_type_key="cell_type")).drop(index=ALL_CONDITIONS)
        per_condition = alone.drop(columns=["pearson_edistance", "de_spearman_sig"])
        pd.testing.assert_frame_equal(joint.loc[per_condition.index, per_condition.columns], per_condition, rtol=1e-12)


def _as_batches_of_one_cell_type(adata: ad.AnnData) -> ad.AnnData:
    """``adata`` with its cell types read as batches of one cell type, and its conditions' cells at two doses."""
    out = adata.copy()
    out.obs = out.obs.rename(columns={"cell_type": "batch"}).assign(cell_type="k562")
    perturbed = (out.obs.perturbation != "control").to_numpy()
    out.obs["dose"] = np.where(perturbed, np.where(np.arange(out.n_obs) % 2 == 0, 0.1, 1.0), np.nan)
    return out


def test_batches_and_doses_are_conditions_of_their_own() -> None:
    """A held-out batch (patient, replicate) is compared with its own control cells and each dose is a condition,
    as the data's own conditions are: the same numbers as the cells relabelled by hand."""
    pred, real = (_as_batches_of_one_cell_type(a) for a in synthetic_pair(seed=2, genes=60, cells=30, shifted=(5, 20),
                                                                        cell_types=("b1", "b2")))
    keys = {"cell_type_key": "cell_type", "context_keys": ["batch"], "dose_key": "dose"}
    got = _wide(evaluate(pred, real, **keys)).drop(index=ALL_CONDITIONS)
    assert set(got.index) == {f"P{i}@{d}|k562|{b}" for i in range(2) for d in ("0.1", "1") for b in ("b1", "b2")}

    def by_hand(adata: ad.AnnData) -> ad.AnnData:
        out = adata.copy()
        dosed = out.obs.dose.notna().to_numpy()
        labels = out.obs.perturbation.astype(str).to_numpy().astype(object)
        labels[dosed] = [f"{p}@{d:g}" for p, d in zip(labels[dosed], out.obs.dose[dosed], strict=True)]
        out.obs = pd.DataFrame({"perturbation": labels, "context": ("k562|" + out.obs.batch.astype(str)).to_numpy()},
                               index=out.obs_names)
        return out

    expected = _wide(evaluate(by_hand(pred), by_hand(real), cell_type_key="context")).drop(index=ALL_CONDITIONS)
    pd.testing.assert_frame_equal(got.loc[expected.index, expected.columns], expected, rtol=1e-12)
    pooled = _wide(evaluate(pred, real, cell_type_key="cell_type")).drop(index=ALL_CONDITIONS)
    assert set(pooled.index) == {"P0|k562", "P1|k562"}  # without the keys: both batches and doses in one
    with pytest.raises(DataError, match="both the replicate key and a context key"):
        evaluate(pred, real, **keys, replicate_key="batch")


def test_a_condition_of_one_cell_has_no_mmd_and_says_why() -> None:
    pred, real = synthetic_pair(seed=1, genes=40, cells=10, shifted=(3, 5))
    keep = ~((real.obs.perturbation == "P1").to_numpy() & (np.arange(real.n_obs) % 10 != 0))  # P1: one real cell
    table = evaluate(pred[keep], real[keep])
    one = table[table.condition == "P1"].set_index("metric").value
    assert math.isnan(one["mmd2_energy"]) and math.isfinite(one["pearson_delta"]) and math.isfinite(one["mse"])
    assert "a single predicted or real cell, so mmd2_energy is NaN [P1]" in table.attrs["notes"]
    assert "fewer than 10 real cells: noisy metrics [P1]" in table.attrs["notes"]  # P0 has 10: none
    assert math.isfinite(table[(table.condition == ALL_CONDITIONS) & (table.metric == "mmd2_energy")].value.iloc[0])
    draws = []  # ten sampled populations of the prediction (its control cells once), P1 one cell in each
    for k in range(10):
        draw = pred[keep & ((pred.obs.perturbation != "control").to_numpy() | (k == 0))].copy()
        draws.append(draw)
        draws[-1].obs[POPULATION_KEY] = str(k)
    sampled = ad.concat(draws, index_unique="-")
    table = evaluate(sampled, real[keep])
    calibration = table[table.metric == "calibration_pvalue"].set_index("condition").value
    assert math.isnan(calibration["P1"]) and 0 < calibration["P0"] <= 1
    assert "a single predicted or real cell, so calibration_pvalue and population_coverage are NaN [P1]" in table.attrs["notes"]


def test_a_prediction_whose_control_cells_are_not_the_real_ones_gets_a_note() -> None:
    _, real = synthetic_pair(seed=4, genes=30, cells=12, shifted=(3,), cell_types=("A", "B"))
    same = real[np.random.default_rng(0).permutation(real.n_obs)].copy()  # the real control cells, in another order
    assert not any("control cells are not the real ones" in n for n in evaluate(same, real, cell_type_key="cell_type").attrs["notes"])
    other = real.copy()
    in_b = ((other.obs.perturbation == "control") & (other.obs.cell_type == "B")).to_numpy()
    dense_x = other.X.toarray()
    dense_x[in_b] = dense_x[in_b][::-1] + 0.5  # other values in B's controls
    other.X = sp.csr_matrix(dense_x)
    notes = evaluate(other, real, cell_type_key="cell_type").attrs["notes"]
    assert any(n.startswith("the prediction's control cells are not the real ones") and n.endswith("[B: 12 against 12]")
               and "fewer than" not in n for n in notes)
    only_a = real[(real.obs.cell_type == "A").to_numpy()].copy()  # one cell type predicted, evaluated without its key
    notes = evaluate(only_a, real).attrs["notes"]
    assert any("fewer than the real ones" in n and "--cell-type-key" in n and n.endswith("[all cells: 12 against 24]")
               for n in notes), notes


def test_condition_keys_are_the_data_configs_context_and_dose() -> None:
    config = DataConfig(cell_type_key="cell_type", batch_key="donor", covariate_keys=["plate"], dose_key="dose")
    assert condition_keys(config) == {
        "perturbation_key": "perturbation", "control_label": "control", "cell_type_key": "cell_type",
        "context_keys": ["donor", "plate"], "dose_key": "dose",
    }
    assert condition_keys(config, replicate_key="donor")["context_keys"] == ["plate"]  # donors as populations


def test_genes_in_another_order_are_aligned(pair: tuple[ad.AnnData, ad.AnnData], table: pd.DataFrame) -> None:
    pred, real = pair
    shuffled = pred[:, np.random.default_rng(0).permutation(pred.n_vars)].copy()
    again = evaluate(shuffled, real, method="toy")
    pd.testing.assert_frame_equal(again, table, rtol=1e-12)


def _replicated(seed: int, pred_batch_scale: float) -> tuple[ad.AnnData, ad.AnnData]:
    """Real condition P0 in 3 batches with batch effects, P1 in one; predicted draws scaled by ``pred_batch_scale``."""
    rng = np.random.default_rng(seed)
    genes, n = 30, 40
    base = rng.normal(1.5, 0.5, genes)

    def cells(mean: np.ndarray) -> np.ndarray:
        return np.abs(rng.normal(mean, 0.3, (n, genes)))

    def side(scale: float) -> ad.AnnData:
        blocks, obs = [cells(base)], [("control", "b0")]
        for b in range(3):
            blocks.append(cells(base + 0.5 + scale * rng.normal(0, 0.4, genes)))
            obs.append(("P0", f"b{b}"))
        blocks.append(cells(base - 0.5))
        obs.append(("P1", "b0"))
        frame = pd.DataFrame([o for o in obs for _ in range(n)], columns=["perturbation", "batch"])
        frame.index = frame.index.astype(str)
        return ad.AnnData(np.vstack(blocks), obs=frame, var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))

    return side(pred_batch_scale), side(1.0)


def test_population_variability_flags_collapse_and_single_replicates() -> None:
    results = {}
    for scale in (0.0, 1.0):
        pred, real = _replicated(seed=2, pred_batch_scale=scale)
        table = evaluate(pred, real, replicate_key="batch")
        results[scale] = _wide(table)
        assert table.attrs["notes"] == [  # the prediction draws control cells of its own
            "the prediction's control cells are not the real ones, and its changes and DE calls are measured against "
            "its own: check they are the real control cells (contexts: predicted against real control cells) "
            "[all cells: 40 against 40]",
            "variability_mmd2_energy: NaN, only 1 real population(s) with at least 2 cells, 2 needed [P1]",
        ]
    collapsed, faithful = results[0.0].loc["P0"], results[1.0].loc["P0"]
    assert collapsed["variability_mmd2_energy_real"] == pytest.approx(faithful["variability_mmd2_energy_real"])
    assert collapsed["variability_mmd2_energy_ratio"] < 0.2  # same population every draw
    assert 0.3 < faithful["variability_mmd2_energy_ratio"] < 3.0  # reality's scatter
    assert math.isnan(results[1.0].loc["P1", "variability_mmd2_energy_ratio"])


# --- bad input: one clear error before any metric is computed ----------------------------------


def _drop(adata: ad.AnnData, label: str) -> ad.AnnData:
    return adata[(adata.obs.perturbation != label).to_numpy()].copy()


def _rename_first_gene(adata: ad.AnnData, name: str) -> ad.AnnData:
    out = adata.copy()
    out.var_names = [name] + list(out.var_names[1:])
    return out


def _scaled(adata: ad.AnnData, factor: float, shift: float = 0.0) -> ad.AnnData:
    out = adata.copy()
    out.X = adata.X.toarray() * factor + shift
    return out


def _no_control_in_b(adata: ad.AnnData) -> ad.AnnData:
    return adata[~((adata.obs.perturbation == "control") & (adata.obs.cell_type == "B")).to_numpy()].copy()


BAD_INPUTS = {
    "different genes": (lambda p, r: (_rename_first_gene(p, "other"), r), {}, "different genes"),
    "duplicated genes": (lambda p, r: (_rename_first_gene(p, "g1"), r), {}, "not unique"),
    "condition missing from the prediction": (lambda p, r: (_drop(p, "P1"), r), {}, "missing from the prediction: P1"),
    "condition missing from the real data": (lambda p, r: (p, _drop(r, "P2")), {}, "missing from the real data: P2"),
    "unknown control label": (lambda p, r: (p, r), {"control_label": "ctrl"}, "Control label 'ctrl' not found"),
    "no control cells in the prediction": (
        lambda p, r: (_drop(p, "control"), r), {}, r"Control label 'control' not found in obs\['perturbation'\] in the prediction"
    ),
    "no control cells in one cell type": (
        lambda p, r: (_no_control_in_b(p), r), {"cell_type_key": "cell_type"}, "no 'control' cells in context 'B'"
    ),
    "missing perturbation key": (lambda p, r: (p, r), {"perturbation_key": "target"}, "no column 'target'"),
    "negative predictions": (lambda p, r: (_scaled(p, 1.0, -0.5), r), {}, "negative values"),
    "raw counts": (lambda p, r: (p, _scaled(r, 0.0, 3.0)), {}, "raw counts"),
    "values too large for log1p": (lambda p, r: (p, _scaled(r, 10.0)), {}, "does not look like log1p"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_before_any_metric(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def computed(*args: object, **kwargs: object) -> None:
        raise AssertionError("a metric was computed before the input was checked")

    monkeypatch.setattr(metrics, "pseudobulk_metrics", computed)
    monkeypatch.setattr(metrics, "ControlRanks", computed)
    spoil, options, message = BAD_INPUTS[case]
    pred, real = synthetic_pair(seed=3, genes=20, cells=8, shifted=(3, 3, 3), cell_types=("A", "B"))
    with pytest.raises(DataError, match=message):
        evaluate(*spoil(pred, real), **options)


def test_unknown_kernel_is_a_user_error(pair: tuple[ad.AnnData, ad.AnnData]) -> None:
    with pytest.raises(PerturbDiffError, match="nosuchkernel"):
        evaluate(*pair, kernel="nosuchkernel")


# --- the command ------------------------------------------------------------------------------


def test_command_writes_metrics_csv(pair: tuple[ad.AnnData, ad.AnnData], tmp_path, capsys) -> None:
    pred, real = pair
    pred.write_h5ad(tmp_path / "pred.h5ad")
    real.write_h5ad(tmp_path / "real.h5ad")
    out = tmp_path / "results" / "metrics.csv"
    status = main(["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "real.h5ad"), "--method", "toy", "--out", str(out)])
    assert status == 0
    written = pd.read_csv(out)
    assert tuple(written.columns) == COLUMNS
    pd.testing.assert_frame_equal(written, evaluate(pred, real, method="toy"), rtol=1e-12, check_dtype=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.csv"]  # no temporary left over
    assert "pearson_delta" in capsys.readouterr().out


def test_command_reports_bad_input_in_one_line(pair: tuple[ad.AnnData, ad.AnnData], tmp_path, capsys) -> None:
    pred, real = pair
    pred.write_h5ad(tmp_path / "pred.h5ad")
    _drop(real, "P1").write_h5ad(tmp_path / "real.h5ad")  # a predicted condition the real cells lack
    out = tmp_path / "metrics.csv"
    status = main(["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "real.h5ad"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1 and err.startswith("perturbdiff: error:") and "P1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad", "real.h5ad"]  # no metrics.csv, no temporary


def test_command_cuts_a_whole_screen_to_the_predicted_conditions_and_genes(pair: tuple[ad.AnnData, ad.AnnData], tmp_path) -> None:
    pred, real = pair
    fewer = _drop(pred, "P1")[:, pred.var_names[::-1][:50]].copy()  # a condition and most genes left out, reordered
    fewer.write_h5ad(tmp_path / "pred.h5ad")
    real.write_h5ad(tmp_path / "real.h5ad")
    assert main(["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "real.h5ad"), "--out", str(tmp_path / "m.csv")]) == 0
    got = _wide(pd.read_csv(tmp_path / "m.csv"))
    expected = _wide(evaluate(fewer, _drop(real, "P1")[:, fewer.var_names].copy()))  # cut by hand
    pd.testing.assert_frame_equal(got.loc[expected.index, expected.columns], expected, rtol=1e-9, check_names=False)
    pred, real = _replicated(seed=2, pred_batch_scale=1.0)  # the replicate key survives the cut
    pred.write_h5ad(tmp_path / "pred.h5ad")
    real.write_h5ad(tmp_path / "real.h5ad")
    argv = ["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "real.h5ad"), "--replicate-key", "batch"]
    assert main([*argv, "--out", str(tmp_path / "r.csv")]) == 0
    assert np.isfinite(_wide(pd.read_csv(tmp_path / "r.csv")).loc["P0", "variability_mmd2_energy_ratio"])


# --- agreement with cell-eval --------------------------------------------------------------------

#: Metrics whose definition is cell-eval's: they must agree to 1e-6 (DEFINITIONS says "same").
SAME_AS_CELL_EVAL = sorted(name for name, d in DEFINITIONS.items() if d.cell_eval.startswith("same"))
#: Defined across conditions: cell-eval repeats the value on every row, we report it once.
ACROSS_CONDITIONS = ("pearson_edistance", "de_spearman_sig")


@pytest.mark.slow
def test_agrees_with_cell_eval(tmp_path) -> None:
    cell_eval = pytest.importorskip("cell_eval", reason="cell-eval (optional extra 'cell-eval') is not installed")
    pred, real = synthetic_pair(seed=0)
    logging.getLogger("cell_eval").setLevel(logging.ERROR)
    evaluator = cell_eval.MetricsEvaluator(
        pred.copy(), real.copy(), control_pert="control", pert_col="perturbation", num_threads=1, outdir=str(tmp_path)
    )
    theirs, _ = evaluator.compute(profile="full", skip_metrics=["clustering_agreement"], write_csv=False)
    theirs = theirs.to_pandas().set_index("perturbation")
    ours = _wide(evaluate(pred, real))
    assert len(SAME_AS_CELL_EVAL) == 27
    for metric in SAME_AS_CELL_EVAL:
        if metric in ACROSS_CONDITIONS:
            expected = theirs[metric].to_numpy(dtype=float)
            np.testing.assert_allclose(expected, ours.loc[ALL_CONDITIONS, metric], atol=1e-6, err_msg=metric)
        else:
            expected = theirs[metric].reindex(ours.index.drop(ALL_CONDITIONS)).to_numpy(dtype=float)
            got = ours.loc[ours.index != ALL_CONDITIONS, metric].to_numpy()
            np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, equal_nan=True, err_msg=metric)
    # The data exercise what could differ: top-k cut-offs, no real DE genes, imperfect ranks,
    # a target gene left out, infinite fold changes among DE genes, different control cells.
    assert ours["de_nsig_counts_real"].max() > 50 and ours["de_nsig_counts_real"].min() == 0
    assert (ours["overlap_at_50"] != ours["overlap_at_N"]).any()
    assert (ours["discrimination_score_l1"] < 1).any() and (ours["discrimination_score_cosine"] < 1).any()
    assert "P2" in real.var_names
    real_x = real.X.toarray()
    control = real_x[(real.obs.perturbation == "control").to_numpy()]
    lfc_inf = [
        np.isinf(de.log2_fold_change[de.significant()]).any()
        for de in (wilcoxon_de(real_x[(real.obs.perturbation == p).to_numpy()], control) for p in ["P3", "P4"])
    ]
    assert any(lfc_inf)
    assert (ours["mse"] != ours["mse_delta"]).all()
