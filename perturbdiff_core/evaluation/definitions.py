"""What every metric of :func:`~perturbdiff_core.evaluation.evaluate` means, and how it relates to cell-eval.

``cell_eval`` is ``"same"`` where the value agrees with cell-eval 0.8 to 1e-6 on the same files
(checked by ``test_agrees_with_cell_eval`` in ``tests/test_metrics_evaluate.py``), ``""`` where cell-eval has no such metric,
or the reason it differs. Differences common to every ``"same"`` metric, by design:

- cell-eval casts DE tables to float32 before thresholding FDRs and ranking fold changes; we
  keep float64. Results differ only when two values coincide in float32 but not in float64.
- With a cell-type key, each condition is compared with the control cells of its own cell
  type and discrimination ranks a condition among the conditions of its cell type (cell-eval
  knows a single perturbation column: the same as running it once per cell type);
  ``pearson_edistance`` and ``de_spearman_sig`` pool all conditions.
- Where a row ties exactly, discrimination counts strictly closer conditions only (cell-eval's
  position in an argsort).
- The ``__all__`` row is the mean over conditions skipping NaN; cell-eval's aggregate skips
  missing values but not NaN (a NaN ``pr_auc`` of a condition without real DE genes makes its
  mean NaN).
- cell-eval reports ``pearson_edistance`` and ``de_spearman_sig`` (defined across conditions)
  on every condition's row; we report them once, in the ``__all__`` row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import pandas as pd

#: A value to compare: one number, or one per method.
Value = TypeVar("Value", float, pd.Series)


@dataclass(frozen=True)
class MetricDefinition:
    """One metric: its family, the best value (``None``: no direction), its definition, cell-eval.

    ``target`` marks a metric whose best value lies inside its range (a ratio best at 1), so
    "better" means closer to ``best`` from either side.
    """

    family: str
    best: float | None
    definition: str
    cell_eval: str
    target: bool = False

    @property
    def direction(self) -> str:
        """``higher is better``, ``lower is better``, ``closest to <best>`` (a ratio), or ``""``."""
        if self.best is None:
            return ""
        if self.best == 0.0:
            return "lower is better"
        if self.target:
            return f"closest to {self.best:g}"
        return "higher is better"

    def gap(self, value: Value) -> Value:
        """How far ``value`` (a float or a pandas Series) falls short of the best value in the metric's direction.

        ``|value - best|`` for a target metric, else signed: an estimate past its best value, such as an
        unbiased MMD^2 below 0, counts as closer, since two methods' estimates on the same real cells differ
        by an unbiased estimate of their true difference (the real cells' own term cancels).
        """
        if self.best is None:
            raise ValueError("a metric without a best value has no gap")
        if self.target:
            return abs(value - self.best)
        return value - self.best if self.best == 0.0 else self.best - value

    @property
    def arrow(self) -> str:
        """The direction as a short suffix for plot titles: `` ↑``, `` ↓``, `` (best <best>)`` or ``""``."""
        if self.best is None:
            return ""
        return {"higher is better": " \u2191", "lower is better": " \u2193"}.get(self.direction, f" (best {self.best:g})")


def _define() -> dict[str, MetricDefinition]:
    same = "same"
    d: dict[str, MetricDefinition] = {
        "pearson_delta": MetricDefinition(
            "pseudobulk", 1.0, "Pearson r over genes of predicted vs real delta (mean minus own control mean); NaN "
            "where the predicted delta is the same for every gene (no change, as the control baseline predicts). "
            "Where the real change is weak next to the control cells' sampling noise, that shared reference's "
            "noise dominates: cells drawn apart from those control cells score well without predicting a change.",
            same,
        ),
        "mse": MetricDefinition("pseudobulk", 0.0, "Mean over genes of squared error of the log1p means.", same),
        "mae": MetricDefinition("pseudobulk", 0.0, "Mean over genes of absolute error of the log1p means.", same),
        "mse_delta": MetricDefinition("pseudobulk", 0.0, "Mean squared error of the deltas.", same),
        "mae_delta": MetricDefinition("pseudobulk", 0.0, "Mean absolute error of the deltas.", same),
        "r2": MetricDefinition(
            "pseudobulk",
            1.0,
            "Coefficient of determination of the real means by the predicted means, over genes: "
            "1 - sum (pred - real)^2 / sum (real - mean real)^2.",
            "",
        ),
        "spearman_lfc": MetricDefinition(
            "pseudobulk",
            1.0,
            "Spearman rho over all genes of predicted vs real log2 fold change of geometric means "
            "(pdex's: log2(expm1(mean)/expm1(control mean)), 0/0 = 0); NaN where the predicted one is the same "
            "for every gene (no change). Both fold changes divide by the same control cells, so over the many "
            "barely detected genes it rewards a prediction that does not carry their sampling noise: cells drawn "
            "apart from those control cells score well without predicting any change.",
            "",
        ),
    }
    for k in ("N", "50", "100", "200", "500"):
        size = "the number of real DE genes" if k == "N" else f"min({k}, number of real DE genes)"
        d[f"overlap_at_{k}"] = MetricDefinition(
            "de",
            1.0,
            f"|real top-k & predicted top-k| / k with k = {size}; DE genes (Wilcoxon vs control, BH FDR < 0.05) "
            "ranked by |log2 fold change|; 0 when k = 0.",
            same,
        )
        size = "the number of predicted DE genes" if k == "N" else f"min({k}, number of predicted DE genes)"
        d[f"precision_at_{k}"] = MetricDefinition(
            "de",
            1.0,
            f"|real top-k & predicted top-k| / k with k = {size} (both lists cut at k, as cell-eval does); "
            "0 when k = 0.",
            same,
        )
    d |= {
        "de_direction_match": MetricDefinition(
            "de", 1.0, "Fraction of real DE genes whose predicted fold change has the same sign.", same
        ),
        "de_spearman_lfc_sig": MetricDefinition(
            "de", 1.0, "Spearman rho of real vs predicted log2 fold changes over the real DE genes.", same
        ),
        "de_sig_genes_recall": MetricDefinition(
            "de", 1.0, "Fraction of real DE genes that are also DE in the prediction.", same
        ),
        "de_nsig_counts_real": MetricDefinition("de", None, "Number of real DE genes.", same),
        "de_nsig_counts_pred": MetricDefinition("de", None, "Number of predicted DE genes.", same),
        "pr_auc": MetricDefinition(
            "de",
            1.0,
            "Average precision of -log10(predicted FDR, floored at 1e-10) for the real DE genes; NaN when "
            "all or no genes are real DE genes.",
            same,
        ),
        "roc_auc": MetricDefinition("de", 1.0, "ROC AUC of the same scores and labels as pr_auc.", same),
        "de_spearman_sig": MetricDefinition(
            "de",
            1.0,
            "Across conditions (only in the __all__ row): Spearman rho of the numbers of real and "
            "predicted DE genes, over conditions with at least one real DE gene (1 if none).",
            same,
        ),
    }
    for dist in ("l1", "l2", "cosine"):
        d[f"discrimination_score_{dist}"] = MetricDefinition(
            "discrimination",
            1.0,
            f"1 - (number of real conditions whose delta is {dist}-closer to the predicted delta than the "
            "true one) / (number of conditions); target gene left out; 1 best, about 0.5 chance.",
            same,
        )
    d |= {
        "pearson_edistance": MetricDefinition(
            "distribution",
            1.0,
            "Across conditions (only in the __all__ row): Pearson r of the energy distances (V-statistic, "
            "Euclidean) condition-vs-control of the prediction and of the real data.",
            "same when no population exceeds max_cells (cell-eval never subsamples)",
        ),
        "mmd2_{kernel}": MetricDefinition(
            "distribution",
            0.0,
            "MMD^2 between the predicted and the real cells of the condition under the kernel plug-in "
            "(default energy: the energy distance) and estimator (default unbiased). The unbiased estimate can fall "
            "below 0; lower is better there too, since the real cells' own term is the same for every method "
            "(it assumes the predicted cells are drawn independently of the real ones: copies of them score far "
            "below 0).",
            "",
        ),
        "variability_mmd2_{kernel}_pred": MetricDefinition(
            "variability",
            None,
            "Mean MMD^2 over pairs of independently sampled predicted populations of the condition "
            "(labelled by the replicate key in the prediction).",
            "",
        ),
        "variability_mmd2_{kernel}_real": MetricDefinition(
            "variability", None, "Mean MMD^2 over pairs of real replicate populations (batches, donors).", ""
        ),
        "variability_mmd2_{kernel}_ratio": MetricDefinition(
            "variability",
            1.0,
            "pred / real of the two above: near 0 means one population every time, far above 1 more "
            "scattered than reality; NaN (with a note) with fewer than two populations on a side.",
            "",
            target=True,
        ),
        "calibration_pvalue": MetricDefinition(
            "calibration",
            0.5,
            "Conformal p-value of the real population among K sampled predicted populations: (1 + number of "
            "predicted populations at least as far from the centre of the others as the real one) / (K + 1), "
            "distances MMD^2 under the evaluation kernel. Uniform (mean 0.5) when the real population is one "
            "more draw of the model's distribution over populations; near 0 when it lies outside their spread.",
            "",
            target=True,
        ),
        "population_coverage": MetricDefinition(
            "calibration",
            0.9,
            "Share of real populations (replicates, or the whole condition) whose calibration p-value exceeds "
            "0.1: 0.9 for a calibrated model, lower when it is overconfident; needs at least 10 predicted "
            "populations (perturbdiff predict --populations K).",
            "",
            target=True,
        ),
        "zero_fraction_mae": MetricDefinition(
            "realism",
            0.0,
            "Mean over genes of |predicted - real fraction of cells in which the gene is 0|.",
            "",
        ),
        "detected_genes_ratio": MetricDefinition(
            "realism",
            1.0,
            "Median number of non-zero genes per predicted cell over the same median of the real cells.",
            "",
            target=True,
        ),
        "library_size_ks": MetricDefinition(
            "realism",
            0.0,
            "Kolmogorov-Smirnov statistic between the predicted and real distributions of total expression "
            "per cell (row sums of the input-space values).",
            "",
        ),
    }
    return d


#: Metric name (``{kernel}`` stands for the kernel name) -> its definition.
DEFINITIONS: dict[str, MetricDefinition] = _define()
