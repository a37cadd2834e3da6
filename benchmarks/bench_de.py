"""The evaluation's Wilcoxon DE test of a screen's conditions against one control population.

SciPy's ``mannwhitneyu`` ranks each condition joined to the control cells (a sort of ``n + m``
values per gene, per condition); :class:`~perturbdiff_core.evaluation.de.ControlRanks` sorts the
control cells once and binary-searches each condition's values. Both time the same 20 conditions
of 200 cells against 3000 control cells on 1000 genes (log1p of Poisson counts, ties everywhere)
and first check that they give the same p-values. Compare the two rows of the ``de-screen`` group::

    OMP_NUM_THREADS=1 pytest benchmarks/bench_de.py --benchmark-only --benchmark-columns=median,rounds
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from perturbdiff_core.evaluation.de import ControlRanks

CONTROL_CELLS, CONDITION_CELLS, CONDITIONS, GENES = 3000, 200, 20, 1000


@pytest.fixture(scope="module")
def screen() -> tuple[np.ndarray, list[np.ndarray]]:
    """Control cells and the conditions' cells, float32 log1p counts with a few shifted genes each."""
    rng = np.random.default_rng(0)
    rate = rng.gamma(0.5, 1.0, GENES)
    control = np.log1p(rng.poisson(rate, (CONTROL_CELLS, GENES))).astype(np.float32)
    conditions = [
        np.log1p(rng.poisson(rate * np.where(rng.random(GENES) < 0.05, 3.0, 1.0), (CONDITION_CELLS, GENES)))
        .astype(np.float32)
        for _ in range(CONDITIONS)
    ]
    return control, conditions


def _scipy_pvalues(control: np.ndarray, conditions: list[np.ndarray]) -> list[np.ndarray]:
    return [stats.mannwhitneyu(c, control, axis=0, method="asymptotic").pvalue for c in conditions]


def _control_ranks_pvalues(control: np.ndarray, conditions: list[np.ndarray]) -> list[np.ndarray]:
    ranks = ControlRanks(control)  # its one sort is part of the time
    return [ranks.test(c).pvalue for c in conditions]


@pytest.mark.parametrize("method", ["scipy_joined", "control_ranks"])
def test_de_screen(benchmark, screen, method):
    control, conditions = screen
    if method == "scipy_joined":  # in float64: SciPy's rank sums of float32 input lose digits at this size
        run, control, conditions = _scipy_pvalues, control.astype(np.float64), [c.astype(np.float64) for c in conditions]
    else:
        run = _control_ranks_pvalues
    expected = _scipy_pvalues(control.astype(np.float64), [c.astype(np.float64) for c in conditions])
    for got, want in zip(run(control, conditions), expected, strict=True):
        np.testing.assert_allclose(np.nan_to_num(got, nan=1.0), np.nan_to_num(want, nan=1.0), rtol=1e-9)
    benchmark.group = "de-screen"
    benchmark.extra_info.update(method=method, control=CONTROL_CELLS, cells=CONDITION_CELLS, conditions=CONDITIONS)
    benchmark.pedantic(run, args=(control, conditions), rounds=3, warmup_rounds=0)
