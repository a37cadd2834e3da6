"""Differential expression: Wilcoxon tests of a condition against its control, and DE agreement.

The test is pdex's (cell-eval's DE engine): a two-sided Mann-Whitney U (Wilcoxon rank-sum) test
per gene, normal approximation with tie and continuity corrections (SciPy's ``mannwhitneyu``
``asymptotic``), p = 1 where every value ties, Benjamini-Hochberg FDR over the genes of one
condition, and the fold change of geometric means of
:func:`~perturbdiff_core.evaluation.pseudobulk.log2_fold_change`.

Every condition of a cell type is tested against the same control cells, so :class:`ControlRanks`
sorts them once and counts, for each condition's values, the control values below and equal
(binary search): a condition then costs a sort of its own few cells, not of the control cells
joined to them (a screen's thousands of conditions against thousands of control cells).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from .pseudobulk import correlation, log2_fold_change

#: FDR below which a gene counts as differentially expressed (cell-eval's default).
FDR_THRESHOLD = 0.05
#: Fixed list lengths of the ``overlap_at_k`` / ``precision_at_k`` metrics (cell-eval's).
TOP_K = (50, 100, 200, 500)
#: Smallest FDR used as a score by ``pr_auc`` / ``roc_auc`` (-log10 is capped at 10, as in cell-eval).
MIN_FDR_SCORE = 1e-10


@dataclass(frozen=True)
class DEResult:
    """Per-gene DE of one condition against its control: fold change, p-value and BH FDR."""

    log2_fold_change: np.ndarray
    pvalue: np.ndarray
    fdr: np.ndarray

    def significant(self, threshold: float = FDR_THRESHOLD) -> np.ndarray:
        """Boolean mask of the genes with FDR below ``threshold``."""
        return self.fdr < threshold

    def ranked_significant(self, threshold: float = FDR_THRESHOLD) -> np.ndarray:
        """Indices of the significant genes, largest ``|log2 fold change|`` first (ties in gene order)."""
        sig = np.flatnonzero(self.significant(threshold))
        return sig[np.argsort(-np.abs(self.log2_fold_change[sig]), kind="stable")]


class ControlRanks:
    """Control cells ``(m, G)`` sorted per gene once, to test many conditions against them (:meth:`test`)."""

    def __init__(self, control: np.ndarray) -> None:
        control = np.asarray(control)
        if control.ndim != 2 or control.shape[0] == 0:
            raise ValueError(f"control must be a non-empty (cells, genes) matrix, got shape {control.shape}.")
        self.sorted = np.sort(control, axis=0)
        self.mean = control.mean(0)
        gene, first, size = _runs(self.sorted)
        self.tie_term = np.bincount(gene, weights=_ties(size), minlength=control.shape[1])

    def test(self, cells: np.ndarray) -> DEResult:
        """Two-sided Wilcoxon rank-sum test of every gene of ``cells`` ``(n, G)`` against the control cells.

        ``U`` of ``cells`` is, summed over its values, the control values below plus half those equal;
        the tie term of the joined sample adds, per value of ``cells``, what its ``k`` copies add to the
        ``t`` equal control values: ``(t + k)^3 - (t + k) - (t^3 - t)``.
        """
        cells = np.asarray(cells)
        mean, cells = cells.mean(0), np.sort(cells, axis=0)
        n, genes = cells.shape
        m = self.sorted.shape[0]
        if genes != self.sorted.shape[1]:
            raise ValueError(f"cells have {genes} genes, the control cells {self.sorted.shape[1]}.")
        below, upto = np.empty(cells.shape, dtype=np.int64), np.empty(cells.shape, dtype=np.int64)
        for g in range(genes):
            below[:, g] = np.searchsorted(self.sorted[:, g], cells[:, g], side="left")
            upto[:, g] = np.searchsorted(self.sorted[:, g], cells[:, g], side="right")
        equal = upto - below
        u = (below + 0.5 * equal).sum(0)
        gene, first, copies = _runs(cells)
        ties = equal.T.ravel()[first]
        tie_term = self.tie_term + np.bincount(gene, weights=_ties(ties + copies) - _ties(ties), minlength=genes)
        total = n + m
        u = np.maximum(u, n * m - u)  # two-sided: the larger U, doubled p
        sd = np.sqrt(n * m / 12.0 * ((total + 1) - tie_term / (total * (total - 1))))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (u - n * m / 2.0 - 0.5) / sd
        pvalue = np.nan_to_num(np.clip(2.0 * stats.norm.sf(z), 0.0, 1.0), nan=1.0)
        return DEResult(log2_fold_change(mean, self.mean), pvalue, stats.false_discovery_control(pvalue))


def _runs(columns_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs of equal values of each column of a column-sorted ``(n, G)`` matrix: each run's gene, its first
    position in the column-major order, and its length."""
    n, genes = columns_sorted.shape
    starts = np.ones(columns_sorted.shape, dtype=bool)
    starts[1:] = columns_sorted[1:] != columns_sorted[:-1]
    first = np.flatnonzero(starts.T.ravel())
    return first // n, first, np.diff(np.append(first, n * genes))


