"""Summaries of a finished ablation grid: the cells' metrics collected, averaged over seeds, tabled and plotted."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import PerturbDiffError
from ..evaluation import ALL_CONDITIONS, DEFINITIONS, definition_of
from ..io import atomic_path, atomic_write_text
from ..names import ABLATION_MARKDOWN_FILE as MARKDOWN_FILE
from ..names import ABLATION_PLOT_FILE as PLOT_FILE
from ..names import ABLATION_TABLE_FILE as TABLE_FILE
from ..names import CELLS_FILE
from ..runs.folder import RunDir
from ..runs.pipeline import MODEL
from .grid import SUMMARY_COLUMNS, Cell, GridSpec, cell_dir


def summarize_grid(spec: GridSpec, cells: Sequence[Cell], out: str | os.PathLike[str]) -> pd.DataFrame:
    """Collect the cells' metrics into ``cells.csv``; write ``ablation.csv``, ``ablation.md`` and ``ablation.png``."""
    out = Path(out)
    long = collect(cells, out)
    with atomic_path(out / CELLS_FILE) as tmp:
        long.to_csv(tmp, index=False)
    table = summarize(long, spec.summary_axes)
    with atomic_path(out / TABLE_FILE) as tmp:
        table.to_csv(tmp, index=False)
    metrics = key_metrics(table, spec.metrics)
    atomic_write_text(out / MARKDOWN_FILE, markdown(*overview(table, spec.summary_axes, metrics)))
    write_plot(table, spec.summary_axes, metrics, out / PLOT_FILE)
    return table


def collect(cells: Sequence[Cell], out: str | os.PathLike[str]) -> pd.DataFrame:
    """The aggregate (``__all__``) rows of every cell's ``metrics.csv`` with one column per axis label."""
    frames = []
    for cell in cells:
        path = RunDir(cell_dir(out, cell)).metrics
        if not path.is_file():
            raise PerturbDiffError(f"Cell {cell.name} has no {path.name} yet; run the grid to finish it.")
        metrics = pd.read_csv(path)
        rows = metrics[metrics.condition == ALL_CONDITIONS].drop(columns="condition")
        frames.append(rows.assign(**cell.labels)[[*cell.labels, "metric", "method", "value"]])
    return pd.concat(frames, ignore_index=True)


def summarize(long: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof 1) over seeds per ``axes`` x metric x method.

    ``n_seeds`` counts the seeds with a value (NaN skipped). Rows keep the grid's order.
    """
    keys = [*axes, "metric", "method"]
    grouped = long.groupby(keys, sort=False)["value"]
    table = grouped.agg(mean="mean", std="std", n_seeds="count").reset_index()
    return table[[*axes, *SUMMARY_COLUMNS]]


def key_metrics(table: pd.DataFrame, wanted: Sequence[str]) -> list[str]:
    """The metrics of ``table`` matching ``wanted`` (names or ``{kernel}`` patterns), in ``wanted`` order."""
    present = list(dict.fromkeys(table.metric))
    found = []
    for name in wanted:
        pattern = DEFINITIONS.get(name) if "{kernel}" in name else None
        found += [m for m in present if m == name or (pattern is not None and definition_of(m) is pattern)]
    return list(dict.fromkeys(found))


def shared_baselines(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """Each baseline's mean of ``metric`` if the same in every cell group (a grid over model keys), else ``None``."""
    rows = table[(table.metric == metric) & (table.method != MODEL)]
    if rows.empty:
        return None
    means = rows.groupby("method", sort=False)["mean"]
    spread = (means.max() - means.min()).fillna(0.0)
    return means.first() if bool((spread <= 1e-9 * (1.0 + means.first().abs().fillna(0.0))).all()) else None


def best_baseline(table: pd.DataFrame, metric: str) -> tuple[str, float] | None:
    """The shared baseline closest to the metric's best value, and its mean; ``None`` if none applies."""
    baselines, definition = shared_baselines(table, metric), definition_of(metric)
    if baselines is None or definition is None or definition.best is None or baselines.dropna().empty:
        return None
    gaps = definition.gap(baselines.dropna())
    name = str(gaps.idxmin())
    return name, float(baselines[name])


