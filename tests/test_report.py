"""The model against its baselines: compare()'s table, the verdict line, report.html, and
``perturbdiff evaluate --run DIR --baselines ... --report``."""

from __future__ import annotations

import base64
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from perturbdiff_core.cli import main
from perturbdiff_core.data import DataConfig, PerturbationData, Split, SplitConfig, prepare
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import InputError
from perturbdiff_core.evaluation import (
    ALL_CONDITIONS,
    COLUMNS,
    compare,
    definition_of,
    evaluate,
    summary_line,
    versus_best_baseline,
)
from perturbdiff_core.evaluation.predictors import as_predictor, predict_anndata, real_anndata
from perturbdiff_core.evaluation.report import REPORT_FILE, gene_labels, write_report
from perturbdiff_core.evaluation.verdict import verdict, worse_than
from perturbdiff_core.names import LOG_FILE
from perturbdiff_core.runs.config import CONFIG_FILE

KEYS = {"perturbation_key": "perturbation", "control_label": "control", "cell_type_key": "cell_type"}
BASELINES = ("control", "context_mean", "linear")


@pytest.fixture(scope="module")
def screen() -> tuple[PerturbationData, Split, ad.AnnData]:
    """A synthetic screen with a held-out cell type (four conditions), fitted on the rest."""
    adata = synthetic_screen(n_cells=900, n_genes=40, seed=3)
    split_config = SplitConfig(kind="holdout_cell_type", holdout=["t2"])
    data, split = prepare(DataConfig(cell_type_key="cell_type"), split_config, adata)
    return data, split, adata


@pytest.fixture(scope="module")
def predictions(screen) -> dict[str, ad.AnnData]:
    """random_train stands in for the model; three baselines."""
    data, split, _ = screen
    return {
        name if name != "random_train" else "model": predict_anndata(
            as_predictor(name).fit(data, split.train), data, split.test, progress=False
        )
        for name in ("random_train", *BASELINES)
    }


@pytest.fixture(scope="module")
def real(screen) -> ad.AnnData:
    data, split, _ = screen
    return real_anndata(data, split.test)


@pytest.fixture(scope="module")
def metrics(predictions, real) -> pd.DataFrame:
    return compare(predictions, real, **KEYS)


# --- compare ------------------------------------------------------------------------------------


def test_compare_is_every_methods_evaluate_in_one_long_table(metrics, predictions, real) -> None:
    assert tuple(metrics.columns) == COLUMNS
    assert list(metrics.method.unique()) == list(predictions)
    for method, pred in predictions.items():
        alone = evaluate(pred, real, **KEYS, method=method)
        mine = metrics[metrics.method == method].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone, rtol=0, atol=0)
    assert metrics.condition.nunique() == 5  # four held-out conditions and __all__


def test_compare_lists_a_shared_note_once_and_names_the_methods_of_the_others(monkeypatch, real) -> None:
    notes = {"a": ["shared", "only a"], "b": ["shared"], "c": ["shared", "only a"]}

    def fake_evaluate(pred, real, *, method, **params):
        table = pd.DataFrame([(ALL_CONDITIONS, "mse", method, 0.0)], columns=list(COLUMNS))
        table.attrs["notes"] = notes[method]
        return table

    monkeypatch.setattr(sys.modules["perturbdiff_core.evaluation.compare"], "evaluate", fake_evaluate)
    table = compare(dict.fromkeys(notes, real), real, **KEYS)
    assert table.attrs["notes"] == ["shared", "a, c: only a"]


def test_compare_refuses_no_or_badly_named_predictions(real) -> None:
    with pytest.raises(InputError, match="No predictions"):
        compare({}, real, **KEYS)
    with pytest.raises(InputError, match="Method names"):
        compare({ALL_CONDITIONS: real}, real, **KEYS)


# --- the verdict line ---------------------------------------------------------------------------


