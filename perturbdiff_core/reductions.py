"""Kernel reductions: weighted kernel sums ``w_x^T K(x, y) w_y`` over batches of sets.

Quadratic-time MMD estimators are written once against this one operation, so the same
estimator runs on a dense kernel matrix, on memory-bounded blocks, or on a KeOps LazyTensor
that never forms the ``N x M`` matrix (the GeomLoss design).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from .kernels import Kernel


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