def overview(table: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The key metrics as text: the model's ``mean ± sd`` per group of cells (one column per axis, or
    ``method``), and each baseline's mean when the same in every group (else an empty frame)."""
    labels = list(axes) or ["method"]
    model = table[table.method == MODEL]
    groups = model.groupby(list(axes), sort=False) if axes else [((MODEL,), model)]
    rows = []
    for key, group in groups:
        values = group.set_index("metric")
        rows.append([*map(str, key), *(_mean_sd(values, m) for m in metrics)])
    baselines = {m: shared_baselines(table, m) for m in metrics}
    shared = []
    if metrics and all(b is not None for b in baselines.values()):
        for method in baselines[metrics[0]].index:
            cells = [f"{baselines[m].get(method, math.nan):.4g}" for m in metrics]
            shared.append([str(method), *[""] * (len(labels) - 1), *cells])
    columns = [*labels, *metrics]
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(shared, columns=columns)


def markdown(model: pd.DataFrame, baselines: pd.DataFrame) -> str:
    """A Markdown table of :func:`overview` (baselines in italics below the model rows)."""
    lines = ["| " + " | ".join(model.columns) + " |", "|" + "---|" * len(model.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in model.itertuples(index=False)]
    lines += ["| " + " | ".join(f"*{v}*" if v else "" for v in row) + " |" for row in baselines.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _mean_sd(values: pd.DataFrame, metric: str) -> str:
    if metric not in values.index:
        return ""
    return mean_sd(values.at[metric, "mean"], values.at[metric, "std"])


def mean_sd(mean: float, sd: float) -> str:
    """``mean \u00b1 sd`` as the tables print it (4 and 1 significant digits); the mean alone without a sd."""
    return f"{mean:.4g}" if pd.isna(sd) else f"{mean:.4g} \u00b1 {sd:.1g}"


def write_plot(table: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str], path: Path) -> Path:
    """Bars of the model's mean +- sd per key metric: groups along the first axis, one bar per combination of
    the others; the best baseline (when the same in every cell) as a dashed line. Written atomically."""
    model = table[table.method == MODEL]
    x_axis, hue_axes = (axes[0], list(axes[1:])) if axes else (None, [])
    xs = list(dict.fromkeys(model[x_axis])) if x_axis else ["model"]
    hues = list(dict.fromkeys(model[hue_axes].astype(str).agg(" / ".join, axis=1))) if hue_axes else [""]
    shown = list(metrics) or list(dict.fromkeys(model.metric))[:4]
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(max(3.4, 1.0 + 0.3 * len(xs) * len(hues)) * ncols, 3.2 * nrows), layout="constrained")
    grid = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    width = 0.8 / len(hues)
    positions = np.arange(len(xs))
    for ax, metric in zip(grid, shown):
        rows = model[model.metric == metric]
        for j, hue in enumerate(hues):
            sub = rows if not hue_axes else rows[rows[hue_axes].astype(str).agg(" / ".join, axis=1) == hue]
            sub = sub.set_index(x_axis).reindex(xs) if x_axis else sub
            ax.bar(positions + (j - (len(hues) - 1) / 2) * width, sub["mean"].to_numpy(dtype=float), width,
                   yerr=sub["std"].fillna(0.0).to_numpy(dtype=float), capsize=2, label=hue or None)
        best = best_baseline(table, metric)
        if best is not None:
            ax.axhline(best[1], color="k", linestyle="--", linewidth=1, label=f"best baseline ({best[0]})")
        ax.set_xticks(positions, xs, rotation=30, ha="right", fontsize=8)
        definition = definition_of(metric)
        ax.set_title(metric + (definition.arrow if definition is not None else ""), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    grid[0].legend(fontsize=7)
    for ax in grid[len(shown):]:
        ax.set_visible(False)
    bars = f"; bars: {' / '.join(hue_axes)}" if hue_axes else ""
    fig.suptitle(f"model, mean \u00b1 sd over seeds{bars}", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
