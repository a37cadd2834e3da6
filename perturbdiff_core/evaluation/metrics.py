"""Evaluate a prediction against real data: every metric, per condition and aggregated, in one table.

The table is long format with columns ``condition, metric, method, value``. The row
``condition == "__all__"`` holds the mean over conditions of each per-condition metric (NaN
skipped) and the metrics defined only across conditions (``pearson_edistance``,
``de_spearman_sig``). Why a value is NaN where that is not obvious (no real DE genes, a single
replicate) is listed in ``table.attrs["notes"]``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import anndata as ad
import numpy as np
import pandas as pd

from ..data.anndata_io import read_anndata
from ..errors import InputError
from ..mmd.estimators import MMDEstimator, as_estimator
from ..mmd.kernels import Kernel, as_kernel
from ..names import ALL_CONDITIONS
from ..progress import progress_bar
from .de import FDR_THRESHOLD, ControlRanks, DEResult, de_metrics, spearman_nsig
from .discrimination import DISTANCES, discrimination_scores
from .distribution import population_calibration, population_mmd2, population_variability, subsample
from .paired import EvaluatedCondition, PairedData, pair_anndata
from .pseudobulk import correlation, pseudobulk_metrics
from .realism import realism_metrics

#: Columns of the metrics table, in order.
COLUMNS = ("condition", "metric", "method", "value")
#: A real population is covered by the predicted ones when its calibration p-value exceeds this.
COVERAGE_LEVEL = 0.1
#: Fewest predicted populations whose smallest possible p-value, 1 / (K + 1), is below :data:`COVERAGE_LEVEL`.
MIN_CALIBRATION_POPULATIONS = 10
#: Real cells below which a condition's metrics get a note: its mean and DE test rest on very few cells.
FEW_REAL_CELLS = 10


def evaluate(
    pred: str | os.PathLike[str] | ad.AnnData,
    real: str | os.PathLike[str] | ad.AnnData,
    *,
    perturbation_key: str = "perturbation",
    control_label: str = "control",
    cell_type_key: str | None = None,
    context_keys: Sequence[str] = (),
    dose_key: str | None = None,
    replicate_key: str | None = None,
    method: str = "model",
    kernel: str | Kernel = "energy",
    kernel_name: str | None = None,
    estimator: str | MMDEstimator = "unbiased",
    max_cells: int = 1000,
    fdr_threshold: float = FDR_THRESHOLD,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """All metrics of a predicted against a real AnnData (log1p; paths or objects), long format.

    Args:
        pred, real: both hold the control cells and the same conditions on the same genes.
        perturbation_key, control_label: the obs column of perturbations and its control value.
        cell_type_key: optional obs column; a condition is then (cell type, perturbation).
        context_keys: further obs columns of the context (batch, covariates): each condition is compared with
            the control cells of its own cell type and values of these keys.
        dose_key: optional obs column of doses: a perturbation at each dose is its own condition, ``name@dose``.
        replicate_key: optional obs column of replicates (batch, donor) in the real data and of
            independently sampled populations in the prediction; enables population variability.
        method: the predictor's name in the ``method`` column.
        kernel, estimator: MMD plug-ins (names or instances) for the distribution metrics.
        kernel_name: what ``{kernel}`` stands for in metric names (``mmd2_{kernel}``); default
            the kernel's plug-in name, or the lower-case class name of an instance.
        max_cells: populations are subsampled to at most this many cells for the MMD metrics.
        fdr_threshold: BH FDR below which a gene is differentially expressed.
        seed: seed of the subsampling.
        progress: show the conditions done on stderr (:func:`~perturbdiff_core.progress.progress_bar`).

    Example:
        >>> table = evaluate("pred.h5ad", "real.h5ad", method="perturbdiff")  # doctest: +SKIP
        >>> table[table.condition == "__all__"].set_index("metric").value  # doctest: +SKIP
    """
    if max_cells < 2:
        raise InputError(f"max_cells must be at least 2 (the unbiased MMD needs two cells), got {max_cells}.")
    if not 0 < fdr_threshold < 1:
        raise InputError(f"fdr_threshold must lie strictly between 0 and 1, got {fdr_threshold}.")
    mmd = _MMD(as_kernel(kernel), as_estimator(estimator), as_kernel("energy"), as_estimator("biased"))
    data = pair_anndata(
        read_anndata(pred),
        read_anndata(real),
        perturbation_key=perturbation_key,
        control_label=control_label,
        cell_type_key=cell_type_key,
        context_keys=context_keys,
        dose_key=dose_key,
        replicate_key=replicate_key,
    )
    if kernel_name is None:
        kernel_name = kernel if isinstance(kernel, str) else type(kernel).__name__.lower()
    bar = progress_bar(data.conditions, desc=f"evaluate ({method})", unit="conditions", disable=not progress)
    table, notes = _Evaluation(data, mmd, kernel_name, max_cells, fdr_threshold, seed).run(
        bar, with_variability=replicate_key is not None
    )
    frame = pd.DataFrame([(c, m, method, v) for c, m, v in table], columns=list(COLUMNS))
    frame.attrs["notes"] = notes
    return frame


class _MMD:
    """The kernel and estimator of the distribution metrics, and cell-eval's energy distance."""

    def __init__(self, kernel: Kernel, estimator: MMDEstimator, energy: Kernel, biased: MMDEstimator) -> None:
        self.kernel, self.estimator, self.energy, self.biased = kernel, estimator, energy, biased

    def __call__(self, x: np.ndarray, y: np.ndarray) -> float:
        return population_mmd2(x, y, self.kernel, self.estimator)

    def edistance(self, x: np.ndarray, y: np.ndarray) -> float:
        """V-statistic energy distance ``2 E|X-Y| - E|X-X'| - E|Y-Y'|`` (cell-eval's ``edistance``)."""
        return population_mmd2(x, y, self.energy, self.biased)


