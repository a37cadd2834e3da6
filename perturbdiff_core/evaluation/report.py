"""``report.html``: one self-contained page comparing the model with its baselines.

Images are PNGs embedded as base64, so the single file opens offline in any browser and moves
as one piece; it is written atomically. Plots (matplotlib, drawn without pyplot so no global
backend is touched): per-metric bars for every method, the training loss curve, and for the
model per held-out condition the predicted vs real per-gene delta and a PCA of real, predicted
and control cells. Then the one-line verdict against the best baseline, the table of aggregate
metrics with the best method per row marked, and what each metric means.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from ..data.anndata_io import read_anndata
from ..errors import InputError
from ..io import atomic_write_text
from ..names import REPORT_FILE
from .compare import aggregate, best_methods, definition_of, summary_line
from .definitions import DEFINITIONS
from .distribution import subsample
from .pairing import Condition, PairedData, pair_anndata


#: Metrics drawn as bars (those present, in this order); ``{kernel}`` matches any kernel name.
KEY_METRICS = (
    "pearson_delta",
    "mse",
    "mse_delta",
    "spearman_lfc",
    "overlap_at_N",
    "de_direction_match",
    "de_sig_genes_recall",
    "discrimination_score_l1",
    "pearson_edistance",
    "mmd2_{kernel}",
    "variability_mmd2_{kernel}_ratio",
    "zero_fraction_mae",
    "detected_genes_ratio",
    "library_size_ks",
    "population_coverage",
)

#: Colour of the model; baselines take the following ones.
MODEL_COLOUR = "#1f77b4"
BASELINE_COLOURS = ("#7f7f7f", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 1.5rem 2rem 4rem; background: #fff; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.meta { color: #666; margin-top: 0; }
.summary { background: #eef5fb; border-left: 4px solid #1f77b4; padding: 0.7rem 1rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.7rem; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, td.family { text-align: left; }
thead th { border-bottom: 2px solid #bbb; position: sticky; top: 0; background: #fff; }
td.best { background: #d9f0d3; font-weight: 600; }
th.model { color: #1f77b4; }
td.family { color: #888; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
dt { font-family: ui-monospace, monospace; font-weight: 600; margin-top: 0.5rem; }
dd { margin-left: 1.5rem; }
ul.notes li { color: #555; }
"""


