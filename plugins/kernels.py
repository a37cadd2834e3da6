"""Built-in radial kernels (GPyTorch conventions, ``r = ||x - y||``, ``s = r^2 / l^2``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from perturbdiff_core.errors import InputError
from perturbdiff_core.kernels import Kernel, RadialKernel


def _safe_sqrt(s: Tensor) -> Tensor:
    """``sqrt(s)`` whose gradient at ``s = 0`` is 0 instead of inf (a valid subgradient)."""
    if not isinstance(s, Tensor):  # KeOps LazyTensor: KeOps differentiates sqrt safely itself
        return s.sqrt()
    tiny = torch.finfo(s.dtype).tiny
    return torch.where(s > 0, s.clamp_min(tiny).sqrt(), torch.zeros_like(s))


class RBF(RadialKernel):
    r"""Gaussian kernel :math:`k(x, y) = \exp(-\|x - y\|^2 / (2 l^2))`.

    Example:
        >>> import torch
        >>> RBF(lengthscale=2.0)(torch.zeros(1, 3), torch.ones(1, 3))
        tensor([[0.6873]])
    """

    def profile(self, s: Tensor) -> Tensor:
        return (-0.5 * s).exp()

    def profile_(self, s: Tensor) -> Tensor:
        return s.mul_(-0.5).exp_()

    def profile_grad(self, s: Tensor) -> Tensor:
        return -0.5 * (-0.5 * s).exp()

    def sample_spectral(self, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        # Spectral density of exp(-r^2 / 2 l^2) is N(0, I / l^2).
        return torch.randn(num_features, dim, generator=generator, dtype=torch.float64) / self.lengthscale.double()


class _Matern(RadialKernel):
    """Matern kernels share the Student-t spectral density with ``2 nu`` degrees of freedom."""

    nu: float

    def sample_spectral(self, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        # Matern-nu spectral density is a multivariate Student-t with 2 nu dof, scale 1/l:
        # omega = z / sqrt(u / (2 nu)), z ~ N(0, I), u ~ chi^2_{2 nu}.
        z = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
        shape = torch.full((num_features, 1), self.nu, dtype=torch.float64)
        u = torch._standard_gamma(shape, generator=generator) * 2.0  # chi^2_{2nu} = 2 Gamma(nu, 1)
        return z / torch.sqrt(u / (2 * self.nu)) / self.lengthscale.double()


class Laplace(_Matern):
    r"""Laplace (Matern 1/2) kernel :math:`k(x, y) = \exp(-\|x - y\| / l)`."""

    nu = 0.5

    def profile(self, s: Tensor) -> Tensor:
        return (-_safe_sqrt(s)).exp()


class Matern32(_Matern):
    r"""Matern 3/2 kernel :math:`(1 + \sqrt3 r/l) \exp(-\sqrt3 r/l)`."""

    nu = 1.5

    def profile(self, s: Tensor) -> Tensor:
        u = math.sqrt(3.0) * _safe_sqrt(s)
        return (1.0 + u) * (-u).exp()


class Matern52(_Matern):
    r"""Matern 5/2 kernel :math:`(1 + \sqrt5 r/l + 5 r^2/(3 l^2)) \exp(-\sqrt5 r/l)`."""

    nu = 2.5

    def profile(self, s: Tensor) -> Tensor:
        u = math.sqrt(5.0) * _safe_sqrt(s)
        return (1.0 + u + (5.0 / 3.0) * s) * (-u).exp()


class InverseMultiquadric(RadialKernel):
    r"""Inverse multiquadric kernel :math:`(1 + \|x - y\|^2 / l^2)^{-1/2}`."""

    def profile(self, s: Tensor) -> Tensor:
        return (1.0 + s).rsqrt()


class Energy(RadialKernel):
    r"""Energy (distance) kernel :math:`k(x, y) = -\|x - y\|^\beta`, :math:`0 < \beta \le 2`.

    Conditionally negative definite: MMD^2 under it is the energy distance
    :math:`2 E\|X - Y\|^\beta - E\|X - X'\|^\beta - E\|Y - Y'\|^\beta`; with :math:`\beta = 2`
    it reduces to twice the squared difference of the means.
    """

    conditionally_negative_definite = True

    def __init__(self, beta: float = 1.0) -> None:
        if not 0 < beta <= 2:
            raise InputError(f"energy kernel needs 0 < beta <= 2, got beta={beta}.")
        super().__init__(lengthscale=1.0)
        self.beta = float(beta)

    def profile(self, s: Tensor) -> Tensor:
        if self.beta == 2.0:
            return -s
        if self.beta == 1.0:
            return -_safe_sqrt(s)
        return -(_safe_sqrt(s) ** self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class Mixture(RadialKernel):
    r"""Multi-bandwidth mixture :math:`\sum_i k_0(x, y; l_i)` of one radial kernel.

    Args:
        base: name of a radial kernel plug-in (``"rbf"``, ``"laplace"``, ``"matern32"``, ...).
        lengthscales: the bandwidths :math:`l_i`; with ``relative=True`` they multiply the
            median-heuristic lengthscale of each pair of sets.
        relative: scale ``lengthscales`` by the median heuristic.
    """

    def __init__(
        self,
        base: str = "rbf",
        lengthscales: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        relative: bool = True,
    ) -> None:
        from perturbdiff_core.kernels import as_kernel

        super().__init__(lengthscale="median" if relative else 1.0)
        self.base = as_kernel(base)
        if not isinstance(self.base, RadialKernel):
            raise InputError(f"mixture needs a radial base kernel, {base!r} is {type(self.base).__name__}.")
        if not lengthscales or any(l <= 0 for l in lengthscales):
            raise InputError(f"mixture lengthscales must be a non-empty list of positive numbers, got {lengthscales}.")
        self.register_buffer("inv_sq", torch.tensor([1.0 / l**2 for l in lengthscales]))

    def profile(self, s: Tensor) -> Tensor:
        inv_sq = self.inv_sq.tolist()
        return sum(self.base.profile(s * c) for c in inv_sq)

    def extra_repr(self) -> str:
        return f"base={type(self.base).__name__}, lengthscales={[round(c ** -0.5, 4) for c in self.inv_sq.tolist()]}, {super().extra_repr()}"


__all__ = ["RBF", "Laplace", "Matern32", "Matern52", "InverseMultiquadric", "Energy", "Mixture", "Kernel"]