class _Evaluation:
    """One evaluation run: computes per-condition metrics, then those across conditions."""

    def __init__(
        self, data: PairedData, mmd: _MMD, kernel_name: str, max_cells: int, fdr_threshold: float, seed: int
    ) -> None:
        self.data, self.mmd, self.kernel_name = data, mmd, kernel_name
        self.max_cells, self.fdr_threshold = max_cells, fdr_threshold
        self.rng = np.random.default_rng(seed)
        self.notes: dict[str, list[str]] = {}  # reason -> conditions
        contexts = {c.context for c in data.conditions}
        self.controls = {
            t: (data.pred.control(t), data.real.control(t)) for t in sorted(contexts, key=lambda t: t or "")
        }
        self.control_samples = {t: (self._sample(p), self._sample(r)) for t, (p, r) in self.controls.items()}
        differ = {  # compared as counts and means, so the same cells in another order are the same
            t or "all cells": (p.shape[0], r.shape[0]) for t, (p, r) in self.controls.items()
            if p.shape != r.shape or not np.allclose(p.mean(0), r.mean(0), atol=1e-6)
        }
        if differ:  # the prediction's deltas and DE calls are measured against its own control cells
            part = any(n_pred < n_real for n_pred, n_real in differ.values())
            hint = (" (fewer than the real ones: a prediction of part of a context, such as one cell type, needs the "
                    "obs column that sets it apart, --cell-type-key or --context-key)" if part else "")
            self.notes["the prediction's control cells are not the real ones, and its changes and DE calls are measured "
                       f"against its own: check they are the real control cells{hint} (contexts: predicted against "
                       "real control cells)"] = [f"{t}: {n_pred} against {n_real}" for t, (n_pred, n_real) in differ.items()]
        self.control_ranks = {t: (ControlRanks(p), ControlRanks(r)) for t, (p, r) in self.controls.items()}

    def _sample(self, cells: np.ndarray) -> np.ndarray:
        return subsample(cells, self.max_cells, self.rng)

    def run(
        self, conditions: Iterable[EvaluatedCondition], *, with_variability: bool
    ) -> tuple[list[tuple[str, str, float]], list[str]]:
        """Rows ``(condition, metric, value)`` and the notes; ``conditions`` are ``data.conditions``
        (or a progress bar over them)."""
        per_condition: dict[EvaluatedCondition, dict[str, float]] = {}
        deltas: dict[EvaluatedCondition, tuple[np.ndarray, np.ndarray]] = {}
        edistances = np.empty((len(self.data.conditions), 2))
        nsig = np.empty((len(self.data.conditions), 2))
        for i, c in enumerate(conditions):
            pred_cells, real_cells = self.data.pred.cells(c), self.data.real.cells(c)
            if len(real_cells) < FEW_REAL_CELLS:
                self.notes.setdefault(f"fewer than {FEW_REAL_CELLS} real cells: noisy metrics", []).append(c.name)
            pred_ctrl, real_ctrl = self.controls[c.context]
            means = pred_cells.mean(0), real_cells.mean(0), pred_ctrl.mean(0), real_ctrl.mean(0)
            values = pseudobulk_metrics(*means)
            deltas[c] = (means[0] - means[2], means[1] - means[3])
            pred_ranks, real_ranks = self.control_ranks[c.context]
            values |= self._de(c, real_ranks.test(real_cells), pred_ranks.test(pred_cells))
            nsig[i] = values["de_nsig_counts_real"], values["de_nsig_counts_pred"]
            values |= realism_metrics(pred_cells, real_cells)
            pred_sample, real_sample = self._sample(pred_cells), self._sample(real_cells)
            values[f"mmd2_{self.kernel_name}"] = self._mmd2(c, pred_sample, real_sample)
            pred_ctrl_sample, real_ctrl_sample = self.control_samples[c.context]
            edistances[i] = (
                self.mmd.edistance(pred_sample, pred_ctrl_sample),
                self.mmd.edistance(real_sample, real_ctrl_sample),
            )
            if with_variability:
                values |= self._variability(c)
            values |= self._calibration(c)
            per_condition[c] = values
        for c, scores in self._discrimination(deltas).items():
            per_condition[c] |= scores
        rows = [(c.name, metric, value) for c, values in per_condition.items() for metric, value in values.items()]
        means = pd.DataFrame(per_condition.values()).mean(skipna=True)
        rows += [(ALL_CONDITIONS, str(metric), float(value)) for metric, value in means.items()]
        rows.append((ALL_CONDITIONS, "de_spearman_sig", spearman_nsig(nsig[:, 0], nsig[:, 1])))
        rows.append((ALL_CONDITIONS, "pearson_edistance", correlation("pearson", edistances[:, 1], edistances[:, 0])))
        return rows, [_note(reason, names) for reason, names in self.notes.items()]

    def _mmd2(self, condition: EvaluatedCondition, pred: np.ndarray, real: np.ndarray) -> float:
        """MMD^2 of the two populations; NaN, with a note, where one has a single cell (no distribution to compare)."""
        if min(len(pred), len(real)) < 2:
            reason = f"a single predicted or real cell, so mmd2_{self.kernel_name} is NaN"
            self.notes.setdefault(reason, []).append(condition.name)
            return float("nan")
        return self.mmd(pred, real)

    def _de(self, condition: EvaluatedCondition, real: DEResult, pred: DEResult) -> dict[str, float]:
        values = de_metrics(real, pred, threshold=self.fdr_threshold)
        if values["de_nsig_counts_real"] == 0:
            reason = (
                f"no real DE gene at FDR < {self.fdr_threshold}, so de_direction_match, de_spearman_lfc_sig, "
                f"de_sig_genes_recall, pr_auc and roc_auc are NaN"
            )
            self.notes.setdefault(reason, []).append(condition.name)
        return values

    def _variability(self, condition: EvaluatedCondition) -> dict[str, float]:
        pops = [
            [self._sample(p) for p in side.replicate_populations(condition)] for side in (self.data.pred, self.data.real)
        ]
        values, reason = population_variability(pops[0], pops[1], self.mmd.kernel, self.mmd.estimator)
        stem = f"variability_mmd2_{self.kernel_name}"
        if reason is not None:
            self.notes.setdefault(f"{stem}: {reason}", []).append(condition.name)
        return {f"{stem}_{k}": v for k, v in values.items()}

    def _calibration(self, condition: EvaluatedCondition) -> dict[str, float]:
        """Where the real population(s) fall among the prediction's sampled populations (none: no metric).

        Real populations are the condition's replicates (batches, donors) when the real data has
        a replicate key, else all its cells; see :func:`population_calibration`.
        """
        if not self.data.pred.sampled:
            return {}
        predicted = self.data.pred.replicate_populations(condition)
        if len(predicted) < 2:
            return {}
        if len(predicted) < MIN_CALIBRATION_POPULATIONS:
            reason = (
                f"population_coverage NaN, {len(predicted)} predicted populations: a p-value above "
                f"{COVERAGE_LEVEL} needs at least {MIN_CALIBRATION_POPULATIONS} (predict --populations)"
            )
            self.notes.setdefault(reason, []).append(condition.name)
        reals = [p for p in self.data.real.replicate_populations(condition) if p.shape[0] >= 2]
        reals = reals or [self.data.real.cells(condition)]
        if min(p.shape[0] for p in [*predicted, *reals]) < 2:
            reason = "a single predicted or real cell, so calibration_pvalue and population_coverage are NaN"
            self.notes.setdefault(reason, []).append(condition.name)
            return {"calibration_pvalue": float("nan"), "population_coverage": float("nan")}
        pvalues = [population_calibration(predicted, r, self.mmd.kernel, self.mmd.estimator, self.rng) for r in reals]
        enough = len(predicted) >= MIN_CALIBRATION_POPULATIONS
        return {
            "calibration_pvalue": float(np.mean(pvalues)),
            "population_coverage": float(np.mean(np.array(pvalues) > COVERAGE_LEVEL)) if enough else float("nan"),
        }

    def _discrimination(
        self, deltas: dict[EvaluatedCondition, tuple[np.ndarray, np.ndarray]]
    ) -> dict[EvaluatedCondition, dict[str, float]]:
        """Discrimination scores, each condition ranked among the conditions of its context."""
        out: dict[EvaluatedCondition, dict[str, float]] = {c: {} for c in deltas}
        genes = self.data.genes
        for context in self.controls:
            group = [c for c in deltas if c.context == context]
            pred = np.stack([deltas[c][0] for c in group])
            real = np.stack([deltas[c][1] for c in group])
            include = np.stack([genes != c.perturbation for c in group])
            for dist in DISTANCES:
                for c, score in zip(group, discrimination_scores(pred, real, dist, include), strict=True):
                    out[c][f"discrimination_score_{dist}"] = float(score)
        return out


def _note(reason: str, conditions: list[str], shown: int = 10) -> str:
    """``reason`` and the conditions it applies to, at most ``shown`` of them by name."""
    names = ", ".join(conditions[:shown]) + (f", ... ({len(conditions)} in all)" if len(conditions) > shown else "")
    return f"{reason} [{names}]"