def write_report(
    run_dir: str | os.PathLike[str],
    metrics: pd.DataFrame,
    *,
    predictions: Mapping[str, ad.AnnData | str | os.PathLike[str]],
    real: ad.AnnData | str | os.PathLike[str],
    perturbation_key: str = "perturbation",
    control_label: str = "control",
    cell_type_key: str | None = None,
    loss_history: pd.DataFrame | None = None,
    title: str = "perturbdiff report",
    model: str = "model",
    max_conditions: int = 12,
    seed: int = 0,
) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Args:
        metrics: the long table of :func:`~perturbdiff_core.evaluation.compare.compare` (or
            ``evaluate``); its ``attrs["notes"]`` are listed when present.
        predictions: method name -> predicted AnnData (or path); ``model`` must be one of them,
            the others are the baselines.
        real: the real cells of the same conditions with their controls.
        loss_history: training log (``train_log.csv``) with a ``step`` column; every other numeric
            column but ``lr`` is drawn, ``val*`` columns (NaN where not measured) in their own panel.
        max_conditions: the per-condition plots show the first this many conditions.
        seed: seed of the cell subsampling and of the PCA.
    """
    if model not in predictions:
        raise InputError(
            f"No prediction named {model!r} among {', '.join(predictions) or 'none'}; the report draws the "
            f"model's cells, so pass it in predictions (or name the model with model=...)."
        )
    if max_conditions < 1:
        raise InputError(f"max_conditions must be at least 1, got {max_conditions}.")
    wide = aggregate(metrics)
    paired = pair_anndata(
        read_anndata(predictions[model]),
        read_anndata(real),
        perturbation_key=perturbation_key,
        control_label=control_label,
        cell_type_key=cell_type_key,
    )
    body = (
        f"<h1>{html.escape(title)}</h1><p class='meta'>{_meta(paired, wide, model)}</p>"
        f"<p class='summary'>{html.escape(summary_line(metrics, model))}</p>"
        + "".join(_section(h, c) for h, c in _sections(wide, paired, model, loss_history, max_conditions, seed))
    )
    notes = metrics.attrs.get("notes", [])
    if notes:
        body += _section("Notes", "<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body += _section("Metric definitions", _definitions(wide.index))
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )
    path = Path(run_dir) / REPORT_FILE
    atomic_write_text(path, page)
    return path


# ------------------------------------------------------------------------------------ html


def _meta(paired: PairedData, wide: pd.DataFrame, model: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    methods = html.escape(", ".join(map(str, wide.columns)))
    n = len(paired.conditions)
    return (
        f"{n} condition{'s' if n != 1 else ''} &middot; methods: {methods} &middot; "
        f"model: <b>{html.escape(model)}</b> &middot; {stamp}"
    )


def _sections(
    wide: pd.DataFrame,
    paired: PairedData,
    model: str,
    loss_history: pd.DataFrame | None,
    max_conditions: int,
    seed: int,
) -> list[tuple[str, str]]:
    """``(heading, HTML)`` of the bars, the table, the loss curve and the per-condition plots."""
    shown = paired.conditions[:max_conditions]
    more = f" (the first {len(shown)} of {len(paired.conditions)})" if len(shown) < len(paired.conditions) else ""
    who = html.escape(model)
    bars = _bars(wide, model)
    return [
        (
            "Metrics by method",
            _figure(bars, "Mean over conditions; arrows say which way is better; DE genes: the dashed line is real.")
            if bars is not None
            else "<p>None of the key metrics is in the table.</p>",
        ),
        ("Aggregate metrics", _table(wide, model)),
        (
            "Training loss",
            _figure(_loss(loss_history), "Training loss per step, validation where measured.")
            if loss_history is not None
            else "<p>No training history: these predictions were evaluated without a training run.</p>",
        ),
        (
            "Predicted vs real delta",
            _figure(_deltas(paired, shown), f"Per-gene mean minus own control mean, {who} against real{more}."),
        ),
        (
            "PCA of real, predicted and control cells",
            _figure(
                _pca(paired, shown, np.random.default_rng(seed), seed),
                f"PCA fitted on the real perturbed and control cells of each condition; {who}'s cells "
                f"projected onto it{more}.",
            ),
        ),
    ]


def _section(heading: str, content: str) -> str:
    return f"<section><h2>{html.escape(heading)}</h2>{content}</section>"


def _figure(fig: Figure, caption: str) -> str:
    """``<figure>`` with the figure as an embedded PNG (``caption`` is HTML)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _class(name: str, applies: bool) -> str:
    return f" class='{name}'" if applies else ""


def _format(value: float) -> str:
    return "&ndash;" if not np.isfinite(value) else f"{value:.4g}"


