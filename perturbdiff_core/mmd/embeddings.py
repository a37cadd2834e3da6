r"""Kernel mean embedding maps: a set of cells -> its mean embedding in the RKHS.

With an explicit feature map :math:`\phi` (random Fourier, Nystrom) the embedding of a set is
the weighted mean feature vector :math:`\mu = \sum_i w_i \phi(x_i)` and
:math:`\mathrm{MMD}^2 = \|\mu_x - \mu_y\|^2` is a squared distance between two vectors. The
exact embedding is implicit: inner products of embeddings go through the kernel.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from .kernels import Kernel


class EmbeddingMap(nn.Module, ABC):
    """Maps weighted cell sets to (approximate) kernel mean embeddings."""

    #: True when :meth:`features` gives finite-dimensional vectors.
    explicit: bool = True

    def __init__(self, kernel: Kernel) -> None:
        super().__init__()
        self.kernel = kernel

    def fit(self, cells: Tensor) -> EmbeddingMap:
        """Data-dependent set-up (e.g. Nystrom landmarks) from representative ``(..., N, G)`` cells."""
        return self

    @abstractmethod
    def features(self, x: Tensor) -> Tensor:
        """Per-cell features ``(..., N, D)`` with ``<phi(x), phi(y)> ~= k(x, y)``."""

    def mean_embedding(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """Weighted mean feature vector ``(..., D)``; uniform weights when ``None``."""
        phi = self.features(x)
        if weights is None:
            return phi.mean(-2)
        return (weights.unsqueeze(-1) * phi).sum(-2)

    def inner(self, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor) -> Tensor:
        """``<mu_x, mu_y>`` per set pair ``(...)``; weights sum to one per set."""
        return (self.mean_embedding(x, wx) * self.mean_embedding(y, wy)).sum(-1)


def as_embedding(spec: Any, /, **params: Any) -> EmbeddingMap:
    """An :class:`EmbeddingMap` from a plug-in name (with parameters) or an instance."""
    from ..registry import resolve

    return resolve("perturbdiff.embeddings", spec, **params)