def _table(values: dict[str, dict[str, float]]) -> pd.DataFrame:
    rows = [(ALL_CONDITIONS, metric, method, v) for method, by in values.items() for metric, v in by.items()]
    rows.append(("P1", "mse", "model", 123.0))  # per-condition rows are ignored
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_verdict_uses_each_metrics_direction() -> None:
    table = _table(
        {
            "model": {"pearson_delta": 0.8, "mse": 0.1, "mmd2_rbf": 0.5, "discrimination_score_l1": 0.9,
                      "variability_mmd2_rbf_ratio": 0.9, "de_nsig_counts_pred": 500.0, "r2": np.nan},
            "b1": {"pearson_delta": 0.7, "mse": 0.3, "mmd2_rbf": 0.2, "discrimination_score_l1": 0.9,
                   "variability_mmd2_rbf_ratio": 1.3, "de_nsig_counts_pred": 5.0, "r2": 0.5},
            "b2": {"pearson_delta": 0.75, "mse": np.nan, "mmd2_rbf": 0.4, "discrimination_score_l1": 0.5,
                   "variability_mmd2_rbf_ratio": 1.5, "de_nsig_counts_pred": 50.0, "r2": 0.6},
        }
    )
    verdict = versus_best_baseline(table).set_index("metric")
    assert verdict.outcome.to_dict() == {
        "pearson_delta": "beats",  # higher is better; best baseline b2 (0.75)
        "mse": "beats",  # lower is better; b2 is NaN, so b1
        "mmd2_rbf": "loses",  # a kernel-named metric found through mmd2_{kernel}
        "discrimination_score_l1": "ties",
        "variability_mmd2_rbf_ratio": "beats",  # |0.9 - 1| < |1.3 - 1|: closest to 1, not highest
    }  # de_nsig_counts_pred has no direction; r2 is NaN for the model
    assert verdict.loc["pearson_delta", "baseline"] == "b2" and verdict.loc["mse", "baseline"] == "b1"
    assert verdict.loc["mmd2_rbf", "baseline_value"] == 0.2
    assert summary_line(table) == (
        "The model beats the best baseline on pearson_delta, mse, variability_mmd2_rbf_ratio; "
        "loses on mmd2_rbf (to b1); ties on discrimination_score_l1."
    )


def test_an_unbiased_mmd2_below_zero_is_better_than_one_above_it() -> None:
    # Two methods' unbiased MMD^2 on the same real cells differ by an unbiased estimate of their true difference
    # (the real cells' own term cancels), so the lower estimate is the better one even where it is below 0.
    mmd2 = definition_of("mmd2_energy")
    assert mmd2.gap(-0.011) < mmd2.gap(0.0012) and mmd2.gap(0.02) > mmd2.gap(0.0012)
    assert definition_of("pearson_delta").gap(0.8) == pytest.approx(0.2)  # higher is better
    ratio = definition_of("variability_mmd2_energy_ratio")
    assert ratio.gap(0.9) == pytest.approx(ratio.gap(1.1))  # a target: closest from either side
    table = _table({"model": {"mmd2_energy": -0.011}, "control": {"mmd2_energy": 0.7}, "random_train": {"mmd2_energy": 0.0012}})
    verdict = versus_best_baseline(table).set_index("metric")
    assert verdict.loc["mmd2_energy", "outcome"] == "beats" and verdict.loc["mmd2_energy", "baseline"] == "random_train"
    assert worse_than(_table({"model": {"mmd2_energy": -0.01}, "control": {"mmd2_energy": 0.001}})).empty
    assert list(worse_than(_table({"model": {"mmd2_energy": 0.002}, "control": {"mmd2_energy": -0.001}})).metric) == [
        "mmd2_energy"
    ]


def test_verdict_without_baselines_or_model() -> None:
    table = _table({"m": {"pearson_delta": 0.8}})
    assert summary_line(table, model="m") == "The model (m) has no baseline to compare with on any metric."
    with pytest.raises(InputError, match="No method 'model'"):
        summary_line(table)
    with pytest.raises(InputError, match="lacks column"):
        summary_line(table.drop(columns="method"))


def test_verdict_in_sentences_says_where_the_model_is_worse_than_no_change() -> None:
    table = _table(
        {
            "model": {"pearson_delta": 0.9, "mse": 0.02, "mae": 0.07, "pr_auc": 0.2, "de_nsig_counts_pred": 918.0,
                      "de_nsig_counts_real": 77.0},
            "control": {"pearson_delta": 0.0, "mse": 0.06, "mae": 0.05, "pr_auc": 0.3, "de_nsig_counts_pred": 0.0,
                        "de_nsig_counts_real": 77.0},
            "linear": {"pearson_delta": 0.8, "mse": 0.01, "mae": 0.04, "pr_auc": 0.1, "de_nsig_counts_pred": 382.0,
                       "de_nsig_counts_real": 77.0},
        }
    )
    worse = worse_than(table)
    assert list(worse.metric) == ["mae", "pr_auc"]  # not mse or pearson_delta, where the model beats control
    sentences = {s.kind: s.text for s in verdict(table)}
    assert sentences["wins"].startswith("The model beats the best baseline on 1 of 4 metrics: pearson_delta (0.9 against 0.8, linear)")
    assert sentences["losses"] == (
        "It loses on 3: mse (0.02 against 0.01, linear), mae (0.07 against 0.04, linear), pr_auc (0.2 against 0.3, control)."
    )
    assert sentences["worse_than_no_change"] == (
        "It is worse than predicting no change (the control baseline: the control cells as they are) on 2 metrics: "
        "mae (0.07 against 0.05), pr_auc (0.2 against 0.3)."
    )
    assert sentences["de_counts"] == "It calls 918 DE genes against 77 real."  # one condition (P1)
    better = _table({"model": {"mse": 0.01}, "control": {"mse": 0.06}})
    assert [s.kind for s in verdict(better)] == ["wins", "better_than_no_change"]


