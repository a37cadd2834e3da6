"""An example third-party perturbdiff plug-in: one kernel, registered through an entry point."""

from __future__ import annotations

import torch
from torch import Tensor

from perturbdiff_core.errors import InputError
from perturbdiff_core.mmd.kernels import RadialKernel

__all__ = ["RationalQuadratic"]


class RationalQuadratic(RadialKernel):
    r"""Rational quadratic kernel :math:`k(x, y) = (1 + \|x - y\|^2 / (2 \alpha l^2))^{-\alpha}`.

    A scale mixture of Gaussian kernels (precision :math:`\tau \sim \Gamma(\alpha, \alpha)`);
    it tends to the RBF kernel as :math:`\alpha \to \infty` and has heavier tails for small
    :math:`\alpha`.

    Args:
        lengthscale: ``"median"`` (the median heuristic, the default of every radial kernel) or a
            positive number.
        alpha: positive shape parameter.
        trainable: learn the lengthscale.

    Example:
        >>> import torch
        >>> RationalQuadratic(lengthscale=1.0, alpha=1.0)(torch.zeros(1, 2), torch.ones(1, 2))
        tensor([[0.5000]])
    """

    def __init__(self, lengthscale: float | str = "median", alpha: float = 1.0, *, trainable: bool = False) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise InputError(f"rational_quadratic needs a positive alpha, got {alpha!r}.")
        super().__init__(lengthscale, trainable=trainable)
        self.alpha = float(alpha)

    def profile(self, s: Tensor) -> Tensor:
        # exp(-alpha log(1 + s / (2 alpha))): method-style ops, so it also runs on KeOps LazyTensors.
        return ((s * (0.5 / self.alpha) + 1.0).log() * -self.alpha).exp()

    def sample_spectral(self, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        # Gaussian scale mixture: omega | tau ~ N(0, tau I / l^2), tau ~ Gamma(shape alpha, rate alpha).
        z = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
        shape = torch.full((num_features, 1), self.alpha, dtype=torch.float64)
        tau = torch._standard_gamma(shape, generator=generator) / self.alpha
        return z * tau.sqrt() / self.lengthscale.double()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4g}, {super().extra_repr()}"
