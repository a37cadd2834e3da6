"""``perturbdiff suite``: parsing and override order, checks before any run, resuming, the summary against the best
baseline (on a synthetic suite.csv), and one tiny end-to-end suite."""

from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from test_ablation import BASE
from test_cli import assert_one_line_error

from perturbdiff_core.ablation import runner
from perturbdiff_core.cli import main
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.runs.checkpoint import checkpoint_path
from perturbdiff_core.runs.config import RunConfig, write_config
from perturbdiff_core.suite import (
    LONG_COLUMNS,
    SKIPPED,
    SUMMARY_COLUMNS,
    check_splits,
    control_line,
    every_metric,
    headline,
    read_suite,
    report,
    task_means,
    versus_baselines,
)

REPO = Path(__file__).resolve().parents[1]

#: Two tasks on the tiny synthetic screen (A+B held out; cell type t2 held out), two seeds.
SUITE = {
    "seeds": [0, 1],
    "set": {"train.steps": 3},
    "metrics": ["pearson_delta", "mse_delta", "mmd2_energy"],
    "tasks": [
        {"name": "combo", "config": "base.yaml"},
        {"name": "type_t2", "config": "base.yaml",
         "set": {"split.kind": "holdout_cell_type", "split.holdout": ["t2"], "train.context_drop_prob": 0.2}},
    ],
}

