"""Metrics of predicted against real perturbation responses, per condition and aggregated.

Families: pseudobulk (means and deltas), differential expression (Wilcoxon, BH FDR),
perturbation discrimination, distribution (kernel MMD), population variability and realism
(sparsity, detected genes and library size of the predicted cells). Metric names follow
cell-eval where the definitions match; :data:`DEFINITIONS` documents each one and every
difference from cell-eval. :func:`compare` evaluates the model and its baselines into one
table; :func:`~perturbdiff_core.evaluation.report.write_report` (imported from its module, it
needs matplotlib) draws it as ``report.html``.
"""

from __future__ import annotations

from .compare import aggregate, best_methods, compare, definition_of, summary_line, versus_best_baseline
from .de import DEResult, de_metrics, wilcoxon_de
from .definitions import DEFINITIONS, MetricDefinition
from .discrimination import discrimination_scores
from .distribution import population_variability
from .metrics import ALL_CONDITIONS, COLUMNS, evaluate
from .paired import EvaluatedCondition, PairedData, pair_anndata
from .pseudobulk import log2_fold_change, pseudobulk_metrics
from .realism import realism_metrics

__all__ = [
    "ALL_CONDITIONS",
    "COLUMNS",
    "DEFINITIONS",
    "EvaluatedCondition",
    "DEResult",
    "MetricDefinition",
    "PairedData",
    "aggregate",
    "best_methods",
    "compare",
    "de_metrics",
    "definition_of",
    "discrimination_scores",
    "evaluate",
    "log2_fold_change",
    "pair_anndata",
    "population_variability",
    "pseudobulk_metrics",
    "realism_metrics",
    "summary_line",
    "versus_best_baseline",
    "wilcoxon_de",
]


def __getattr__(name: str) -> type[EvaluatedCondition]:
    """``Condition``, the old name of :class:`EvaluatedCondition`, with the warning of :mod:`.paired`."""
    if name == "Condition":
        from . import paired

        return paired.Condition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