def _table(wide: pd.DataFrame, model: str) -> str:
    """Aggregate metrics, one row per metric, the best method of each row marked."""
    head = "".join(f"<th{_class('model', m == model)}>{html.escape(str(m))}</th>" for m in wide.columns)
    rows = []
    for metric, values in wide.iterrows():
        best = best_methods(values, str(metric))
        definition = definition_of(str(metric))
        family, direction = (definition.family, definition.direction) if definition is not None else ("", "")
        cells = "".join(f"<td{_class('best', m in best)}>{_format(v)}</td>" for m, v in values.items())
        rows.append(
            f"<tr><td>{html.escape(str(metric))}</td><td class='family'>{html.escape(family)}</td>"
            f"<td class='family'>{direction}</td>{cells}</tr>"
        )
    return (
        "<p>Mean over conditions; green marks the method closest to the metric's best value.</p>"
        f"<table><thead><tr><th>metric</th><th>family</th><th>direction</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _definitions(metrics: Sequence[str]) -> str:
    items = []
    for metric in metrics:
        definition = definition_of(str(metric))
        if definition is not None:
            items.append(f"<dt>{html.escape(str(metric))}</dt><dd>{html.escape(definition.definition)}</dd>")
    return f"<dl>{''.join(items)}</dl>"


# ----------------------------------------------------------------------------------- plots


def _grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure with ``n`` axes in rows of ``ncols`` (unused axes hidden)."""
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _colours(methods: Sequence[str], model: str) -> list[str]:
    baselines = iter(BASELINE_COLOURS * (1 + len(methods) // len(BASELINE_COLOURS)))
    return [MODEL_COLOUR if m == model else next(baselines) for m in methods]


def _key_metrics(wide: pd.DataFrame) -> list[str]:
    """The :data:`KEY_METRICS` in the table with a value for some method, in that order."""
    return [
        str(m)
        for key in KEY_METRICS
        for m in wide.index
        if definition_of(str(m)) is DEFINITIONS[key] and wide.loc[m].notna().any()
    ]


def _bars(wide: pd.DataFrame, model: str) -> Figure | None:
    """One bar chart per key metric and one of the numbers of DE genes, a bar per method."""
    metrics = _key_metrics(wide)
    has_de = "de_nsig_counts_pred" in wide.index
    if not metrics and not has_de:
        return None
    fig, axes = _grid(len(metrics) + has_de, 4, (3.2, 2.6))
    methods = [str(m) for m in wide.columns]
    colours = _colours(methods, model)
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


def _loss(history: pd.DataFrame) -> Figure:
    """Training curves (left) and ``val*`` curves (right, when measured); every numeric column but step and lr."""
    if "step" not in history.columns:
        raise InputError(f"loss_history needs a 'step' column; it has {', '.join(map(str, history.columns))}.")
    numeric = [c for c in history.columns if c not in ("step", "lr") and pd.api.types.is_numeric_dtype(history[c])]
    val = [c for c in numeric if str(c).startswith("val") and history[c].notna().any()]
    train = [c for c in numeric if c not in val and history[c].notna().any()]
    fig, axes = _grid(1 + bool(val), 2, (5.5, 3.4))
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


def _deltas(paired: PairedData, conditions: Sequence[Condition]) -> Figure:
    """Per condition: predicted against real per-gene delta (mean minus own control mean)."""
    fig, axes = _grid(len(conditions), 4, (3.0, 3.0))
    for ax, condition in zip(axes, conditions):
        pred = paired.pred.cells(condition).mean(0) - paired.pred.control(condition.cell_type).mean(0)
        real = paired.real.cells(condition).mean(0) - paired.real.control(condition.cell_type).mean(0)
        low, high = float(min(pred.min(), real.min())), float(max(pred.max(), real.max()))
        ax.plot([low, high], [low, high], color="#bbb", linewidth=1)
        ax.scatter(real, pred, s=4, alpha=0.5, color=MODEL_COLOUR, linewidths=0)
        r = np.corrcoef(real, pred)[0, 1] if real.std() > 0 and pred.std() > 0 else np.nan
        ax.set_title(f"{condition.name}\nr = {r:.3f}", fontsize=9)
        ax.set_xlabel("real delta", fontsize=8)
        ax.set_ylabel("predicted delta", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


def _pca(
    paired: PairedData, conditions: Sequence[Condition], rng: np.random.Generator, seed: int, per_group: int = 300
) -> Figure:
    """Per condition: PCA of the real perturbed and control cells, predicted cells projected."""
    fig, axes = _grid(len(conditions), 4, (3.0, 3.0))
    for ax, condition in zip(axes, conditions):
        control = subsample(paired.real.control(condition.cell_type), per_group, rng)
        real = subsample(paired.real.cells(condition), per_group, rng)
        pred = subsample(paired.pred.cells(condition), per_group, rng)
        pca = PCA(n_components=2, svd_solver="randomized", random_state=seed).fit(np.vstack([real, control]))
        for cells, label, colour in (
            (control, "control", "#bbbbbb"),
            (real, "real", "#d62728"),
            (pred, "predicted", MODEL_COLOUR),
        ):
            xy = pca.transform(cells)
            ax.scatter(xy[:, 0], xy[:, 1], s=5, alpha=0.6, color=colour, label=label, linewidths=0)
        ax.set_title(condition.name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("PC1", fontsize=8)
        ax.set_ylabel("PC2", fontsize=8)
    axes[0].legend(fontsize=7, markerscale=2)
    return fig
