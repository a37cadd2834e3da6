"""Built-in radial kernels (GPyTorch conventions, ``r = ||x - y||``, ``s = r^2 / l^2``); their lengthscale defaults to the median heuristic."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.mmd.kernels import RadialKernel, as_kernel


def _safe_sqrt(s: Tensor) -> Tensor:
    """``sqrt(s)`` whose gradient at ``s = 0`` is 0 instead of inf (a valid subgradient)."""
    if not isinstance(s, Tensor):  # KeOps LazyTensor: KeOps differentiates sqrt safely itself
        return s.sqrt()
    tiny = torch.finfo(s.dtype).tiny
    return torch.where(s > 0, s.clamp_min(tiny).sqrt(), torch.zeros_like(s))


def _spectral_lengthscale(kernel: RadialKernel) -> Tensor:
    """The kernel's single lengthscale in float64, detached, for drawing random frequencies."""
    if kernel.median:
        raise ConfigError(
            f"{type(kernel).__name__} has a 'median' lengthscale, which is only known once data "
            f"is seen; call kernel.adapt(x, y) (or the embedding's fit(cells)) before drawing "
            f"frequencies, or give a fixed lengthscale."
        )
    lengthscale = kernel.lengthscale.detach()
    if lengthscale.numel() != 1:
        raise ConfigError(
            f"Random frequencies need one lengthscale, {type(kernel).__name__} has one per set "
            f"pair {tuple(lengthscale.shape)}; adapt it on pooled cells instead."
        )
    return lengthscale.double().reshape(())


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
        return (-0.5 * s).exp_().mul_(-0.5)

    def sample_spectral(self, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        """:math:`\\omega \\sim N(0, I / l^2)`, the spectral density of the Gaussian kernel."""
        z = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
        return z / _spectral_lengthscale(self)


class _Matern(RadialKernel):
    """Matern kernels share the Student-t spectral density with ``2 nu`` degrees of freedom."""

    nu: float

    def sample_spectral(self, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Multivariate Student-t draws, :math:`\omega = z / (l \sqrt{u / 2\nu})`.

        The Matern-:math:`\nu` spectral density is proportional to
        :math:`(2\nu / l^2 + \|\omega\|^2)^{-(\nu + d/2)}`: a Student-t with :math:`2\nu` degrees of
        freedom and scale :math:`1/l`; :math:`z \sim N(0, I)`, :math:`u \sim \chi^2_{2\nu} = 2\,\Gamma(\nu, 1)`.
        """
        z = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
        shape = torch.full((num_features, 1), self.nu, dtype=torch.float64)
        u = 2.0 * torch._standard_gamma(shape, generator=generator)
        return z / torch.sqrt(u / (2.0 * self.nu)) / _spectral_lengthscale(self)


class Laplace(_Matern):
    r"""Laplace (Matern 1/2) kernel :math:`k(x, y) = \exp(-\|x - y\| / l)`."""

    nu = 0.5

    def profile(self, s: Tensor) -> Tensor:
        return (-_safe_sqrt(s)).exp()

    def profile_(self, s: Tensor) -> Tensor:
        return s.sqrt_().neg_().exp_()

    def profile_grad(self, s: Tensor) -> Tensor:
        """:math:`-e^{-\\sqrt s} / (2 \\sqrt s)`, and 0 at ``s = 0`` (the subgradient of :func:`_safe_sqrt`)."""
        root = s.sqrt()
        return (-root).exp_().div_(root.mul_(-2.0)).nan_to_num_(neginf=0.0)  # -1/0 at s = 0


class Matern32(_Matern):
    r"""Matern 3/2 kernel :math:`(1 + \sqrt3 r/l) \exp(-\sqrt3 r/l)`."""

    nu = 1.5

    def profile(self, s: Tensor) -> Tensor:
        u = math.sqrt(3.0) * _safe_sqrt(s)
        return (1.0 + u) * (-u).exp()

    def profile_(self, s: Tensor) -> Tensor:
        u = s.mul_(3.0).sqrt_()
        return torch.exp(-u).mul_(u.add_(1.0))

    def profile_grad(self, s: Tensor) -> Tensor:
        """:math:`f'(s) = -\\tfrac32 e^{-\\sqrt{3s}}` (finite at 0: Matern 3/2 is once differentiable)."""
        return (3.0 * s).sqrt_().neg_().exp_().mul_(-1.5)


class Matern52(_Matern):
    r"""Matern 5/2 kernel :math:`(1 + \sqrt5 r/l + 5 r^2/(3 l^2)) \exp(-\sqrt5 r/l)`."""

    nu = 2.5

    def profile(self, s: Tensor) -> Tensor:
        u = math.sqrt(5.0) * _safe_sqrt(s)
        return (1.0 + u + (5.0 / 3.0) * s) * (-u).exp()

    def profile_(self, s: Tensor) -> Tensor:
        u = (5.0 * s).sqrt_()
        polynomial = s.mul_(5.0 / 3.0).add_(u).add_(1.0)
        return polynomial.mul_(u.neg_().exp_())

    def profile_grad(self, s: Tensor) -> Tensor:
        """:math:`f'(s) = -\\tfrac56 (1 + u) e^{-u}`, :math:`u = \\sqrt{5 s}`."""
        u = (5.0 * s).sqrt_()
        return torch.exp(-u).mul_(u.add_(1.0)).mul_(-5.0 / 6.0)


class InverseMultiquadric(RadialKernel):
    r"""Inverse multiquadric kernel :math:`(1 + \|x - y\|^2 / l^2)^{-1/2}`."""

    def profile(self, s: Tensor) -> Tensor:
        return (1.0 + s).rsqrt()

    def profile_(self, s: Tensor) -> Tensor:
        return s.add_(1.0).rsqrt_()

    def profile_grad(self, s: Tensor) -> Tensor:
        """:math:`f'(s) = -\\tfrac12 (1 + s)^{-3/2}`."""
        return (1.0 + s).pow_(-1.5).mul_(-0.5)

    def sample_spectral(self, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        r"""Gaussian scale mixture, :math:`\omega = z \sqrt{2t} / l`, :math:`t \sim \Gamma(1/2, 1)`.

        :math:`(1 + s)^{-1/2} = \mathbb{E}_t\, e^{-t s}` for :math:`t \sim \Gamma(1/2, 1)`, and
        :math:`e^{-t r^2 / l^2}` is a Gaussian kernel with spectral density :math:`N(0, 2t I / l^2)`.
        """
        z = torch.randn(num_features, dim, generator=generator, dtype=torch.float64)
        t = torch._standard_gamma(torch.full((num_features, 1), 0.5, dtype=torch.float64), generator=generator)
        return z * torch.sqrt(2.0 * t) / _spectral_lengthscale(self)


class Energy(RadialKernel):
    r"""Energy (distance) kernel :math:`k(x, y) = -\|x - y\|^\beta`, :math:`0 < \beta \le 2`.

    The distance :math:`\|x - y\|^\beta` is conditionally negative definite (Schoenberg), so this
    kernel is conditionally positive definite, not positive definite. MMD^2 under it is the energy distance
    :math:`2 E\|X - Y\|^\beta - E\|X - X'\|^\beta - E\|Y - Y'\|^\beta`; with :math:`\beta = 2`
    it reduces to twice the squared difference of the means. Its lengthscale is fixed at 1.
    """

    conditionally_positive_definite = True

    def __init__(self, beta: float = 1.0) -> None:
        ok = isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta <= 2
        if not ok:
            raise InputError(f"energy kernel needs a number 0 < beta <= 2, got beta={beta!r}.")
        super().__init__(lengthscale=1.0)
        self.beta = float(beta)

    def profile(self, s: Tensor) -> Tensor:
        if self.beta == 2.0:
            return -s
        if self.beta == 1.0:
            return -_safe_sqrt(s)
        if not isinstance(s, Tensor):  # KeOps LazyTensor: its Powf is single precision (C powf)
            return -((-s).ifelse(0.0, ((0.5 * self.beta) * s.log()).exp()))
        return -(_safe_sqrt(s) ** self.beta)

    def profile_(self, s: Tensor) -> Tensor:
        if self.beta == 2.0:
            return s.neg_()
        if self.beta == 1.0:
            return s.sqrt_().neg_()
        return s.pow_(0.5 * self.beta).neg_()

    def profile_grad(self, s: Tensor) -> Tensor:
        """:math:`f'(s) = -\\tfrac\\beta2 s^{\\beta/2 - 1}`, and 0 at ``s = 0`` for :math:`\\beta < 2`
        (the subgradient of :func:`_safe_sqrt`)."""
        if self.beta == 2.0:
            return torch.full_like(s, -1.0)
        return s.pow(0.5 * self.beta - 1.0).mul_(-0.5 * self.beta).nan_to_num_(neginf=0.0)  # -inf at s = 0

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class Mixture(RadialKernel):
    r"""Multi-bandwidth mixture :math:`\sum_i k_0(x, y; l\, l_i)` of one radial kernel.

    :math:`k(x, x)` is the number of bandwidths (the terms are not averaged).

    Args:
        base: name of a radial kernel plug-in (``"rbf"``, ``"laplace"``, ``"matern32"``, ...) or
            an instance; its own lengthscale is not used (the mixture's replaces it), so an
            instance must keep the default (``"median"``) or 1.
        lengthscales: the bandwidths :math:`l_i`.
        relative: :math:`l` is the median-heuristic lengthscale of each pair of sets; otherwise
            :math:`l = 1` and ``lengthscales`` are absolute.
    """

    def __init__(
        self,
        base: str | RadialKernel = "rbf",
        lengthscales: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        relative: bool = True,
    ) -> None:
        super().__init__(lengthscale="median" if relative else 1.0)
        self.base = as_kernel(base)
        if not isinstance(self.base, RadialKernel):
            raise InputError(f"mixture needs a radial base kernel, {base!r} is {type(self.base).__name__}.")
        if not self.base.median and self.base.raw_lengthscale.item() != 0.0:
            raise InputError(
                "mixture sets the bandwidths itself; build the base kernel with the default "
                "lengthscale and put the bandwidths in `lengthscales`."
            )
        valid = [
            isinstance(l, (int, float)) and not isinstance(l, bool) and math.isfinite(l) and l > 0
            for l in lengthscales
        ]
        if not valid or not all(valid):
            raise InputError(
                f"mixture lengthscales must be a non-empty list of positive numbers, got {lengthscales!r}."
            )
        self.lengthscales = tuple(float(l) for l in lengthscales)

    def profile(self, s: Tensor) -> Tensor:
        return sum(self.base.profile(s * (1.0 / l**2)) for l in self.lengthscales)

    def profile_(self, s: Tensor) -> Tensor:
        """The sum accumulated in place, one temporary per bandwidth (``s`` itself is left as it is)."""
        total = None
        for l in self.lengthscales:
            term = self.base.profile_(s * (1.0 / l**2))
            total = term if total is None else total.add_(term)
        return total

    def profile_grad(self, s: Tensor) -> Tensor:
        """:math:`\\sum_i f_0'(s / l_i^2) / l_i^2`, accumulated in place."""
        total = None
        for l in self.lengthscales:
            term = self.base.profile_grad(s * (1.0 / l**2)).mul_(1.0 / l**2)
            total = term if total is None else total.add_(term)
        return total

    def extra_repr(self) -> str:
        return f"base={type(self.base).__name__}, lengthscales={list(self.lengthscales)}, {super().extra_repr()}"


__all__ = ["RBF", "Laplace", "Matern32", "Matern52", "InverseMultiquadric", "Energy", "Mixture"]
