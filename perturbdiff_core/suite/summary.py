"""Summaries of a finished suite: every run's metrics in one table, and per task the model's mean over seeds
against the best baseline's on each headline metric, as CSV, Markdown and a plot."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..ablation import key_metrics, markdown, mean_sd, summarize
from ..errors import PerturbDiffError
from ..evaluation import ALL_CONDITIONS, COLUMNS, best_methods, definition_of, versus_best_baseline
from ..evaluation.metrics import COVERAGE_LEVEL
from ..io import atomic_path, atomic_write_text
from ..names import SUITE_FILE
from ..names import SUITE_MARKDOWN_FILE as MARKDOWN_FILE
from ..names import SUITE_PLOT_FILE as PLOT_FILE
from ..names import SUITE_SUMMARY_FILE as SUMMARY_FILE
from ..runs.folder import RunDir
from ..runs.pipeline import MODEL
from .spec import SuiteRun, SuiteSpec, run_dir

#: Columns of ``suite.csv``: every row of every run's ``metrics.csv`` with its task and seed.
LONG_COLUMNS = ("task", "seed", *COLUMNS)

#: Columns of ``suite_summary.csv``: one row per task and headline metric.
SUMMARY_COLUMNS = (
    "task", "metric", "model_mean", "model_sd", "n_seeds", "best_baseline", "best_baseline_mean", "outcome", "note"
)

#: The outcome of a (task, metric) pair that is not compared (the note says why).
SKIPPED = "skipped"

#: The baseline that predicts the control cells, and the metrics on which losing to it is reported.
CONTROL = "control"
CONTROL_METRICS = ("mse_delta", "mmd2_{kernel}")

#: The number of real DE genes per condition: DE metrics of a task where it is 0 everywhere are skipped.
REAL_DE_COUNT = "de_nsig_counts_real"

#: The model's calibration metrics, reported per task after the comparison (no baseline draws populations).
CALIBRATION_METRICS = ("population_coverage", "calibration_pvalue")

#: Markers of the baselines in the plot, in the order they appear.
_MARKERS = ("s", "^", "v", "D", "P", "X", "*", "<", ">")


class SuiteSummary(NamedTuple):
    """A finished suite: :func:`task_means` of its runs and :func:`versus_baselines` of them."""

    means: pd.DataFrame
    summary: pd.DataFrame


def summarize_suite(spec: SuiteSpec, runs: Sequence[SuiteRun], out: str | os.PathLike[str]) -> SuiteSummary:
    """Write ``suite.csv``, ``suite_summary.csv``, ``suite.md`` and ``suite.png`` into ``out``."""
    out = Path(out)
    long = collect(runs, out)
    with atomic_path(out / SUITE_FILE) as tmp:
        long.to_csv(tmp, index=False)
    means = task_means(long)
    summary = versus_baselines(means, spec.metrics)
    with atomic_path(out / SUMMARY_FILE) as tmp:
        summary.to_csv(tmp, index=False)
    atomic_write_text(out / MARKDOWN_FILE, report(means, summary, title=f"perturbdiff suite {spec.source.stem}"))
    write_plot(means, summary, out / PLOT_FILE)
    return SuiteSummary(means, summary)


def collect(runs: Sequence[SuiteRun], out: str | os.PathLike[str]) -> pd.DataFrame:
    """Every row of every run's ``metrics.csv`` (all conditions and ``__all__``) with its task and seed."""
    frames = []
    for run in runs:
        path = RunDir(run_dir(out, run)).metrics
        if not path.is_file():
            raise PerturbDiffError(f"Run {run.name} has no {path.name} yet; run the suite to finish it.")
        frames.append(pd.read_csv(path).assign(task=run.task, seed=run.seed)[list(LONG_COLUMNS)])
    return pd.concat(frames, ignore_index=True)


