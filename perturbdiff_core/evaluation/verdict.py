"""The model's results in a few sentences: where it beats the best baseline, where it loses, where it
is worse than predicting no change (the ``control`` baseline), and how many DE genes it calls.

:func:`verdict` reads the aggregate (``__all__``) rows of a metrics table. A metric's "better"
follows its definition (:data:`~perturbdiff_core.evaluation.definitions.DEFINITIONS`): closer to
its best value. Numbers are printed with three significant digits, as a reader compares them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pandas as pd

from ..names import ALL_CONDITIONS, MODEL
from .compare import aggregate, definition_of, versus_best_baseline

#: The baseline that predicts no change: the control cells themselves.
NO_CHANGE = "control"
#: Metrics named with their numbers in a sentence before it says "and N more".
NAMED = 6


class Sentence(NamedTuple):
    """One sentence of the verdict and what it says: ``wins``, ``losses``, ``ties``, ``worse_than_no_change``,
    ``better_than_no_change``, ``de_counts`` or ``no_baseline`` (the report styles a warning by it)."""

    kind: str
    text: str


def _number(value: float) -> str:
    return "NaN" if not math.isfinite(value) else f"{value:.3g}"


def _listing(items: list[str], shown: int = NAMED) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _gap(value: float, metric: str) -> float | None:
    """``value``'s shortfall from the best value (:meth:`MetricDefinition.gap`); ``None`` without a direction or
    a value."""
    definition = definition_of(metric)
    if definition is None or definition.best is None or not math.isfinite(value):
        return None
    return float(definition.gap(value))


def worse_than(metrics: pd.DataFrame, baseline: str = NO_CHANGE, model: str = MODEL) -> pd.DataFrame:
    """The directional metrics where ``model`` is further from the best value than ``baseline``
    (columns ``metric, model, baseline_value``), ties (to 1e-9) excluded; empty without that baseline."""
    wide = aggregate(metrics)
    rows = []
    if baseline in wide.columns and model in wide.columns:
        for metric, values in wide.iterrows():
            mine, theirs = _gap(float(values[model]), str(metric)), _gap(float(values[baseline]), str(metric))
            if mine is not None and theirs is not None and not math.isclose(mine, theirs, rel_tol=1e-9, abs_tol=1e-12):
                if mine > theirs:
                    rows.append((str(metric), float(values[model]), float(values[baseline])))
    return pd.DataFrame(rows, columns=["metric", "model", "baseline_value"])


def verdict(metrics: pd.DataFrame, model: str = MODEL) -> list[Sentence]:
    """Sentences on ``model``'s results against its baselines (see the module docstring)."""
    wide = aggregate(metrics)
    who = "The model" if model == MODEL else f"The model ({model})"
    table = versus_best_baseline(metrics, model)
    if table.empty:
        return [Sentence("no_baseline", f"{who} has no baseline to compare with on any metric.")]
    beats, loses, ties = (table[table.outcome == o] for o in ("beats", "loses", "ties"))

    def against(rows: pd.DataFrame) -> list[str]:
        return [f"{r.metric} ({_number(r.model)} against {_number(r.baseline_value)}, {r.baseline})" for r in rows.itertuples()]

    sentences = [
        Sentence(
            "wins",
            f"{who} beats the best baseline on {len(beats)} of {len(table)} metrics"
            + (f": {_listing(against(beats))}." if len(beats) else "."),
        )
    ]
    if len(loses):
        sentences.append(Sentence("losses", f"It loses on {len(loses)}: {_listing(against(loses))}."))
    if len(ties):
        sentences.append(Sentence("ties", f"It ties on {_listing(list(ties.metric))}."))
    if NO_CHANGE in wide.columns and NO_CHANGE != model:
        worse = worse_than(metrics, NO_CHANGE, model)
        if len(worse):
            items = [f"{r.metric} ({_number(r.model)} against {_number(r.baseline_value)})" for r in worse.itertuples()]
            sentences.append(
                Sentence(
                    "worse_than_no_change",
                    f"It is worse than predicting no change (the {NO_CHANGE} baseline: the control cells as they "
                    f"are) on {len(worse)} metric{'s' if len(worse) != 1 else ''}: {', '.join(items)}.",
                )
            )
        else:
            sentences.append(
                Sentence("better_than_no_change", f"It is better than predicting no change (the {NO_CHANGE} baseline) on every metric.")
            )
    if {"de_nsig_counts_pred", "de_nsig_counts_real"} <= set(wide.index):
        called, real = float(wide.loc["de_nsig_counts_pred", model]), float(wide.loc["de_nsig_counts_real", model])
        n_conditions = metrics.loc[metrics.condition != ALL_CONDITIONS, "condition"].nunique()
        per = " per condition (mean)" if n_conditions > 1 else ""
        sentences.append(Sentence("de_counts", f"It calls {_number(called)} DE genes{per} against {_number(real)} real."))
    return sentences
