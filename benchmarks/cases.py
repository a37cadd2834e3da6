"""What the benchmarks measure: shapes, kernels, estimators, baselines, and the timed steps.

Everything goes through the public API (registry names, ``mmd2``), so the benchmarks run
whatever the backends' internals are. Imported by the ``bench_*.py`` files and by the
peak-memory child process (``peak_memory.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from perturbdiff_core import mmd2
from perturbdiff_core.mmd.kernels import Kernel
from perturbdiff_core.registry import load

#: The command that produces benchmarks/RESULTS.md (printed in the session header).
REPRODUCE = (
    "OMP_NUM_THREADS=1 pytest benchmarks/bench_kernels.py benchmarks/bench_estimators.py --benchmark-only "
    "--benchmark-json=bench.json && python benchmarks/report.py bench.json --output benchmarks/RESULTS.md"
)

#: ``cpu`` unless ``PERTURBDIFF_BENCH_DEVICE`` names another torch device (e.g. ``cuda``).
DEVICE = torch.device(os.environ.get("PERTURBDIFF_BENCH_DEVICE", "cpu"))
GENES = 2000


@dataclass(frozen=True)
class Shape:
    """``batch`` pairs of sets of ``cells`` cells on ``genes`` genes."""

    batch: int
    cells: int
    genes: int = GENES

    @property
    def id(self) -> str:
        return f"B{self.batch}-S{self.cells}-G{self.genes}"


TRAINING = Shape(8, 256)  # the PerturbDiff training shape
LARGE = Shape(1, 4096)  # dense / chunked / keops
HUGE = Shape(1, 16384)  # memory-light estimators only; run in a child process for peak RSS

KERNELS = ("rbf", "laplace", "matern32", "matern52", "imq", "energy", "mixture")

#: Benchmark label -> (``perturbdiff.estimators`` name, parameters). Quadratic estimators name
#: their backend so ``auto`` cannot switch backend between machines; the labels ``chunked`` and
#: ``keops`` are the unbiased statistic on those backends (once estimators of their own).
ESTIMATORS: dict[str, tuple[str, dict[str, Any]]] = {
    "biased": ("biased", {"backend": "dense"}),
    "unbiased": ("unbiased", {"backend": "dense"}),
    "chunked": ("unbiased", {"backend": "chunked"}),
    "keops": ("unbiased", {"backend": "keops"}),
    "linear": ("linear", {}),
    "embedding": ("embedding", {"embedding": "rff"}),
}
#: Exact (all-pairs) estimators: the ones the speed targets apply to.
EXACT = ("biased", "unbiased", "chunked", "keops")

#: Our kernel -> the GeomLoss ``SamplesLoss`` kernel computing the same MMD^2 (times 1/2).
GEOMLOSS = {"rbf": "gaussian", "laplace": "laplacian", "energy": "energy"}

MODES = ("fwd", "fwdbwd")

#: KeOps compiles C++ per formula and is ~20x slower than the GEMM path on CPU: only these
#: cheap cases run when the benchmark device is a CPU.
KEOPS_CPU_KERNELS = ("rbf", "energy")


def keops_cpu_skip(estimator: str, kernel: str, mode: str, shape: Shape) -> str | None:
    """Why a KeOps case is left out on CPU, or None when it runs."""
    if estimator != "keops" or DEVICE.type != "cpu":
        return None
    if shape != TRAINING or mode != "fwd" or kernel not in KEOPS_CPU_KERNELS:
        return (
            f"KeOps on CPU runs only {'/'.join(KEOPS_CPU_KERNELS)} forward at {TRAINING.id} "
            f"(seconds per call there, minutes at larger shapes); set PERTURBDIFF_BENCH_DEVICE=cuda"
        )
    return None


def make_kernel(name: str, genes: int = GENES) -> Kernel:
    """``name`` with a fixed lengthscale ``sqrt(genes)`` (typical distances are ~sqrt(2 genes))."""
    scale = math.sqrt(genes)
    if name == "energy":
        return load("perturbdiff.kernels", "energy")
    if name == "mixture":
        return load("perturbdiff.kernels", "mixture", lengthscales=[scale * c for c in (0.5, 1.0, 2.0, 4.0)], relative=False)
    return load("perturbdiff.kernels", name, lengthscale=scale)


def make_estimator(label: str) -> Any:
    """A fresh estimator instance for benchmark label ``label``."""
    name, params = ESTIMATORS[label]
    return load("perturbdiff.estimators", name, **params)


@cache
def cell_sets(shape: Shape) -> tuple[Tensor, Tensor]:
    """Float32 sets ``x, y`` of ``shape``: standard normal cells, ``y`` scaled and shifted."""
    g = torch.Generator().manual_seed(0)
    size = (shape.batch, shape.cells, shape.genes)
    x = torch.randn(size, generator=g)
    y = 1.1 * torch.randn(size, generator=g) + 0.1
    return x.to(DEVICE), y.to(DEVICE)


def synchronize() -> None:
    """Wait for queued GPU work so a timing covers it (no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def step(loss: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, mode: str) -> Callable[[], None]:
    """One timed call: ``loss(x, y)`` without autograd (``fwd``) or with ``backward`` to ``x`` (``fwdbwd``).

    In ``fwdbwd`` the prediction ``x`` needs a gradient and the target ``y`` does not, as in training.
    """
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                loss(x, y)
            synchronize()
        return run
    xg = x.detach().clone().requires_grad_(True)

    def run_backward() -> None:
        xg.grad = None
        loss(xg, y).sum().backward()
        synchronize()
    return run_backward


def ours(estimator_label: str, kernel_name: str, genes: int = GENES) -> Callable[[Tensor, Tensor], Tensor]:
    """``mmd2`` with one estimator and kernel instance, reused across calls (fixed random features)."""
    estimator, kernel = make_estimator(estimator_label), make_kernel(kernel_name, genes)
    return lambda x, y: mmd2(x, y, kernel=kernel, estimator=estimator)


def gemm_floor(x: Tensor, y: Tensor) -> Tensor:
    """The GEMM floor: one batched ``(S, G) @ (G, S)`` product, the least work an exact MMD does."""
    return torch.bmm(x, y.transpose(1, 2))


def geomloss(kernel_name: str, genes: int = GENES) -> Callable[[Tensor, Tensor], Tensor]:
    """GeomLoss ``SamplesLoss`` (tensorized) with the kernel matching ours: ``0.5 * biased MMD^2``."""
    from geomloss import SamplesLoss

    return SamplesLoss(loss=GEOMLOSS[kernel_name], blur=math.sqrt(genes), backend="tensorized")