def task_means(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and count over seeds of every aggregate (``__all__``) value: ``task, metric, method, mean, std,
    n_seeds``."""
    return summarize(long[long.condition == ALL_CONDITIONS], ["task"])


def versus_baselines(means: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per task and headline metric (names or ``{kernel}`` patterns): the model's mean and sd over seeds, the best
    baseline by its mean over seeds and the outcome (:func:`~perturbdiff_core.evaluation.versus_best_baseline`
    on the means: closest to the metric's best value, ties to 1e-9), or ``skipped`` with the reason in ``note``."""
    rows = []
    for task, table in means.groupby("task", sort=False):
        model = table[table.method == MODEL].set_index("metric")
        verdicts = _verdicts(table)
        for wanted in metrics:
            present = key_metrics(table, [wanted])
            if not present:
                rows.append((task, wanted, math.nan, math.nan, 0, None, math.nan, SKIPPED, "not in metrics.csv"))
            for metric in present:
                mine = tuple(model.loc[metric, ["mean", "std", "n_seeds"]]) if metric in model.index else (
                    math.nan, math.nan, 0)
                why = _why_skipped(table, metric, verdicts)
                if why:
                    rows.append((task, metric, *mine, None, math.nan, SKIPPED, why))
                else:
                    best = verdicts.loc[metric]
                    rows.append((task, metric, *mine, best.baseline, best.baseline_value, best.outcome, ""))
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def _verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`versus_best_baseline` of one task's means, indexed by metric (empty without model rows)."""
    if MODEL not in set(table.method):
        return pd.DataFrame(columns=["baseline", "baseline_value", "outcome"])
    frame = table.assign(condition=ALL_CONDITIONS, value=table["mean"])[list(COLUMNS)]
    return versus_best_baseline(frame, MODEL).set_index("metric")


def _why_skipped(table: pd.DataFrame, metric: str, verdicts: pd.DataFrame) -> str:
    """Why a metric of a task's means is not compared (``""`` if it is): no best value, a DE metric without real
    DE genes (NaN, or a convention such as overlap 0), or NaN on one side."""
    definition = definition_of(metric)
    if definition is None:
        return "no definition in this version, so no best value to compare with"
    if definition.best is None:
        return "a count, without a best value"
    real = table[(table.metric == REAL_DE_COUNT)]["mean"]
    if definition.family == "de" and len(real) and bool((real == 0).all()):
        return "undefined: the real data has no DE genes"
    if metric in verdicts.index:
        return ""
    values = table[table.metric == metric].set_index("method")["mean"]
    baselines = values.drop(MODEL, errors="ignore")
    if baselines.empty:
        return "no baseline was run"
    model_nan = MODEL not in values.index or pd.isna(values[MODEL])
    if model_nan and baselines.isna().all():
        return "undefined: NaN for the model and every baseline"
    return "undefined: NaN for the model" if model_nan else "undefined: NaN for every baseline"


def headline(summary: pd.DataFrame) -> str:
    """``The model beats the best baseline on X of Y (task, metric) pairs; ...`` with the ties, losses and skips."""
    compared = summary[summary.outcome != SKIPPED]
    count = compared.outcome.value_counts()
    line = (
        f"The model beats the best baseline on {count.get('beats', 0)} of {len(compared)} (task, metric) pairs; "
        f"it ties on {count.get('ties', 0)} and loses on {count.get('loses', 0)}."
    )
    skipped = int((summary.outcome == SKIPPED).sum())
    return line + (f" {skipped} pair(s) skipped (undefined, not measured, or without a best value)." if skipped else "")


def every_metric(means: pd.DataFrame) -> pd.DataFrame:
    """Per task the outcome on every directional metric of ``metrics.csv``, not only the headline ones, compared as
    :func:`versus_baselines` compares them (the same skips): ``task, metric, baseline, outcome``."""
    rows = []
    for task, table in means.groupby("task", sort=False):
        verdicts = _verdicts(table)
        rows += [(task, metric, v.baseline, v.outcome) for metric, v in verdicts.iterrows()
                 if not _why_skipped(table, str(metric), verdicts)]
    return pd.DataFrame(rows, columns=["task", "metric", "baseline", "outcome"])


def every_metric_lines(means: pd.DataFrame) -> list[str]:
    """``suite.md``'s section on :func:`every_metric`: a table of wins, ties and losses per task with the metrics
    lost, the total, and the metrics lost on most tasks."""
    outcomes = every_metric(means)
    if outcomes.empty:
        return ["No directional metric could be compared."]
    body = []
    for task, rows in outcomes.groupby("task", sort=False):
        count = rows.outcome.value_counts()
        lost = ", ".join(f"{r.metric} ({r.baseline})" for r in rows[rows.outcome == "loses"].itertuples())
        body.append([task, *(str(count.get(o, 0)) for o in ("beats", "ties", "loses")), lost or "none"])
    frame = pd.DataFrame(body, columns=["task", "beats", "ties", "loses", "lost (to)"])
    count = outcomes.outcome.value_counts()
    losses = outcomes[outcomes.outcome == "loses"].metric.value_counts()
    often = ", ".join(f"{metric} ({n})" for metric, n in losses.items() if n > 1)
    return [
        "The same comparison on every directional metric of `metrics.csv` (the headline metrics and the rest: "
        "error of the means, DE overlaps and precisions at each cut-off, discrimination, realism):",
        "",
        markdown(frame, frame.iloc[:0]).strip(),
        "",
        f"The model beats the best baseline on {count.get('beats', 0)} of {len(outcomes)} (task, metric) pairs; it ties "
        f"on {count.get('ties', 0)} and loses on {count.get('loses', 0)}."
        + (f" Lost on more than one task: {often}." if often else ""),
    ]


def worse_than_control(means: pd.DataFrame) -> pd.DataFrame:
    """The (task, metric) pairs of :data:`CONTROL_METRICS` where the model's mean is further from the best value than
    the control baseline's (ties excluded): ``task, metric, model, control``."""
    rows = []
    for task, table in means.groupby("task", sort=False):
        for metric in key_metrics(table, CONTROL_METRICS):
            values = table[table.metric == metric].set_index("method")["mean"]
            if {MODEL, CONTROL} <= set(values.index) and not values[[MODEL, CONTROL]].isna().any():
                if best_methods(values[[MODEL, CONTROL]], metric) == [CONTROL]:
                    rows.append((task, metric, float(values[MODEL]), float(values[CONTROL])))
    return pd.DataFrame(rows, columns=["task", "metric", "model", "control"])


def control_line(means: pd.DataFrame) -> str:
    """One sentence listing the pairs of :func:`worse_than_control`, or ``none``."""
    metrics = " or ".join(key_metrics(means, CONTROL_METRICS)) or " or ".join(CONTROL_METRICS)
    if CONTROL not in set(means.method):
        return f"No {CONTROL} baseline was run, so the model is not compared with it on {metrics}."
    worse = worse_than_control(means)
    pairs = ", ".join(f"{r.task} {r.metric} ({r.model:.4g} against {r.control:.4g})" for r in worse.itertuples())
    return f"The model is worse than the {CONTROL} baseline on {metrics} in: {pairs or 'none'}."


def report(means: pd.DataFrame, summary: pd.DataFrame, *, title: str) -> str:
    """``suite.md``: per task a Markdown table of the compared headline metrics and the skipped ones, then the
    overall lines (:func:`headline`, :func:`control_line`)."""
    seeds = int(means.n_seeds.max()) if len(means) else 0
    lines = [
        f"# {title}",
        "",
        f"The model: mean \u00b1 sd over {seeds} seed(s); each baseline: mean over the same seeds. The outcome "
        f"compares the model's mean with the best baseline's, the baseline closest to the metric's best value "
        f"(\u2191 higher is better, \u2193 lower is better).",
    ]
    for task, rows in summary.groupby("task", sort=False):
        table = means[means.task == task]
        lines += ["", f"## {task}", "", task_table(table, rows).strip()]
        skipped = rows[rows.outcome == SKIPPED]
        if len(skipped):
            lines += ["", "skipped: " + ", ".join(f"{r.metric} ({r.note})" for r in skipped.itertuples())]
    lines += ["", "## Overall", "", headline(summary), "", control_line(means)]
    lines += ["", "## Every metric", "", *every_metric_lines(means)]
    lines += ["", "## Calibration", "", *calibration_lines(means)]
    return "\n".join(lines) + "\n"


def calibration_lines(means: pd.DataFrame) -> list[str]:
    """Per task the model's :data:`CALIBRATION_METRICS` (mean \u00b1 sd over seeds) and their mean over tasks: how
    often the real population falls within the spread of the predicted ones (about 0.9 when calibrated)."""
    rows = means[(means.method == MODEL) & means.metric.isin(CALIBRATION_METRICS)]
    if rows.empty:
        return ["No calibration metrics: the runs drew one population per condition (`sample.populations`)."]
    wide = rows.pivot(index="task", columns="metric", values=["mean", "std"])
    tasks = [t for t in dict.fromkeys(means.task) if t in wide.index]
    present = [m for m in CALIBRATION_METRICS if m in set(rows.metric)]
    frame = pd.DataFrame(
        [[task, *(mean_sd(wide.loc[task, ("mean", m)], wide.loc[task, ("std", m)]) for m in present)] for task in tasks],
        columns=["task", *present],
    )
    lines = [
        "Where the real population falls among the model's sampled populations of each held-out condition "
        f"(`population_coverage`: the share of real populations whose calibration p-value exceeds {COVERAGE_LEVEL:g}; a model "
        "whose spread is right covers about 0.9).",
        "",
        markdown(frame, frame.iloc[:0]).strip(),
    ]
    coverage = rows[rows.metric == "population_coverage"]["mean"]
    if coverage.notna().any():
        lines += ["", f"Mean population_coverage over {int(coverage.notna().sum())} task(s): {coverage.mean():.2f}."]
    return lines


def task_table(means: pd.DataFrame, rows: pd.DataFrame) -> str:
    """One task's compared metrics as Markdown: metric, the model's mean \u00b1 sd, each baseline's mean, the best
    baseline and the outcome."""
    compared = rows[rows.outcome != SKIPPED]
    baselines = list(dict.fromkeys(means.method[means.method != MODEL]))
    values = means.set_index(["metric", "method"])["mean"]
    body = []
    for row in compared.itertuples():
        definition = definition_of(row.metric)
        cells = [f"{values.get((row.metric, b), math.nan):.4g}" for b in baselines]
        arrow = definition.arrow if definition is not None else ""
        body.append([f"{row.metric}{arrow}", mean_sd(row.model_mean, row.model_sd), *cells, row.best_baseline,
                     row.outcome])
    if not body:
        return "No headline metric could be compared for this task.\n"
    frame = pd.DataFrame(body, columns=["metric", MODEL, *baselines, "best baseline", "outcome"])
    return markdown(frame, frame.iloc[:0])


def write_plot(means: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Path:
    """One panel per headline metric measured: tasks along x, the model's mean \u00b1 sd over seeds with error bars,
    each baseline's mean as its own marker. Written atomically."""
    tasks = list(dict.fromkeys(means.task))
    shown = list(dict.fromkeys(summary.metric[summary.metric.isin(set(means.metric))]))
    baselines = list(dict.fromkeys(means.method[means.method != MODEL]))
    ncols = max(1, min(3, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    width = max(4.0, 1.5 + 0.45 * len(tasks))
    fig = Figure(figsize=(width * ncols, 3.6 * nrows), layout="constrained")
    grid = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    positions = np.arange(len(tasks), dtype=float)
    slots = np.linspace(-0.35, 0.35, len(baselines) + 1 + len(baselines) % 2)  # odd: the model in the middle, at 0
    offsets = [0.0, *np.delete(slots, len(slots) // 2)]
    for ax, metric in zip(grid, shown):
        rows = means[means.metric == metric]
        model = rows[rows.method == MODEL].set_index("task").reindex(tasks)
        ax.errorbar(positions + offsets[0], model["mean"].to_numpy(dtype=float),
                    yerr=model["std"].fillna(0.0).to_numpy(dtype=float), fmt="o", color="k", capsize=3,
                    markersize=5, label=f"{MODEL} (mean \u00b1 sd)")
        for j, name in enumerate(baselines):
            sub = rows[rows.method == name].set_index("task").reindex(tasks)
            ax.plot(positions + offsets[j + 1], sub["mean"].to_numpy(dtype=float), linestyle="none",
                    marker=_MARKERS[j % len(_MARKERS)], markersize=5, alpha=0.8, label=name)
        values = rows["mean"].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        definition = definition_of(metric)
        if definition is not None and definition.best == 0.0 and len(values) and values.min() > 0 and (
            values.max() / values.min() > 100
        ):
            ax.set_yscale("log")  # errors spanning orders of magnitude across tasks
        ax.set_xticks(positions, tasks, rotation=45, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        ax.set_title(metric + (definition.arrow if definition is not None else ""), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    if shown:
        handles, labels = grid[0].get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith(MODEL))  # the model first
        fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center",
                   ncols=len(labels), fontsize=8)
    for ax in grid[len(shown):]:
        ax.set_visible(False)
    fig.suptitle("model (mean \u00b1 sd over seeds) and baselines (mean) per task", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
