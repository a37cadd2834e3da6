"""MMD^2 estimators through ``mmd2``, and GeomLoss on the same sets, forward and forward+backward.

* the training shape (8 pairs of 256-cell sets, 2000 genes): every kernel x estimator;
* 4096 cells: the exact estimators (dense, chunked, KeOps) with rbf and energy;
* 16384 cells: the memory-light estimators with rbf, each in a child process that reports its
  peak resident memory (see ``peak_memory.py``).

Select small cases with ``-k``, e.g. ``-k "S256 and rbf"``.
"""

from __future__ import annotations

import pytest
import torch
from cases import (
    ESTIMATORS,
    GEOMLOSS,
    HUGE,
    KERNELS,
    LARGE,
    MODES,
    TRAINING,
    cell_sets,
    geomloss,
    keops_cpu_skip,
    ours,
    step,
)
from timing import label, time_case, time_in_child

LARGE_KERNELS = ("rbf", "energy")
LARGE_ESTIMATORS = ("unbiased", "chunked", "keops")
HUGE_ESTIMATORS = ("chunked", "keops", "linear", "embedding")

CASES = [(TRAINING, k, e) for k in KERNELS for e in ESTIMATORS] + [
    (LARGE, k, e) for k in LARGE_KERNELS for e in LARGE_ESTIMATORS
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape, kernel, estimator", CASES, ids=[f"{s.id}-{k}-{e}" for s, k, e in CASES]
)
def test_estimator(benchmark, shape, kernel, estimator, mode):
    reason = keops_cpu_skip(estimator, kernel, mode, shape)
    if reason:
        pytest.skip(reason)
    label(benchmark, shape, "ours", kernel=kernel, estimator=estimator, mode=mode)
    x, y = cell_sets(shape)
    time_case(benchmark, step(ours(estimator, kernel), x, y, mode), shape, f"{estimator} with {kernel}")


GEOMLOSS_CASES = [(TRAINING, k) for k in GEOMLOSS] + [(LARGE, k) for k in GEOMLOSS if k in LARGE_KERNELS]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape, kernel", GEOMLOSS_CASES, ids=[f"{s.id}-{k}" for s, k in GEOMLOSS_CASES])
def test_geomloss(benchmark, shape, kernel, mode):
    label(benchmark, shape, "geomloss", kernel=kernel, estimator=f"geomloss-{GEOMLOSS[kernel]}", mode=mode)
    x, y = cell_sets(shape)
    theirs = geomloss(kernel)
    with torch.no_grad():  # the baseline computes the same quantity: half our biased MMD^2
        torch.testing.assert_close(theirs(x, y), 0.5 * ours("biased", kernel)(x, y), rtol=1e-3, atol=1e-5)
    time_case(benchmark, step(theirs, x, y, mode), shape, f"GeomLoss {GEOMLOSS[kernel]}")


HUGE_CASES = [(e, m) for e in HUGE_ESTIMATORS for m in MODES]


@pytest.mark.parametrize("estimator, mode", HUGE_CASES, ids=[f"{HUGE.id}-rbf-{e}-{m}" for e, m in HUGE_CASES])
def test_estimator_peak_memory(benchmark, estimator, mode):
    reason = keops_cpu_skip(estimator, "rbf", mode, HUGE)
    if reason:
        pytest.skip(reason)
    spec = dict(role="ours", estimator=estimator, kernel="rbf", mode=mode, batch=HUGE.batch, cells=HUGE.cells)
    label(benchmark, HUGE, "ours", kernel="rbf", estimator=estimator, mode=mode)
    time_in_child(benchmark, spec)
