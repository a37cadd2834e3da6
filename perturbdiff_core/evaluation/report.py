"""``report.html``: one self-contained page saying what was run and how the model did against its baselines.

Images are PNGs embedded as base64, so the single file opens offline in any browser and moves
as one piece; it is written atomically. From the top:

- what was run (data, held-out conditions, kernel, estimator, anchor, steps, seed, config, commit);
- the verdict in sentences (:func:`~perturbdiff_core.evaluation.verdict.verdict`): wins and losses
  against the best baseline, where the model is worse than predicting no change, DE genes called;
- bars of the key metrics per method, then the table of every aggregate metric (it scrolls
  sideways when wide; rows equal for every method or NaN for every method are listed below it
  instead), realism and calibration;
- the top real DE genes of each condition with their real and predicted fold changes;
- per condition, every method's predicted per-gene delta against the real one, and a PCA of the
  real, control, model and baseline cells; the training loss; notes; what each metric means.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..data.anndata_io import read_anndata
from ..errors import InputError
from ..io import atomic_write_text
from ..names import REPORT_FILE
from . import report_plots as plots
from .compare import aggregate, best_methods, definition_of
from .de import FDR_THRESHOLD, top_de_genes, wilcoxon_de
from .definitions import DEFINITIONS
from .paired import EvaluatedCondition, PairedData, pair_anndata
from .verdict import verdict

__all__ = ["REPORT_FILE", "KEY_METRICS", "write_report"]

#: Metrics drawn as bars (those present, in this order); ``{kernel}`` matches any kernel name.
KEY_METRICS = (
    "pearson_delta",
    "mse",
    "mse_delta",
    "spearman_lfc",
    "overlap_at_N",
    "de_direction_match",
    "de_sig_genes_recall",
    "pr_auc",
    "discrimination_score_l1",
    "pearson_edistance",
    "mmd2_{kernel}",
    "variability_mmd2_{kernel}_ratio",
    "zero_fraction_mae",
    "detected_genes_ratio",
    "library_size_ks",
    "calibration_pvalue",
    "population_coverage",
)

#: Families of the "Realism and calibration" section.
CELL_FAMILIES = ("realism", "calibration")
#: var columns that hold gene symbols (scanpy's, CELLxGENE's, 10x's names), the first found labels IDs in the report.
SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "symbol", "gene_name", "gene_names", "feature_name")
#: Real DE genes listed per condition, and conditions with such a list.
TOP_GENES = 10
DE_CONDITIONS = 4

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 1.5rem 2rem 4rem; background: #fff; box-sizing: border-box; }
h1 { margin-bottom: 0.2rem; overflow-wrap: anywhere; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.meta { color: #666; margin-top: 0; }
dl.facts { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 0.15rem 1.2rem; margin: 1rem 0;
           background: #f6f6f6; padding: 0.7rem 1rem; border-radius: 4px; }
dl.facts dt { font-weight: 600; color: #555; margin: 0; font-family: inherit; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 0.9rem; }
ul.verdict { background: #eef5fb; border-left: 4px solid #1f77b4; padding: 0.7rem 1rem 0.7rem 2rem; }
ul.verdict li { margin: 0.25rem 0; }
ul.verdict li.warning { color: #a40000; font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.7rem; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, td.text { text-align: left; }
thead th { border-bottom: 2px solid #bbb; background: #fff; }
td.best { background: #d9f0d3; font-weight: 600; }
td.miss { color: #a40000; }
th.model { color: #1f77b4; }
td.family { color: #888; text-align: left; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
dl.defs dt { font-family: ui-monospace, monospace; font-weight: 600; margin-top: 0.5rem; }
dl.defs dd { margin-left: 1.5rem; }
p.note, ul.notes li { color: #555; }
h3 { margin-bottom: 0.3rem; }
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
    context_keys: Sequence[str] = (),
    dose_key: str | None = None,
    loss_history: pd.DataFrame | None = None,
    title: str = "perturbdiff report",
    model: str = "model",
    max_conditions: int = 12,
    seed: int = 0,
    run_info: Mapping[str, str] | None = None,
) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    Args:
        metrics: the long table of :func:`~perturbdiff_core.evaluation.compare.compare` (or
            ``evaluate``); its ``attrs["notes"]`` are listed when present.
        predictions: method name -> predicted AnnData (or path); ``model`` must be one of them,
            the others are the baselines (drawn beside the model).
        real: the real cells of the same conditions with their controls.
        perturbation_key, control_label, cell_type_key, context_keys, dose_key: what makes a condition, as
            :func:`~perturbdiff_core.evaluation.evaluate` reads them.
        loss_history: training log (``train_log.csv``) with a ``step`` column; every other numeric
            column but ``lr`` is drawn, ``val*`` columns (NaN where not measured) in their own panel.
        max_conditions: the per-condition plots show the first this many conditions.
        seed: seed of the cell subsampling and of the PCA.
        run_info: what was run, ``label -> text`` (see :func:`~perturbdiff_core.runs.provenance.run_facts`),
            shown at the top.
    """
    if model not in predictions:
        raise InputError(
            f"No prediction named {model!r} among {', '.join(predictions) or 'none'}; the report draws the "
            f"model's cells, so pass it in predictions (or name the model with model=...)."
        )
    if max_conditions < 1:
        raise InputError(f"max_conditions must be at least 1, got {max_conditions}.")
    wide = aggregate(metrics)
    real_data = read_anndata(real)
    keys = {
        "perturbation_key": perturbation_key, "control_label": control_label, "cell_type_key": cell_type_key,
        "context_keys": context_keys, "dose_key": dose_key,
    }
    paired = {m: pair_anndata(read_anndata(p), real_data, **keys) for m, p in predictions.items()}
    paired = {model: paired[model], **{m: p for m, p in paired.items() if m != model}}
    shown, kept, dropped = _split_rows(wide)
    conditions = paired[model].conditions
    body = (
        f"<h1>{html.escape(title)}</h1><p class='meta'>{_meta(conditions, wide, model)}</p>"
        + (_facts(run_info) if run_info else "")
        + _verdict(metrics, model)
        + "".join(
            _section(heading, content)
            for heading, content in _sections(
                wide[wide.index.isin(kept)], shown, dropped, paired, model, loss_history, max_conditions, seed,
                gene_labels(real_data.var),
            )
        )
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


# ------------------------------------------------------------------------------ table rows


def _same_everywhere(values: pd.Series) -> bool:
    """Every method has the same finite value (to 1e-9): the row tells no method from another."""
    finite = values.astype(float).to_numpy()
    return len(finite) > 1 and bool(np.all(np.isfinite(finite))) and bool(
        np.allclose(finite, finite[0], rtol=1e-9, atol=1e-12)
    )


def _split_rows(wide: pd.DataFrame) -> tuple[list[str], list[str], dict[str, str]]:
    """Bar metrics, table rows, and the rows left out of the table with the reason (all NaN, all equal)."""
    dropped: dict[str, str] = {}
    for metric, values in wide.iterrows():
        if values.isna().all():
            dropped[str(metric)] = "NaN for every method"
        elif _same_everywhere(values):
            dropped[str(metric)] = f"{float(values.iloc[0]):.4g} for every method"
    kept = [str(m) for m in wide.index if str(m) not in dropped]
    bars = [
        str(m)
        for key in KEY_METRICS
        for m in kept
        if definition_of(m) is DEFINITIONS[key] and wide.loc[m].notna().any()
    ]
    return bars, kept, dropped


# ------------------------------------------------------------------------------------ html


def _meta(conditions: Sequence[EvaluatedCondition], wide: pd.DataFrame, model: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    methods = html.escape(", ".join(map(str, wide.columns)))
    n = len(conditions)
    return (
        f"{n} condition{'s' if n != 1 else ''} &middot; methods: {methods} &middot; "
        f"model: <b>{html.escape(model)}</b> &middot; {stamp}"
    )


def _facts(info: Mapping[str, str]) -> str:
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in info.items())
    return f"<dl class='facts'>{items}</dl>"


def _verdict(metrics: pd.DataFrame, model: str) -> str:
    items = []
    for sentence in verdict(metrics, model):
        warning = sentence.kind == "worse_than_no_change"
        items.append(f"<li{_class('warning', warning)}>{html.escape(sentence.text)}</li>")
    return f"<ul class='verdict'>{''.join(items)}</ul>"


def gene_labels(var: pd.DataFrame) -> dict[str, str]:
    """Gene -> ``ID (SYMBOL)`` from the first of :data:`SYMBOL_COLUMNS` in ``var``, for genes whose symbol differs
    from their name (Ensembl IDs, say); empty when ``var`` has no such column."""
    column = next((c for c in SYMBOL_COLUMNS if c in var.columns), None)
    if column is None:
        return {}
    symbols = var[column].astype(str)
    return {str(g): f"{g} ({sym})" for g, sym in symbols.items() if sym not in ("", "nan", str(g))}


def _sections(
    wide: pd.DataFrame,
    bar_metrics: list[str],
    dropped: dict[str, str],
    paired: Mapping[str, PairedData],
    model: str,
    loss_history: pd.DataFrame | None,
    max_conditions: int,
    seed: int,
    labels: Mapping[str, str],
) -> list[tuple[str, str]]:
    """``(heading, HTML)`` of the bars, the tables, the DE genes and the plots."""
    conditions = paired[model].conditions
    shown = conditions[:max_conditions]
    more = f" (the first {len(shown)} of {len(conditions)})" if len(shown) < len(conditions) else ""
    who = html.escape(model)
    bars = plots.bars(wide, bar_metrics, model)
    return [
        (
            "Metrics by method",
            _figure(bars, "Mean over conditions; arrows say which way is better; DE genes: the dashed line is real.")
            if bars is not None
            else "<p>None of the key metrics is in the table.</p>",
        ),
        ("Aggregate metrics", _table(_without_cell_families(wide), model) + _dropped(dropped)),
        ("Realism and calibration", _cells_section(wide, model)),
        (f"Top {TOP_GENES} real DE genes, real against {who}", _de_genes(paired[model], model, labels)),
        (
            "Predicted vs real delta",
            _figure(
                plots.deltas(paired, shown, model),
                f"Per-gene mean minus own control mean, every method against real{more}; r is Pearson's; the "
                "dotted line is a perfect prediction.",
            ),
        ),
        (
            "PCA of real, control, model and baseline cells",
            _figure(
                plots.pca(paired, shown, model, seed),
                f"PCA fitted on the real perturbed and control cells of each condition; {who}'s and the "
                f"baselines' cells projected onto it{more}.",
            ),
        ),
        (
            "Training loss",
            _figure(plots.loss(loss_history), "Training loss per step, validation where measured.")
            if loss_history is not None
            else "<p>No training history: these predictions were evaluated without a training run.</p>",
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


def _table(wide: pd.DataFrame, model: str, *, caption: bool = True) -> str:
    """Aggregate metrics, one row per metric, the best method of each row marked; scrolls sideways when wide."""
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
        ("<p>Mean over conditions; green marks the method closest to the metric's best value.</p>" if caption else "")
        + f"<div class='scroll'><table><thead><tr><th>metric</th><th>family</th><th>direction</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _without_cell_families(wide: pd.DataFrame) -> pd.DataFrame:
    """``wide`` without the realism and calibration rows (they have their own section)."""
    keep = [(d := definition_of(str(m))) is None or d.family not in CELL_FAMILIES for m in wide.index]
    return wide[keep]


def _dropped(dropped: Mapping[str, str]) -> str:
    """The note on the rows left out of the table, grouped by reason."""
    if not dropped:
        return ""
    by_reason: dict[str, list[str]] = {}
    for metric, reason in dropped.items():
        by_reason.setdefault(reason, []).append(metric)
    parts = "; ".join(f"{', '.join(metrics)} ({reason})" for reason, metrics in by_reason.items())
    return f"<p class='note'>Left out of the table, since they tell no method from another: {html.escape(parts)}.</p>"


def _cells_section(wide: pd.DataFrame, model: str) -> str:
    """Realism (do the cells look like single cells?) and calibration (is the spread of the predictions right?)."""
    rows = [m for m in wide.index if (d := definition_of(str(m))) is not None and d.family in CELL_FAMILIES]
    text = (
        "<p>Realism: do the predicted cells look like single cells of the real population (zeros, detected "
        "genes, library sizes)? Calibration: does the real population fall among the model's independently "
        "sampled populations as often as it should?</p>"
    )
    if not any(definition_of(str(m)).family == "calibration" for m in rows):
        text += (
            "<p class='note'>No calibration metrics: the model drew one population per condition "
            "(set <code>sample.populations</code> to 10 or more, or <code>perturbdiff predict --populations K</code>).</p>"
        )
    if not rows:
        return text + "<p>No realism or calibration metric is in the table.</p>"
    return text + _table(wide.loc[rows], model, caption=False)


def _de_genes(paired: PairedData, model: str, labels: Mapping[str, str]) -> str:
    """Per condition (the first :data:`DE_CONDITIONS`), the most significant real DE genes with real and predicted fold
    changes; a gene shown by its ``labels`` entry where it has one (its symbol beside an ID)."""
    blocks = []
    conditions = paired.conditions[:DE_CONDITIONS]
    for condition in conditions:
        real_ctrl, pred_ctrl = paired.real.control(condition.context), paired.pred.control(condition.context)
        real = wilcoxon_de(paired.real.cells(condition), real_ctrl)
        pred = wilcoxon_de(paired.pred.cells(condition), pred_ctrl)
        n_real, n_pred = int((real.fdr < FDR_THRESHOLD).sum()), int((pred.fdr < FDR_THRESHOLD).sum())
        heading = (
            f"<h3>{html.escape(condition.name)}</h3><p>{html.escape(model)} calls {n_pred} DE genes against "
            f"{n_real} real (Wilcoxon against the control cells, BH FDR &lt; {FDR_THRESHOLD:g}).</p>"
        )
        top = top_de_genes(paired.genes, real, pred, k=TOP_GENES)
        if not top:
            blocks.append(heading + "<p class='note'>No real DE gene in this condition.</p>")
            continue
        rows = "".join(
            f"<tr><td>{html.escape(labels.get(gene, gene))}</td><td>{lfc_real:+.3f}</td><td>{_fdr(fdr_real)}</td>"
            f"<td{_class('miss', _opposite(lfc_real, lfc_pred))}>{lfc_pred:+.3f}</td><td>{_fdr(fdr_pred)}</td>"
            f"<td{_class('miss', not sig)}>{'yes' if sig else 'no'}</td></tr>"
            for gene, lfc_real, fdr_real, lfc_pred, fdr_pred, sig in top
        )
        blocks.append(
            heading + "<div class='scroll'><table><thead><tr><th>gene</th><th>real log2FC</th><th>real FDR</th>"
            f"<th>predicted log2FC</th><th>predicted FDR</th><th>DE in the prediction</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>"
        )
    more = len(paired.conditions) - len(conditions)
    if more > 0:
        blocks.append(f"<p class='note'>The first {len(conditions)} of {len(paired.conditions)} conditions.</p>")
    caption = (
        "<p>The most significant real DE genes (smallest FDR) with their log2 fold changes (of geometric means, as "
        "cell-eval) in the real cells and in the prediction; red: the prediction moves the gene the other way, or "
        "does not call it DE.</p>"
    )
    return caption + "".join(blocks)


def _fdr(value: float) -> str:
    return "&ndash;" if not math.isfinite(value) else f"{value:.2g}"


def _opposite(a: float, b: float) -> bool:
    return bool(np.sign(a) != np.sign(b))


def _definitions(metrics: Sequence[str]) -> str:
    items = []
    for metric in metrics:
        definition = definition_of(str(metric))
        if definition is not None:
            items.append(f"<dt>{html.escape(str(metric))}</dt><dd>{html.escape(definition.definition)}</dd>")
    return f"<dl class='defs'>{''.join(items)}</dl>"