# --- report.html --------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Images, table rows (cells as ``[text, class]``) and text of a page; asserts tags nest."""

    VOID = {"meta", "img", "br", "hr", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.images: list[str] = []
        self.rows: list[list[list[str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.VOID:
            self.open.append(tag)
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes["src"] or "")
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append(["", attributes.get("class")])

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.open and self.open[-1] in ("td", "th"):
            self.rows[-1][-1][0] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    assert page.open == []
    return page


def test_report_is_one_valid_page_with_plots_table_and_verdict(tmp_path, metrics, predictions, real) -> None:
    history = pd.DataFrame({"step": [50, 100, 150], "loss": [1.0, 0.6, 0.5], "mse": [0.8, 0.5, 0.4],
                            "mmd": [0.2, 0.1, 0.1], "lr": [1e-4] * 3, "val_mmd": [np.nan, 0.3, np.nan]})
    path = write_report(
        tmp_path, metrics, predictions=predictions, real=real, **KEYS, loss_history=history, title="T <1>"
    )
    assert path == tmp_path / REPORT_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_FILE]  # one file, no temporary left
    page = _parse(path)
    text = "".join(page.text)
    assert "T <1>" in text and all(sentence.text in text for sentence in verdict(metrics))
    assert len(page.images) == 4  # bars, loss curve, delta scatter, PCA
    for src in page.images:
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"
    header = [name for name, _ in page.rows[0]]
    assert header == ["metric", "family", "direction", *predictions]
    table_rows = {row[0][0]: row for row in page.rows[1:] if len(row) == 3 + len(predictions) and row[0][0] != "metric"}
    aggregate = metrics[metrics.condition == ALL_CONDITIONS]
    wide = aggregate.pivot(index="metric", columns="method", values="value")
    same = {m for m, v in wide.iterrows() if v.isna().all() or np.allclose(v, v.iloc[0], rtol=1e-9, atol=1e-12)}
    assert same and set(table_rows) == set(aggregate.metric) - same  # e.g. the real DE genes, the same for all
    note = next(t for t in page.text if t.startswith("Left out of the table"))
    assert all(metric in note for metric in same)
    assert "zero_fraction_mae" in table_rows and "library_size_ks" in table_rows  # realism, in its own table
    values = aggregate[aggregate.metric == "pearson_delta"].set_index("method").value
    marked = [m for (_, cls), m in zip(table_rows["pearson_delta"][3:], predictions, strict=True) if cls == "best"]
    assert marked == [values.idxmax()]
    marked = [m for (_, cls), m in zip(table_rows["mse"][3:], predictions, strict=True) if cls == "best"]
    mse = aggregate[aggregate.metric == "mse"].set_index("method").value
    assert marked == list(mse.index[mse == mse.min()])


def test_report_without_history_and_its_errors_leave_no_file(tmp_path, metrics, predictions, real) -> None:
    path = write_report(tmp_path, metrics, predictions=predictions, real=real, **KEYS, max_conditions=2)
    page = _parse(path)
    assert len(page.images) == 3 and "No training history" in "".join(page.text)
    assert "the first 2 of 4" in "".join(page.text)
    before = path.read_bytes()
    with pytest.raises(InputError, match="'step' column"):
        no_step = pd.DataFrame({"loss": [1.0]})
        write_report(tmp_path, metrics, predictions=predictions, real=real, **KEYS, loss_history=no_step)
    with pytest.raises(InputError, match="No prediction named 'perturbdiff'"):
        write_report(tmp_path, metrics, predictions=predictions, real=real, **KEYS, model="perturbdiff")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [REPORT_FILE]


def test_report_header_top_de_genes_and_baselines_in_the_plots(tmp_path, metrics, predictions, real) -> None:
    facts = {"data": "/data/screen.h5ad", "held out": "t2", "kernel": "energy", "steps": "8 of 8", "commit": "abc1234"}
    page = _parse(write_report(tmp_path, metrics, predictions=predictions, real=real, **KEYS, run_info=facts))
    text = " ".join(page.text)
    assert all(f"{label} {value}" in " ".join(text.split()) for label, value in facts.items())
    # The DE section's counts are the evaluation's, per condition.
    per_condition = metrics[(metrics.method == "model") & (metrics.condition != ALL_CONDITIONS)]
    counts = per_condition.pivot(index="condition", columns="metric", values="value")
    for _condition, row in counts.iterrows():
        line = f"model calls {int(row.de_nsig_counts_pred)} DE genes against {int(row.de_nsig_counts_real)} real"
        assert line in text, line
    de_rows = [row for row in page.rows if len(row) == 6 and row[0][0] != "gene"]
    assert de_rows and all(row[5][0] in ("yes", "no") for row in de_rows)
    assert {row[0][0] for row in de_rows} <= set(real.var_names)
    # genes named by IDs with symbols in var are shown with their symbols
    labelled = real.copy()
    labelled.var["gene_symbol"] = [f"SYM{i}" for i in range(labelled.n_vars)]
    page = _parse(write_report(tmp_path, metrics, predictions=predictions, real=labelled, **KEYS))
    shown = [row[0][0] for row in page.rows if len(row) == 6 and row[0][0] != "gene"]
    symbol = dict(zip(labelled.var_names, labelled.var["gene_symbol"]))
    assert shown and all(label.endswith(")") and label.split(" (")[1][:-1] == symbol[label.split(" (")[0]] for label in shown)
    assert gene_labels(real.var) == {} and gene_labels(pd.DataFrame({"symbol": ["g0"]}, index=["g0"])) == {}


def test_the_delta_scatter_and_the_pca_show_every_method(predictions, real) -> None:
    from perturbdiff_core.evaluation import report_plots
    from perturbdiff_core.evaluation.paired import pair_anndata

    paired = {m: pair_anndata(p, real, **KEYS) for m, p in predictions.items()}
    conditions = paired["model"].conditions[:2]
    for fig in (report_plots.deltas(paired, conditions, "model"), report_plots.pca(paired, conditions, "model", 0)):
        labels = fig.axes[0].get_legend_handles_labels()[1]
        assert {label.split(" (r")[0] for label in labels} >= set(predictions)
        assert fig.get_size_inches()[0] >= 2 * report_plots.PANEL[0] - 1e-9  # two large panels per row
    colours = report_plots.styles(list(predictions), "model")
    assert len({c for c, _ in colours.values()}) == len(predictions) and len({m for _, m in colours.values()}) == len(predictions)


# --- the command --------------------------------------------------------------------------------


def _run_folder(tmp_path: Path, screen) -> Path:
    """A run folder as perturbdiff train writes it: config.yaml, split.json, data_state.json, train_log.csv."""
    _, _, adata = screen
    source = tmp_path / "screen.h5ad"
    adata.write_h5ad(source)
    run = tmp_path / "run"
    data_config = DataConfig(path=str(source), cell_type_key="cell_type")
    split_config = SplitConfig(kind="holdout_cell_type", holdout=["t2"])
    prepare(data_config, split_config, out_dir=run)
    (run / CONFIG_FILE).write_text(yaml.safe_dump({"data": data_config.to_dict(), "split": split_config.to_dict()}))
    log = pd.DataFrame({"step": [10, 20], "loss": [1.0, 0.5], "mse": [0.9, 0.4], "mmd": [0.1, 0.1]})
    log.to_csv(run / LOG_FILE, index=False)
    return run


def test_evaluate_command_compares_with_baselines_and_writes_the_report(
    tmp_path, screen, predictions, real, capsys
) -> None:
    run = _run_folder(tmp_path, screen)
    assert json.loads((run / "split.json").read_text())["test"] == screen[1].test
    predictions["model"].write_h5ad(run / "pred.h5ad")
    out = run / "eval" / "metrics.csv"
    args = ["evaluate", str(run / "pred.h5ad"), "--run", str(run), "--report", "--out", str(out)]  # REAL from the run
    assert main([*args, "--baselines", *BASELINES]) == 0
    written = pd.read_csv(out)
    assert list(written.method.unique()) == ["model", *BASELINES]
    pd.testing.assert_frame_equal(written, compare(predictions, real, **KEYS), rtol=1e-12, check_dtype=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.csv", REPORT_FILE]
    page = _parse(out.parent / REPORT_FILE)
    assert len(page.images) == 4  # the run's train_log.csv is drawn
    header = " ".join(" ".join(page.text).split())  # pred.h5ad is not the run's own predictions.h5ad
    assert f"predictions {run / 'pred.h5ad'} (scored as model)" in header and "its model made none of these" in header
    out = " ".join(capsys.readouterr().out.split())
    assert all(" ".join(sentence.text.split()) in out for sentence in verdict(written))


def test_evaluate_command_needs_a_run_for_baselines_or_real_cells(tmp_path, predictions, real, capsys) -> None:
    predictions["model"].write_h5ad(tmp_path / "pred.h5ad")
    real.write_h5ad(tmp_path / "real.h5ad")
    status = main(["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "real.h5ad"), "--baselines", "control"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "--baselines needs --run" in err
    status = main(["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "real.h5ad"), "--run", str(tmp_path)])
    assert status == 2 and "not a run folder" in capsys.readouterr().err
    status = main(["evaluate", str(tmp_path / "pred.h5ad")])
    assert status == 2 and "Give REAL.h5ad" in capsys.readouterr().err
