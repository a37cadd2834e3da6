"""Built-in MMD estimators."""

from __future__ import annotations

from perturbdiff_core.estimators import QuadraticMMD
from perturbdiff_core.registry import resolve


class UnbiasedMMD(QuadraticMMD):
    """Unbiased U-statistic MMD^2 over all pairs (Gretton et al. 2012)."""

    def __init__(self, backend: str = "dense") -> None:
        super().__init__(resolve("perturbdiff.backends", backend), unbiased=True)


class BiasedMMD(QuadraticMMD):
    """Biased V-statistic MMD^2 over all pairs (non-negative; includes i = j terms)."""

    def __init__(self, backend: str = "dense") -> None:
        super().__init__(resolve("perturbdiff.backends", backend), unbiased=False)
