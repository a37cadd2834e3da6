"""The GEMM floor at every benchmark shape, and dense kernel matrices at the training shape.

The floor, one batched ``(S, G) @ (G, S)`` product, is the least work an exact MMD does: the
report divides every time by the floor of the same shape, which cancels most of the machine.
A kernel matrix ``k(x, y)`` is one such GEMM plus the kernel's profile applied elementwise.
"""

from __future__ import annotations

import pytest
from cases import HUGE, KERNELS, LARGE, MODES, TRAINING, cell_sets, gemm_floor, make_kernel, step
from timing import label, time_case, time_in_child


@pytest.mark.parametrize("shape", [TRAINING, LARGE, HUGE], ids=lambda s: s.id)
def test_gemm_floor(benchmark, shape):
    label(benchmark, shape, "floor", kernel="-", estimator="gemm-floor", mode="fwd")
    if shape == HUGE:  # timed in a child process, like the other cases of this size
        time_in_child(benchmark, dict(role="floor", mode="fwd", batch=shape.batch, cells=shape.cells))
        return
    x, y = cell_sets(shape)
    time_case(benchmark, step(gemm_floor, x, y, "fwd"), shape, "the GEMM floor")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel", KERNELS, ids=[f"{TRAINING.id}-{k}" for k in KERNELS])
def test_kernel_matrix(benchmark, kernel, mode):
    label(benchmark, TRAINING, "kernel", kernel=kernel, estimator="kernel-matrix", mode=mode)
    x, y = cell_sets(TRAINING)
    k = make_kernel(kernel)
    time_case(benchmark, step(lambda a, b: k(a, b), x, y, mode), TRAINING, f"the {kernel} kernel matrix")