RUNS = ["combo/seed=0", "combo/seed=1", "type_t2/seed=0", "type_t2/seed=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the synthetic screen and ``base.yaml`` (the ablation tests' tiny run) pointing to it."""
    path = tmp_path_factory.mktemp("suite")
    synthetic_screen(600, 40, seed=3).write_h5ad(path / "screen.h5ad")
    base = {**BASE, "data": {**BASE["data"], "path": str(path / "screen.h5ad")}}
    (path / "base.yaml").write_text(yaml.safe_dump(base))
    return path


def write_suite(folder: Path, suite: dict[str, Any], name: str = "suite.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _suite(**changes: Any) -> dict[str, Any]:
    """SUITE with top-level keys replaced; ``task0``/``task1`` replace a task."""
    suite = {**SUITE, "tasks": list(SUITE["tasks"])}
    for key, value in changes.items():
        if key in ("task0", "task1"):
            suite["tasks"][int(key[4:])] = value
        else:
            suite[key] = value
    return suite


class FakeRuns:
    """Replaces ``ablation.runner.run_cell`` (what the suite calls): records each run as ``task/seed=s``, writes its
    ``config.yaml`` and a small ``metrics.csv`` whose values depend on task and seed; Ctrl-C at ``stop_at``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_at: str | None = None, run: bool = True) -> None:
        self.names: list[str] = []
        self.stop_at, self.run = stop_at, run
        monkeypatch.setattr(runner, "run_cell", self)

    def stop(self, name: str) -> KeyboardInterrupt:
        """What Ctrl-C at ``stop_at`` raises."""
        return KeyboardInterrupt()

    def __call__(self, config: RunConfig, folder: Path, *, progress: bool = True) -> pd.DataFrame:
        name = f"{folder.parent.name}/{folder.name}"
        self.names.append(name)
        if name == self.stop_at:
            raise self.stop(name)
        if not self.run:
            raise AssertionError(f"run {name} ran although the suite is invalid")
        write_config(config, folder)
        shift = 0.1 * config.seed + (0.5 if folder.parent.name == "type_t2" else 0.0)
        rows = [
            (condition, metric, method, value + shift * (method == "model"))
            for condition in ("A+B", "__all__")
            for metric, values in {"pearson_delta": (0.8, 0.1, 0.7), "mse_delta": (0.02, 0.06, 0.03),
                                   "mmd2_energy": (1.0, 6.0, 2.0)}.items()
            for method, value in zip(("model", "control", "context_mean"), values)
        ]
        metrics = pd.DataFrame(rows, columns=["condition", "metric", "method", "value"])
        metrics.to_csv(folder / "metrics.csv", index=False)
        return metrics


# ---------------------------------------------------------------------------------------------- parsing


def test_overrides_apply_in_order_config_set_cli_task_seed(folder: Path) -> None:
    suite = _suite(
        set={"train.steps": 5, "train.lr": 0.01, "model.mmd_weight": 3.0},
        task1={"name": "type_t2", "config": "base.yaml",
               "set": {"split.kind": "holdout_cell_type", "split.holdout": ["t2"], "model.mmd_weight": 2.0}},
    )
    spec = read_suite(write_suite(folder, suite, "order.yaml"), ["train.lr=0.02", "model.mmd_weight=0.5"])
    runs = spec.runs()
    assert [run.name for run in runs] == RUNS
    combo, t2 = runs[1].config, runs[3].config
    assert combo.train.steps == 5 and combo.train.batch_size == 3  # suite set: over the config; the rest kept
    assert combo.train.lr == 0.02  # --set over the suite's set:
    assert combo.model.mmd_weight == 0.5 and t2.model.mmd_weight == 2.0  # the task's set: over --set
    assert t2.split.kind == "holdout_cell_type" and t2.split.holdout == ["t2"]
    assert combo.split.holdout == ["A+B"]
    assert (combo.seed, t2.seed) == (1, 1) and (combo.name, t2.name) == ("combo__seed=1", "type_t2__seed=1")
    assert runs[0].config.seed == 0 and runs[0].config.name == "combo__seed=0"


def test_seeds_from_the_file_the_default_and_the_option(folder: Path) -> None:
    path = write_suite(folder, SUITE, "seeds.yaml")
    assert read_suite(path).seeds == (0, 1)
    assert read_suite(path, seeds=3).seeds == (0, 1, 2)
    assert [run.name for run in read_suite(path, seeds=1).runs()] == ["combo/seed=0", "type_t2/seed=0"]
    unseeded = {key: value for key, value in SUITE.items() if key != "seeds"}
    assert read_suite(write_suite(folder, unseeded, "unseeded.yaml")).seeds == (0,)
    with pytest.raises(ConfigError, match="--seeds must be at least 1"):
        read_suite(path, seeds=0)


@pytest.mark.parametrize(
    ("suite", "argv", "fragments"),
    [
        (_suite(seed=[0]), [], ["unknown key(s) seed", "seeds, set, metrics, tasks"]),
        (_suite(task0={"name": "combo", "configs": "base.yaml"}), [], ["task combo", "configs", "name, config, set"]),
        (_suite(task0={"name": "a/b", "config": "base.yaml"}), [], ["'a/b'", "folder"]),
        (_suite(task0={"name": "..", "config": "base.yaml"}), [], ["'..'", "folder"]),
        (_suite(task0={"name": "type_t2", "config": "base.yaml"}), [], ["two tasks are named type_t2"]),
        (_suite(task0={"name": "combo"}), [], ["task combo needs config:"]),
        (_suite(task0={"name": "combo", "config": "absent.yaml"}), [], ["task combo", "No such config file", "absent"]),
        (_suite(task0={"name": "combo", "config": "base.yaml", "set": {"seed": 3}}), [],
         ["task combo", "seed", "seeds:"]),
        (SUITE, ["--set", "seed=3"], ["--set sets seed"]),
        (_suite(set={"name": "x"}), [], ["set: sets name"]),
        (_suite(task0={"name": "combo", "config": "base.yaml", "set": {"train.stpes": 3}}), [],
         ["task combo", "train.stpes", "train.steps"]),
        (_suite(task0={"name": "combo", "config": "base.yaml", "set": {"model.kernel": "rbff"}}), [],
         ["task combo", "rbff", "matern32"]),
        (_suite(task0={"name": "combo", "config": "base.yaml", "set": {"data.path": "absent.h5ad"}}), [],
         ["task combo", "No such data file"]),
        (_suite(task1={"name": "type_t2", "config": "base.yaml",
                       "set": {"split.kind": "holdout_cell_type", "split.holdout": ["t3"]}}), [],
         ["task type_t2", "'t3'", "t1, t2"]),
        (_suite(task1={"name": "again", "config": "base.yaml", "set": {"train.lr": 0.003}}), [],
         ["tasks combo and again have the same configuration"]),
        (_suite(seeds=[0, 0]), [], ["seeds:", "distinct"]),
        (_suite(seeds=[]), [], ["seeds:", "non-empty"]),
        (_suite(tasks=[]), [], ["tasks:", "non-empty"]),
        (_suite(metrics="mse_delta"), [], ["metrics:", "list"]),
    ],
)
def test_bad_suites_fail_in_one_line_before_any_run(
    suite: dict[str, Any], argv: list[str], fragments: list[str], folder: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_suite(folder, suite, name=f"bad_{tmp_path.name}.yaml")
    fake = FakeRuns(monkeypatch, run=False)
    code = main(["suite", str(path), "--out", str(tmp_path / "out"), *argv])
    assert_one_line_error(code, capsys.readouterr().err, *fragments)
    assert fake.names == [] and not (tmp_path / "out").exists()


def test_an_undefined_headline_metric_is_a_note_not_an_error(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_suite(folder, _suite(metrics=["pearson_delta", "zero_fraction_mae_x"]), "note.yaml")
    assert read_suite(path).metrics == ("pearson_delta", "zero_fraction_mae_x")
    assert main(["suite", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "perturbdiff: note:" in err and "zero_fraction_mae_x" in err and "pearson_delta have" not in err


# ---------------------------------------------------------------------------------------- dry run, resuming


def _fake_finished(folder: Path, config: RunConfig) -> None:
    """A run folder as a finished run leaves it (its config and a metrics.csv)."""
    write_config(config, folder)
    (folder / "metrics.csv").write_text("condition,metric,method,value\n")


def test_dry_run_lists_every_run_with_its_status_and_runs_nothing(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = write_suite(folder, SUITE, "dry.yaml"), tmp_path / "out"
    runs = read_suite(path).runs()
    _fake_finished(out / "tasks" / "combo" / "seed=0", runs[0].config)
    write_config(runs[1].config, out / "tasks" / "combo" / "seed=1")
    checkpoint_path(out / "tasks" / "combo" / "seed=1").parent.mkdir(parents=True)
    checkpoint_path(out / "tasks" / "combo" / "seed=1").write_bytes(b"")
    fake = FakeRuns(monkeypatch, run=False)
    assert main(["suite", str(path), "--out", str(out), "--dry-run", "--seeds", "2"]) == 0
    err = capsys.readouterr().err
    lines = ["    done  combo/seed=0", "  resume  combo/seed=1", "     new  type_t2/seed=0", "     new  type_t2/seed=1"]
    assert err.splitlines()[:4] == lines
    assert "4 runs (2 new, 1 resume, 1 done) into" in err and "all configurations are valid" in " ".join(err.split())
    assert fake.names == [] and not (out / "suite.csv").exists()


def test_a_suite_runs_each_task_and_seed_once_and_skips_finished_runs(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = write_suite(folder, SUITE, "resume.yaml"), tmp_path / "out"
    fake = FakeRuns(monkeypatch)
    assert main(["suite", str(path), "--out", str(out), "--quiet"]) == 0
    assert fake.names == RUNS
    first = pd.read_csv(out / "suite.csv")
    assert len(first) == 4 * 2 * 3 * 3  # runs x conditions x metrics x methods

    shutil.rmtree(out / "tasks" / "type_t2" / "seed=1")
    capsys.readouterr()
    fake = FakeRuns(monkeypatch)
    assert main(["suite", str(path), "--out", str(out), "--quiet"]) == 0
    assert fake.names == ["type_t2/seed=1"]
    assert capsys.readouterr().err.count("done before, skipped") == 3
    pd.testing.assert_frame_equal(pd.read_csv(out / "suite.csv"), first)


def test_a_finished_run_scored_under_other_sampling_or_evaluation_settings_is_evaluated_again(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """sample.* and evaluate.* change what a trained run predicts and how it is scored, not its training: such a
    finished run is listed as ``evaluate`` and run again (from its checkpoint); the others stay done."""
    path, out = write_suite(folder, SUITE, "again.yaml"), tmp_path / "out"
    runs = read_suite(path).runs()
    for run in runs:
        _fake_finished(out / "tasks" / run.name, run.config)
    overrides = ["--set", "evaluate.baselines=[control]", "sample.steps=7"]
    fake = FakeRuns(monkeypatch, run=False)
    assert main(["suite", str(path), "--out", str(out), "--dry-run", "--set", "evaluate.baselines=[control]"]) == 0
    assert "4 runs (4 evaluate) into" in capsys.readouterr().err and fake.names == []
    fake = FakeRuns(monkeypatch)
    assert main(["suite", str(path), "--out", str(out), "--quiet", *overrides]) == 0
    assert fake.names == RUNS
    assert capsys.readouterr().err.count("predicted and evaluated again") == 4
    fake = FakeRuns(monkeypatch, run=False)  # the folders now hold the new settings
    assert main(["suite", str(path), "--out", str(out), "--quiet", *overrides]) == 0 and fake.names == []


def test_a_folder_run_with_another_config_is_refused(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = write_suite(folder, SUITE, "stale.yaml"), tmp_path / "out"
    runs = read_suite(path).runs()
    _fake_finished(out / "tasks" / "type_t2" / "seed=0", runs[2].config)
    fake = FakeRuns(monkeypatch, run=False)
    code = main(["suite", str(path), "--out", str(out), "--set", "train.lr=0.01"])
    assert_one_line_error(code, capsys.readouterr().err, str(out / "tasks" / "type_t2" / "seed=0"), "train.lr",
                          "--out")
    assert fake.names == []


def test_ctrl_c_keeps_finished_runs_and_says_how_to_continue(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = write_suite(folder, SUITE, "stop.yaml"), tmp_path / "out"
    fake = FakeRuns(monkeypatch, stop_at="combo/seed=1")
    monkeypatch.setattr(FakeRuns, "stop", lambda self, name: KeyboardInterrupt(f"stopped at {'/very/long/path' * 12}"))
    assert main(["suite", str(path), "--out", str(out), "--quiet"]) == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "/very/long/path" * 12 in lines[0]  # not wrapped: the path copies whole
    assert lines[0].endswith("run the same command again to continue the suite.")
    assert fake.names == RUNS[:2]
    assert (out / "tasks" / "combo" / "seed=0" / "metrics.csv").is_file() and not (out / "suite.csv").exists()
    fake = FakeRuns(monkeypatch)
    assert main(["suite", str(path), "--out", str(out), "--quiet"]) == 0
    assert fake.names == RUNS[1:]


# ---------------------------------------------------------------------------------------------- summary


def _long(rows: list[tuple[str, str, str, list[float]]]) -> pd.DataFrame:
    """A suite.csv: (task, metric, method, one value per seed) as ``__all__`` rows, plus a misleading condition row."""
    out = []
    for task, metric, method, values in rows:
        for seed, value in enumerate(values):
            out.append((task, seed, "__all__", metric, method, value))
            out.append((task, seed, "X", metric, method, -100.0))  # per-condition rows never enter the summary
    return pd.DataFrame(out, columns=list(LONG_COLUMNS))


NAN = math.nan

#: T1: beats on pearson_delta (higher better), loses on mse_delta (lower better), ties on mmd2_energy; roc_auc NaN
#: everywhere. T2: loses on pearson_delta only on the means over seeds (the baseline varies with the seed), worse
#: than control on mse_delta, roc_auc NaN without real DE genes, no mmd2_energy.
SYNTHETIC = [
    ("T1", "pearson_delta", "model", [0.9, 0.8]),
    ("T1", "pearson_delta", "control", [0.1, 0.1]),
    ("T1", "pearson_delta", "context_mean", [0.7, 0.9]),
    ("T1", "mse_delta", "model", [0.02, 0.04]),
    ("T1", "mse_delta", "control", [0.05, 0.05]),
    ("T1", "mse_delta", "context_mean", [0.01, 0.01]),
    ("T1", "mmd2_energy", "model", [1.0, 1.0]),
    ("T1", "mmd2_energy", "control", [1.0, 1.0]),
    ("T1", "mmd2_energy", "context_mean", [2.0, 2.0]),
    ("T1", "roc_auc", "model", [NAN, NAN]),
    ("T1", "roc_auc", "control", [NAN, NAN]),
    ("T1", "roc_auc", "context_mean", [NAN, NAN]),
    ("T1", "de_nsig_counts_real", "model", [5.0, 5.0]),
    ("T1", "made_up_score", "model", [1.0, 2.0]),
    ("T1", "made_up_score", "control", [1.0, 1.0]),
    ("T2", "pearson_delta", "model", [0.5, 0.5]),
    ("T2", "pearson_delta", "control", [0.55, 0.55]),
    ("T2", "pearson_delta", "context_mean", [0.4, 0.8]),
    ("T2", "mse_delta", "model", [0.5, 0.7]),
    ("T2", "mse_delta", "control", [0.1, 0.1]),
    ("T2", "mse_delta", "context_mean", [0.2, 0.2]),
    ("T2", "roc_auc", "model", [NAN, NAN]),
    ("T2", "roc_auc", "control", [NAN, NAN]),
    ("T2", "overlap_at_N", "model", [0.0, 0.0]),  # 0 by convention without real DE genes: skipped, not a tie
    ("T2", "overlap_at_N", "control", [0.0, 0.0]),
    ("T2", "de_nsig_counts_real", "model", [0.0, 0.0]),
    ("T2", "de_nsig_counts_real", "control", [0.0, 0.0]),
]
HEADLINE = ["pearson_delta", "mse_delta", "mmd2_energy", "roc_auc", "overlap_at_N", "zero_fraction_mae",
            "made_up_score"]


def test_versus_best_baseline_on_means_over_seeds() -> None:
    means = task_means(_long(SYNTHETIC))
    summary = versus_baselines(means, HEADLINE)
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    got = summary.set_index(["task", "metric"])
    expected = {
        ("T1", "pearson_delta"): ("context_mean", 0.8, "beats"),
        ("T1", "mse_delta"): ("context_mean", 0.01, "loses"),
        ("T1", "mmd2_energy"): ("control", 1.0, "ties"),
        ("T2", "pearson_delta"): ("context_mean", 0.6, "loses"),
        ("T2", "mse_delta"): ("control", 0.1, "loses"),
    }
    for key, (baseline, value, outcome) in expected.items():
        row = got.loc[key]
        assert (row.best_baseline, row.outcome) == (baseline, outcome), key
        assert row.best_baseline_mean == pytest.approx(value)
    assert got.loc[("T1", "pearson_delta"), "model_mean"] == pytest.approx(0.85)
    assert got.loc[("T1", "pearson_delta"), "model_sd"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert got.loc[("T1", "pearson_delta"), "n_seeds"] == 2
    skipped = got[got.outcome == SKIPPED].note.to_dict()
    assert skipped == {
        ("T1", "roc_auc"): "undefined: NaN for the model and every baseline",
        ("T1", "overlap_at_N"): "not in metrics.csv",
        ("T1", "zero_fraction_mae"): "not in metrics.csv",
        ("T1", "made_up_score"): "no definition in this version, so no best value to compare with",
        ("T2", "mmd2_energy"): "not in metrics.csv",
        ("T2", "roc_auc"): "undefined: the real data has no DE genes",
        ("T2", "overlap_at_N"): "undefined: the real data has no DE genes",
        ("T2", "zero_fraction_mae"): "not in metrics.csv",
        ("T2", "made_up_score"): "not in metrics.csv",
    }
    assert headline(summary) == (
        "The model beats the best baseline on 1 of 5 (task, metric) pairs; it ties on 1 and loses on 3. "
        "9 pair(s) skipped (undefined, not measured, or without a best value)."
    )


def test_every_metric_compares_all_directional_metrics_with_the_headline_skips() -> None:
    means = task_means(_long(SYNTHETIC))
    outcomes = every_metric(means).set_index(["task", "metric"]).outcome.to_dict()
    assert outcomes == {  # not roc_auc (NaN), made_up_score (no definition), counts, T2's overlap (no real DE)
        ("T1", "pearson_delta"): "beats",
        ("T1", "mse_delta"): "loses",
        ("T1", "mmd2_energy"): "ties",
        ("T2", "pearson_delta"): "loses",
        ("T2", "mse_delta"): "loses",
    }
    section = report(means, versus_baselines(means, ["pearson_delta"]), title="t").split("## Every metric")[1]
    assert "| T2 | 0 | 0 | 2 | pearson_delta (context_mean), mse_delta (control) |" in section
    assert "beats the best baseline on 1 of 5 (task, metric) pairs; it ties on 1 and loses on 3. " in section
    assert "Lost on more than one task: mse_delta (2)." in section


def test_worse_than_control_lists_only_the_pairs_where_control_is_closer() -> None:
    means = task_means(_long(SYNTHETIC))
    line = control_line(means)
    assert line == (
        "The model is worse than the control baseline on mse_delta or mmd2_energy in: T2 mse_delta (0.6 against 0.1)."
    )  # T1 mmd2_energy ties with control: not worse
    assert control_line(means[means.task == "T1"]).endswith("in: none.")
    assert control_line(means[means.method != "control"]).startswith("No control baseline was run")


def test_markdown_report_tables_each_task_and_says_what_was_skipped() -> None:
    means = task_means(_long(SYNTHETIC))
    summary = versus_baselines(means, HEADLINE)
    text = report(means, summary, title="perturbdiff suite synthetic")
    t1 = text[text.index("## T1"):text.index("## T2")]
    assert "| metric | model | control | context_mean | best baseline | outcome |" in t1
    sd = np.std([0.9, 0.8], ddof=1)
    assert f"| pearson_delta \u2191 | 0.85 \u00b1 {sd:.1g} | 0.1 | 0.8 | context_mean | beats |" in t1
    assert "| mse_delta \u2193 | 0.03 \u00b1 0.01 | 0.05 | 0.01 | context_mean | loses |" in t1
    assert "roc_auc |" not in t1
    assert "skipped: roc_auc (undefined: NaN for the model and every baseline), overlap_at_N (not in " in t1
    overall = text[text.index("## Overall"):]
    assert headline(summary) in overall and control_line(means) in overall


def test_markdown_report_gives_the_models_calibration_per_task() -> None:
    rows = [*SYNTHETIC, ("T1", "population_coverage", "model", [1.0, 0.5]), ("T1", "calibration_pvalue", "model", [0.4, 0.2]),
            ("T2", "population_coverage", "model", [0.0, 0.0]), ("T2", "calibration_pvalue", "model", [0.1, 0.1])]
    means = task_means(_long(rows))
    text = report(means, versus_baselines(means, HEADLINE), title="synthetic")
    section = text[text.index("## Calibration"):]
    sd = np.std([1.0, 0.5], ddof=1)
    assert "| task | population_coverage | calibration_pvalue |" in section
    assert f"| T1 | 0.75 \u00b1 {sd:.1g} | 0.3 \u00b1 0.1 |" in section and "| T2 | 0 \u00b1 0 | 0.1 \u00b1 0 |" in section
    assert "Mean population_coverage over 2 task(s): 0.38." in section
    plain = report(task_means(_long(SYNTHETIC)), versus_baselines(task_means(_long(SYNTHETIC)), HEADLINE), title="s")
    assert "No calibration metrics" in plain[plain.index("## Calibration"):]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_tiny_suite_end_to_end(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = _suite(seeds=[0], set={"train.steps": 2, "sample.steps": 2, "data.set_size": 8},
                   metrics=["pearson_delta", "mse_delta", "mmd2_energy", "roc_auc", "zero_fraction_mae"])
    path, out = write_suite(folder, suite, "tiny.yaml"), tmp_path / "out"
    assert main(["suite", str(path), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    for name in ("suite.csv", "suite_summary.csv", "suite.md", "suite.png"):
        assert (out / name).is_file(), name
    assert (out / "suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    long = pd.read_csv(out / "suite.csv")
    assert list(long.columns) == list(LONG_COLUMNS)
    for task in ("combo", "type_t2"):
        metrics = pd.read_csv(out / "tasks" / task / "seed=0" / "metrics.csv")
        assert len(long[long.task == task]) == len(metrics) and set(long.seed) == {0}
        assert set(long[long.task == task].condition) == set(metrics.condition) and "__all__" in set(metrics.condition)
    summary = pd.read_csv(out / "suite_summary.csv")
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    assert list(summary.task) == ["combo"] * 5 + ["type_t2"] * 5
    assert set(summary.outcome) <= {"beats", "ties", "loses", "skipped"}
    assert (summary[summary.metric == "zero_fraction_mae"].outcome != "skipped").all()  # a realism metric, compared
    assert "## combo" in (out / "suite.md").read_text() and "## type_t2" in (out / "suite.md").read_text()
    assert "The model beats the best baseline on" in captured.out and "control baseline" in captured.out
    assert not list(out.glob(".*.tmp"))
    # another baseline list: every run predicted and scored again from its checkpoint, none trained again
    run = out / "tasks" / "combo" / "seed=0"
    trained = {name: (run / name).read_bytes() for name in ("train_log.csv", "checkpoints/last.pt")}
    assert main(["suite", str(path), "--out", str(out), "--quiet", "--set", "evaluate.baselines=[control]"]) == 0
    assert capsys.readouterr().err.count("predicted and evaluated again") == 2
    assert {name: (run / name).read_bytes() for name in trained} == trained
    assert set(pd.read_csv(run / "metrics.csv").method) == {"model", "control"}


@pytest.mark.slow
def test_jobs_run_side_by_side_in_their_own_processes_as_one_at_a_time_would(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--jobs 2`` runs two runs at a time in spawned worker processes; each gives the metrics it gives one at a time."""
    suite = _suite(seeds=[0], set={"train.steps": 2, "sample.steps": 2, "data.set_size": 8})
    path = write_suite(folder, suite, "jobs.yaml")
    assert main(["suite", str(path), "--out", str(tmp_path / "in_turn"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["suite", str(path), "--out", str(tmp_path / "side"), "--quiet", "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert "running 2 runs at a time, 1 thread each" in err
    assert err.count(": finished in ") == 2
    for run in ("combo/seed=0", "type_t2/seed=0"):
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "side" / "tasks" / run / "metrics.csv"),
            pd.read_csv(tmp_path / "in_turn" / "tasks" / run / "metrics.csv"),
        )
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "side" / "suite.csv"), pd.read_csv(tmp_path / "in_turn" / "suite.csv"))


@pytest.mark.slow
def test_sigterm_stops_runs_side_by_side_at_a_checkpoint_even_with_a_worker_idle(folder: Path, tmp_path: Path) -> None:
    """SIGTERM to ``suite --jobs 2`` while one run trains and the other worker has nothing left: the run saves a
    checkpoint and stops, the command exits 143 saying how to continue, and the run is listed to resume."""
    suite = {"seeds": [0], "set": {"sample.steps": 2, "data.set_size": 8}, "metrics": ["pearson_delta"],
             "tasks": [{"name": "long", "config": "base.yaml", "set": {"train.steps": 5000}},
                       {"name": "short", "config": "base.yaml", "set": {"train.steps": 4}}]}
    path, out = write_suite(folder, suite, "stop_jobs.yaml"), tmp_path / "out"
    command = [sys.executable, "-m", "perturbdiff_core", "suite", str(path), "--out", str(out), "--quiet", "--jobs", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trained = out / "tasks" / "long" / "seed=0" / "checkpoints" / "last.pt"
    finished = out / "tasks" / "short" / "seed=0" / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (trained.is_file() and finished.is_file()):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the runs did not get going within 300 s"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    assert "run the same command again to continue the suite" in err and "Traceback" not in err
    assert not (out / "tasks" / "long" / "seed=0" / "metrics.csv").exists()
    statuses = subprocess.run(command[:-2] + ["--dry-run"], capture_output=True, text=True, check=True).stderr
    assert re.search(r"resume\s+long/seed=0", statuses) and re.search(r"done\s+short/seed=0", statuses), statuses


@pytest.mark.parametrize("command", ["suite", "ablate"])
@pytest.mark.parametrize(("jobs", "says"), [("0", "must be at least 1, got 0"), ("two", "expected a whole number, got 'two'")])
def test_jobs_must_be_a_whole_number_of_at_least_one(
    command: str, jobs: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "any.yaml", "--jobs", jobs]) == 2
    assert f"argument --jobs: {says}" in capsys.readouterr().err


def test_bundled_cpu_suite_expands_to_39_valid_runs(kang18_path: Path, norman19_path: Path) -> None:
    spec = read_suite(REPO / "examples" / "suite_cpu.yaml")
    runs = spec.runs()
    check_splits(runs, spec.source)  # every held-out cell type, combination and line exists and can be held out
    assert len(runs) == 39 and spec.seeds == (0, 1, 2)
    holdouts = {run.task: run.config.split.holdout for run in runs}
    folds = [set(holdouts[f"norman19_combo_fold{i}"]) for i in range(3)]
    assert not (folds[0] & folds[1] or folds[0] & folds[2] or folds[1] & folds[2])
    assert {holdouts[f"norman19_glioma_{line}"][0] for line in ("A172", "T98G", "U87MG")} == {"A172", "T98G", "U87MG"}
    assert len([task for task in holdouts if task.startswith("kang18_")]) == 7
    assert "zero_fraction_mae" in spec.metrics
