"""Kernel reductions: weighted kernel sums ``w_x^T K(x, y) w_y`` over batches of sets.

Quadratic-time MMD estimators are written once against this one operation, so the same
estimator runs on a dense kernel matrix, on memory-bounded blocks, or on a KeOps LazyTensor
that never forms the ``N x M`` matrix (the GeomLoss design). The backends are plug-ins of the
``perturbdiff.backends`` group; :class:`AutoReduction` picks one of them per call.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from functools import cache
from typing import Any

import torch
from torch import Tensor

from ..errors import PerturbDiffError, UnknownPluginError
from .kernels import Kernel

_GROUP = "perturbdiff.backends"
#: ``backend="auto"`` uses the ``dense`` backend up to this many kernel entries per call
#: (``batch * (N^2 + M^2 + N M)`` for an MMD); above it ``chunked`` on CPU, ``keops`` on CUDA.
DENSE_MAX_ENTRIES = 2**25
#: Block size of the ``chunked`` backend that ``backend="auto"`` picks.
AUTO_BLOCK_SIZE = 1024
_TERMS = ("xx", "yy", "xy")


class KernelReduction(ABC):
    """Computes ``sum_ij wx_i K(x_i, y_j) wy_j`` for each set pair, differentiably."""

    def supports(self, kernel: Kernel, device_type: str) -> bool:
        """True when this backend can evaluate ``kernel`` on ``device_type``."""
        return True

    @abstractmethod
    def weighted_sum(
        self,
        kernel: Kernel,
        x: Tensor,
        y: Tensor,
        wx: Tensor,
        wy: Tensor,
        *,
        same: bool = False,
        exclude_diagonal: bool = False,
    ) -> Tensor:
        """``(...)`` weighted sums; ``same`` says ``y is x``; ``exclude_diagonal`` drops ``i == j``.

        ``x`` is ``(..., N, G)``, ``y`` is ``(..., M, G)``, ``wx`` is ``(..., N)``, ``wy`` is
        ``(..., M)``. ``exclude_diagonal`` is only used with ``same=True``.
        """

    def mmd_terms(
        self, kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, exclude_diagonal: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The three sums of MMD^2: ``(w_x K_xx w_x, w_y K_yy w_y, w_x K_xy w_y)``.

        Backends may override this to fuse the three reductions (one pass, one backward).
        """
        kxx = self.weighted_sum(kernel, x, x, wx, wx, same=True, exclude_diagonal=exclude_diagonal)
        kyy = self.weighted_sum(kernel, y, y, wy, wy, same=True, exclude_diagonal=exclude_diagonal)
        kxy = self.weighted_sum(kernel, x, y, wx, wy)
        return kxx, kyy, kxy


@cache
def _keops_backend() -> KernelReduction | None:
    """The registered ``keops`` backend when pykeops imports, else None (checked once)."""
    from ..registry import resolve

    try:
        importlib.import_module("pykeops")
        return resolve(_GROUP, "keops")
    except (ImportError, PerturbDiffError):
        return None


class AutoReduction(KernelReduction):
    """Chooses a registered backend per call from the tensors' device and the kernel's size.

    * ``dense`` up to :data:`DENSE_MAX_ENTRIES` kernel entries: whole matrices and GEMMs, the
      fastest; memory grows as ``N M``.
    * ``chunked`` above it on CPU (and on CUDA without KeOps): blocks of :data:`AUTO_BLOCK_SIZE`
      squared, memory bounded at any size; the backward recomputes each block (its cost against dense:
      ``docs/performance.md``).
    * ``keops`` above it on CUDA tensors when pykeops imports and supports the kernel: linear
      memory, fused GPU kernels. Never chosen for CPU tensors, where it is much slower.
    """

    def __init__(self) -> None:
        from ..registry import resolve

        self.dense = resolve(_GROUP, "dense")
        self.chunked = resolve(_GROUP, "chunked", block_size=AUTO_BLOCK_SIZE)

    def choose(self, kernel: Kernel, x: Tensor, y: Tensor, *, terms: tuple[str, ...] = _TERMS) -> KernelReduction:
        """The backend for this call; ``terms`` are the sums it needs (``"xx"``, ``"yy"``, ``"xy"``)."""
        batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]).numel()
        sizes = {"x": x.shape[-2], "y": y.shape[-2]}
        entries = batch * sum(sizes[t[0]] * sizes[t[1]] for t in terms)
        if entries <= DENSE_MAX_ENTRIES:
            return self.dense
        if x.device.type == "cuda":
            keops = _keops_backend()
            if keops is not None and keops.supports(kernel, "cuda"):
                return keops
        return self.chunked

    def weighted_sum(
        self,
        kernel: Kernel,
        x: Tensor,
        y: Tensor,
        wx: Tensor,
        wy: Tensor,
        *,
        same: bool = False,
        exclude_diagonal: bool = False,
    ) -> Tensor:
        backend = self.choose(kernel, x, y, terms=("xy",))
        return backend.weighted_sum(kernel, x, y, wx, wy, same=same, exclude_diagonal=exclude_diagonal)

    def mmd_terms(
        self, kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, exclude_diagonal: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.choose(kernel, x, y).mmd_terms(kernel, x, y, wx, wy, exclude_diagonal=exclude_diagonal)

    def __repr__(self) -> str:
        return "AutoReduction()"


def as_reduction(spec: Any) -> KernelReduction:
    """A :class:`KernelReduction` from ``"auto"``, a ``perturbdiff.backends`` plug-in name, or an instance."""
    from ..registry import is_registered, names, resolve

    if isinstance(spec, str) and spec == "auto":
        return AutoReduction()
    if isinstance(spec, str) and not is_registered(_GROUP, spec):
        raise UnknownPluginError(
            f"Unknown MMD backend {spec!r}; choose 'auto' or one of: {', '.join(names(_GROUP))}."
        )
    return resolve(_GROUP, spec)