def _ties(sizes: np.ndarray) -> np.ndarray:
    """``t^3 - t`` of groups of ``t`` equal values (float64: exact for groups under 200,000)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return sizes**3 - sizes


def wilcoxon_de(cells: np.ndarray, control: np.ndarray) -> DEResult:
    """Two-sided Wilcoxon rank-sum test of every gene of ``cells`` ``(n, G)`` against ``control`` ``(m, G)``."""
    return ControlRanks(control).test(cells)


def _top_overlap(real_top: np.ndarray, pred_top: np.ndarray, k: int) -> float:
    """``|real_top[:k] & pred_top[:k]| / k``, 0 when ``k`` is 0 (cell-eval's convention)."""
    return np.intersect1d(real_top[:k], pred_top[:k]).size / k if k else 0.0


def de_metrics(
    real: DEResult, pred: DEResult, *, threshold: float = FDR_THRESHOLD, top_k: Sequence[int] = TOP_K
) -> dict[str, float]:
    """Per-condition agreement of the predicted with the real DE genes (see ``DEFINITIONS``)."""
    real_sig, pred_sig = real.significant(threshold), pred.significant(threshold)
    real_top, pred_top = real.ranked_significant(threshold), pred.ranked_significant(threshold)
    out: dict[str, float] = {}
    for k in (None, *top_k):
        suffix = "N" if k is None else str(k)
        out[f"overlap_at_{suffix}"] = _top_overlap(real_top, pred_top, min(k or real_top.size, real_top.size))
    for k in (None, *top_k):
        suffix = "N" if k is None else str(k)
        out[f"precision_at_{suffix}"] = _top_overlap(real_top, pred_top, min(k or pred_top.size, pred_top.size))
    n_real = int(real_sig.sum())
    nan = float("nan")
    lfc_real, lfc_pred = real.log2_fold_change[real_sig], pred.log2_fold_change[real_sig]
    out["de_direction_match"] = float(np.mean(np.sign(lfc_real) == np.sign(lfc_pred))) if n_real else nan
    out["de_spearman_lfc_sig"] = correlation("spearman", lfc_real, lfc_pred)
    out["de_sig_genes_recall"] = float((real_sig & pred_sig).sum() / n_real) if n_real else nan
    out["de_nsig_counts_real"] = float(n_real)
    out["de_nsig_counts_pred"] = float(pred_sig.sum())
    if 0 < n_real < real_sig.size:
        score = -np.log10(np.clip(pred.fdr, MIN_FDR_SCORE, 1.0))
        out["pr_auc"] = float(average_precision_score(real_sig, score))
        out["roc_auc"] = float(roc_auc_score(real_sig, score))
    else:
        out["pr_auc"] = out["roc_auc"] = nan
    return out


def spearman_nsig(real_counts: np.ndarray, pred_counts: np.ndarray) -> float:
    """Spearman correlation across conditions of the numbers of real and predicted DE genes.

    Over the conditions with at least one real DE gene; 1 when there is none (cell-eval).
    """
    keep = real_counts > 0
    if not keep.any():
        return 1.0
    return correlation("spearman", real_counts[keep], pred_counts[keep])


def top_de_genes(
    genes: Sequence[str], real: DEResult, pred: DEResult, *, k: int = 10, threshold: float = FDR_THRESHOLD
) -> list[tuple[str, float, float, float, float, bool]]:
    """The ``k`` most significant real DE genes (smallest FDR, then largest ``|log2 fold change|``), each
    as ``(gene, real log2FC, real FDR, predicted log2FC, predicted FDR, significant in the prediction)``.

    By FDR rather than fold change: a gene undetected on one side has an infinite fold change of
    geometric means, which says less about the response than a small FDR does.
    """
    sig = np.flatnonzero(real.significant(threshold))
    top = sig[np.lexsort((-np.abs(real.log2_fold_change[sig]), real.fdr[sig]))][:k]
    return [
        (
            str(genes[i]),
            float(real.log2_fold_change[i]),
            float(real.fdr[i]),
            float(pred.log2_fold_change[i]),
            float(pred.fdr[i]),
            bool(pred.fdr[i] < threshold),
        )
        for i in top
    ]
