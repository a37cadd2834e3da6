"""The figures of ``report.html``, drawn with matplotlib without pyplot (no global backend touched).

Every method keeps one colour and one marker in every figure: the model blue circles, the
baselines the following colours with their own markers, the real cells red and their controls
grey. Per-condition figures are two panels wide so each is large enough to read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from ..errors import InputError
from .compare import definition_of
from .distribution import subsample
from .paired import EvaluatedCondition, PairedData

#: Colour and marker of the model; baselines take the following ones in order.
MODEL_COLOUR = "#1f77b4"
BASELINE_COLOURS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<")
#: Colours of the real cells and of their control cells.
REAL_COLOUR = "#d62728"
CONTROL_COLOUR = "#bbbbbb"
#: Size in inches of one per-condition panel, and panels per row.
PANEL = (5.6, 4.8)
PANELS_PER_ROW = 2


def grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` axes in rows of ``ncols`` (unused axes hidden)."""
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def styles(methods: Sequence[str], model: str) -> dict[str, tuple[str, str]]:
    """``method -> (colour, marker)``: the model first style, baselines the next ones in order."""
    out, k = {}, 0
    for method in methods:
        if method == model:
            out[method] = (MODEL_COLOUR, MARKERS[0])
        else:
            out[method] = (BASELINE_COLOURS[k % len(BASELINE_COLOURS)], MARKERS[1 + k % (len(MARKERS) - 1)])
            k += 1
    return out


def bars(wide: pd.DataFrame, metrics: Sequence[str], model: str) -> Figure | None:
    """One bar chart per metric and one of the numbers of DE genes (real: the dashed line), a bar per method."""
    has_de = "de_nsig_counts_pred" in wide.index
    if not metrics and not has_de:
        return None
    fig, axes = grid(len(metrics) + has_de, 4, (3.3, 2.7))
    methods = [str(m) for m in wide.columns]
    colours = [styles(methods, model)[m][0] for m in methods]
    for ax, metric in zip(axes, metrics):
        ax.bar(methods, wide.loc[metric].to_numpy(dtype=float), color=colours)
        definition = definition_of(metric)
        ax.set_title(metric + (definition.arrow if definition is not None else ""), fontsize=10)
    if has_de:
        ax = axes[-1]
        ax.bar(methods, wide.loc["de_nsig_counts_pred"].to_numpy(dtype=float), color=colours)
        if "de_nsig_counts_real" in wide.index:
            ax.axhline(float(np.nanmean(wide.loc["de_nsig_counts_real"])), color="k", linestyle="--", linewidth=1)
        ax.set_title("DE genes per condition", fontsize=10)
    for ax in axes:
        if ax.get_ylim()[0] < 0 and all(bar.get_height() >= 0 for bar in ax.patches):
            ax.set_ylim(bottom=0)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return fig


def loss(history: pd.DataFrame) -> Figure:
    """Training curves (left) and ``val*`` curves (right, when measured); every numeric column but step and lr."""
    if "step" not in history.columns:
        raise InputError(f"loss_history needs a 'step' column; it has {', '.join(map(str, history.columns))}.")
    numeric = [c for c in history.columns if c not in ("step", "lr") and pd.api.types.is_numeric_dtype(history[c])]
    val = [c for c in numeric if str(c).startswith("val") and history[c].notna().any()]
    train = [c for c in numeric if c not in val and history[c].notna().any()]
    fig, axes = grid(1 + bool(val), 2, (5.5, 3.4))
    for ax, columns, name in zip(axes, (train, val), ("training", "validation")):
        for column in columns:
            points = history[["step", column]].dropna()
            ax.plot(points.step, points[column], label=str(column), marker="o" if len(points) < 30 else None)
        values = history[columns].to_numpy(dtype=float)
        if columns and np.nanmin(values) > 0 and np.nanmax(values) > 10 * np.nanmin(values):
            ax.set_yscale("log")  # only where values span more than a factor of 10
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if columns:
            ax.legend(fontsize=8)
    return fig


def _delta(paired: PairedData, side: str, condition: EvaluatedCondition) -> np.ndarray:
    """Per-gene mean of ``condition`` minus its own control mean, on the ``pred`` or ``real`` side."""
    cells = getattr(paired, side)
    return cells.cells(condition).mean(0) - cells.control(condition.context).mean(0)


def deltas(paired: Mapping[str, PairedData], conditions: Sequence[EvaluatedCondition], model: str) -> Figure:
    """Per condition: every method's predicted per-gene delta against the real one, with Pearson r."""
    fig, axes = grid(len(conditions), PANELS_PER_ROW, PANEL)
    look = styles(list(paired), model)
    real_side = paired[model]
    for ax, condition in zip(axes, conditions):
        real = _delta(real_side, "real", condition)
        predicted = {m: _delta(p, "pred", condition) for m, p in paired.items()}
        low = float(min(real.min(), *(d.min() for d in predicted.values())))
        high = float(max(real.max(), *(d.max() for d in predicted.values())))
        ax.plot([low, high], [low, high], color="#999", linewidth=1, linestyle=":")
        for method, pred in sorted(predicted.items(), key=lambda item: item[0] == model):  # the model on top
            colour, marker = look[method]
            r = np.corrcoef(real, pred)[0, 1] if real.std() > 0 and pred.std() > 0 else np.nan
            ax.scatter(real, pred, s=10 if method == model else 7, alpha=0.7 if method == model else 0.45,
                       color=colour, marker=marker, linewidths=0, label=f"{method} (r = {r:.2f})")
        ax.set_title(condition.name, fontsize=11)
        ax.set_xlabel("real delta (mean minus control mean)", fontsize=9)
        ax.set_ylabel("predicted delta", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8, markerscale=1.8, loc="upper left")
    return fig


def pca(
    paired: Mapping[str, PairedData],
    conditions: Sequence[EvaluatedCondition],
    model: str,
    seed: int,
    per_group: int = 300,
) -> Figure:
    """Per condition: PCA fitted on the real perturbed and control cells; every method's cells projected."""
    fig, axes = grid(len(conditions), PANELS_PER_ROW, PANEL)
    look = styles(list(paired), model)
    rng = np.random.default_rng(seed)
    real_side = paired[model].real
    for ax, condition in zip(axes, conditions):
        control = subsample(real_side.control(condition.context), per_group, rng)
        real = subsample(real_side.cells(condition), per_group, rng)
        fitted = PCA(n_components=2, svd_solver="randomized", random_state=seed).fit(np.vstack([real, control]))
        groups = [("control (real)", control, CONTROL_COLOUR, "o"), ("real", real, REAL_COLOUR, "o")]
        baselines = [m for m in paired if m != model]
        for method in [*baselines, model]:  # the model drawn last, on top
            colour, marker = look[method]
            groups.append((method, subsample(paired[method].pred.cells(condition), per_group, rng), colour, marker))
        for label, cells, colour, marker in groups:
            xy = fitted.transform(cells)
            ax.scatter(xy[:, 0], xy[:, 1], s=9, alpha=0.55, color=colour, marker=marker, label=label, linewidths=0)
        ax.set_title(condition.name, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("PC1", fontsize=9)
        ax.set_ylabel("PC2", fontsize=9)
        ax.legend(fontsize=8, markerscale=1.8, loc="best")
    return fig
