"""Functional API: one call from two cell sets to their squared MMD."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .estimators import MMDEstimator, as_estimator
from .kernels import Kernel, as_kernel


def mmd2(
    x: Tensor,
    y: Tensor,
    kernel: str | Kernel = "rbf",
    estimator: str | MMDEstimator = "unbiased",
    *,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
    **kernel_params: Any,
) -> Tensor:
    """Squared MMD between batches of cell sets ``(..., N, G)`` and ``(..., M, G)``.

    Args:
        x, y: cell sets on the same genes; leading batch dimensions broadcast.
        kernel: a ``perturbdiff.kernels`` plug-in name (``"rbf"``, ``"energy"``, ...) or a
            :class:`~perturbdiff_core.mmd.kernels.Kernel`.
        estimator: a ``perturbdiff.estimators`` plug-in name (``"unbiased"``, ``"biased"``,
            ``"linear"``, ``"embedding"``) or an instance; how ``unbiased`` and ``biased`` evaluate
            their kernel sums is their ``backend`` (``as_estimator("unbiased", backend="chunked")``).
        x_weights, y_weights: optional non-negative per-cell weights ``(..., N)``, ``(..., M)``.
        **kernel_params: parameters of the named kernel, e.g. ``lengthscale="median"``.

    Returns:
        A differentiable ``(...)`` tensor; float32 for float16 or bfloat16 sets, whose own
        precision cannot hold the sums (they are computed in float32).

    Raises:
        InputError: for sets that are not real floating-point tensors with cells and genes
            (integer, boolean, complex, meta-device, 0 genes), or hold NaN or Inf.

    Example:
        >>> import torch
        >>> from perturbdiff_core import mmd2
        >>> x, y = torch.randn(8, 256, 50), torch.randn(8, 256, 50) + 0.5
        >>> mmd2(x, y, kernel="energy").shape
        torch.Size([8])
    """
    return as_estimator(estimator)(
        x, y, as_kernel(kernel, **kernel_params), x_weights=x_weights, y_weights=y_weights
    )
