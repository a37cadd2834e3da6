r"""MMD estimator interface, and the quadratic-time estimators written once over a reduction.

.. math::
    \mathrm{MMD}^2(P, Q) = \mathbb{E}\,k(x, x') + \mathbb{E}\,k(y, y') - 2\,\mathbb{E}\,k(x, y)
    = \|\mu_P - \mu_Q\|_{\mathcal H}^2

Every estimator takes batches of sets ``(..., N, G)`` and ``(..., M, G)``, optional per-cell
weights ``(..., N)`` and ``(..., M)``, and returns a differentiable ``(...)`` tensor; float16 and
bfloat16 sets are computed (and returned) in float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor

from ..errors import InputError
from ..validation import at_least_float32, check_sets, normalized_weights
from .kernels import Kernel
from .reductions import KernelReduction


class MMDEstimator(ABC):
    """Estimates squared MMD between batches of cell sets under a kernel."""

    #: True for unbiased estimators (U-statistics): they can be negative, and ``estimate(x, x)``
    #: is at most 0 rather than exactly 0.
    unbiased: bool = False
    #: False when the estimate depends on the order of cells within a set (e.g. linear-time pairs).
    permutation_invariant: bool = True

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        kernel: Kernel,
        *,
        x_weights: Tensor | None = None,
        y_weights: Tensor | None = None,
    ) -> Tensor:
        x, y = at_least_float32(x), at_least_float32(y)  # half precision cannot hold the sums (see at_least_float32)
        check_sets(x, y)
        if x.dtype != y.dtype:
            raise InputError(f"x is {x.dtype} but y is {y.dtype}; cast both to one dtype.")
        wx = normalized_weights(x_weights, x, name="x_weights")
        wy = normalized_weights(y_weights, y, name="y_weights")
        return self.estimate(x, y, self.adapt_kernel(kernel, x, y), wx, wy)

    def adapt_kernel(self, kernel: Kernel, x: Tensor, y: Tensor) -> Kernel:
        """The kernel used for this pair of batches: data-dependent hyperparameters fixed for ``x, y``."""
        return kernel.adapt(x, y)

    @abstractmethod
    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        """MMD^2 per set pair; weights are already normalised to sum to one per set."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class QuadraticMMD(MMDEstimator):
    r"""The V- or U-statistic over all pairs, evaluated by a :class:`KernelReduction`.

    Biased (V): :math:`w_x^\top K_{xx} w_x + w_y^\top K_{yy} w_y - 2 w_x^\top K_{xy} w_y`.
    Unbiased (U): the within-set sums skip :math:`i = j` and are divided by
    :math:`1 - \sum_i w_i^2` (:math:`= (n - 1)/n` for uniform weights), which gives the
    classic :math:`\frac{1}{n(n-1)}\sum_{i \ne j}` of Gretton et al. (2012).
    """

    def __init__(self, reduction: KernelReduction, *, unbiased: bool) -> None:
        self.reduction = reduction
        self.unbiased = unbiased

    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        if self.unbiased:
            require_pairs(x, y, fix="use estimator='biased' for single cells")
        kxx, kyy, kxy = self.reduction.mmd_terms(kernel, x, y, wx, wy, exclude_diagonal=self.unbiased)
        if self.unbiased:
            kxx = kxx / (1 - wx.square().sum(-1))
            kyy = kyy / (1 - wy.square().sum(-1))
        return kxx + kyy - 2 * kxy

    def __repr__(self) -> str:
        return f"{type(self).__name__}(unbiased={self.unbiased}, reduction={type(self.reduction).__name__})"


def require_pairs(x: Tensor, y: Tensor, *, fix: str) -> None:
    """InputError unless both sets have at least 2 cells, as a U-statistic's within-set pairs need."""
    for name, t in (("x", x), ("y", y)):
        if t.shape[-2] < 2:
            raise InputError(f"The unbiased estimator needs at least 2 cells per set, {name} has {t.shape[-2]}; {fix}.")


def as_estimator(spec: Any, /, **params: Any) -> MMDEstimator:
    """An :class:`MMDEstimator` from a plug-in name (with parameters) or an instance."""
    from ..registry import resolve

    return resolve("perturbdiff.estimators", spec, **params)
