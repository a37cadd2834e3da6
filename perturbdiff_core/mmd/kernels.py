"""Kernel interface: ``k(x, y)`` between cells, batched over sets.

Shapes are a contract: ``(..., N, G), (..., M, G) -> (..., N, M)``, or ``(..., N)`` with
``diag=True``. Subclasses implement :meth:`Kernel.forward` (pure math); the public call does
the plumbing (``y=None`` means ``x``, validation). Most kernels here are radial,
``k(x, y) = f(||x - y||^2 / l^2)``: they implement :meth:`RadialKernel.profile` only, and the
estimators' fast paths (blocked, KeOps, hand-written backward) reuse that one formula.
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, InputError, PerturbDiffDeprecationWarning
from ..validation import check_sets


class Kernel(nn.Module, ABC):
    """A positive-definite kernel on cells, or the negative of a conditionally negative-definite distance."""

    #: True for kernels that are only *conditionally* positive definite: ``c^T K c >= 0`` only
    #: when ``sum(c) = 0``, such as ``k = -d`` for a conditionally negative-definite distance
    #: ``d = ||x - y||^beta``. Such a kernel has no feature map, but MMD^2 (weights of opposite
    #: sums) is still a valid (energy) distance. False for positive-definite kernels.
    conditionally_positive_definite: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that still declares the old name ``conditionally_negative_definite`` keeps working, with a warning."""
        super().__init_subclass__(**kwargs)
        if "conditionally_negative_definite" in cls.__dict__:
            _warn_renamed_flag(cls.__name__, stacklevel=3)
            cls.conditionally_positive_definite = cls.__dict__["conditionally_negative_definite"]
            delattr(cls, "conditionally_negative_definite")  # reads go through the property below

    @property
    def conditionally_negative_definite(self) -> bool:
        """Deprecated name of :attr:`conditionally_positive_definite`: it named the distance ``-k``, not the kernel."""
        _warn_renamed_flag(type(self).__name__, stacklevel=3)
        return self.conditionally_positive_definite

    @conditionally_negative_definite.setter
    def conditionally_negative_definite(self, value: bool) -> None:
        _warn_renamed_flag(type(self).__name__, stacklevel=3)
        self.conditionally_positive_definite = value

    def __call__(self, x: Tensor, y: Tensor | None = None, *, diag: bool = False) -> Tensor:
        """Validated kernel matrix; a data-dependent (median) kernel is first adapted to ``x, y``."""
        same = y is None or y is x
        y = x if y is None else y
        check_sets(x, y)
        if diag and x.shape[-2] != y.shape[-2]:
            raise InputError(
                f"diag=True needs sets of equal size, got {x.shape[-2]} and {y.shape[-2]} cells."
            )
        kernel = self.adapt(x, y) if self.adaptive else self
        return super(Kernel, kernel).__call__(x, y, diag=diag, same=same)

    @property
    def adaptive(self) -> bool:
        """True when hyperparameters come from the data (median heuristic): call :meth:`adapt` first."""
        return False

    @abstractmethod
    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        """Kernel matrix ``(..., N, M)`` (or its diagonal); ``same`` says ``y is x``."""

    def adapt(self, x: Tensor, y: Tensor) -> Kernel:
        """This kernel with data-dependent hyperparameters (median heuristic) fixed for ``x, y``."""
        return self

    def sample_spectral(self, num_features: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
        """Frequencies ``(num_features, dim)`` drawn from the kernel's spectral density.

        Bochner's theorem: a shift-invariant kernel is the Fourier transform of a probability
        measure; random Fourier features need draws from it.
        """
        raise ConfigError(
            f"{type(self).__name__} has no spectral density sampler; random Fourier features "
            f"need a shift-invariant kernel such as rbf, laplace, matern32, matern52 or imq. "
            f"Use the nystrom embedding instead."
        )

    def __add__(self, other: Kernel) -> Kernel:
        if not isinstance(other, Kernel):
            return NotImplemented
        return SumKernel(self, other)

    def __mul__(self, scale: float) -> Kernel:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"A kernel can only be scaled by a positive finite number, got {scale}.")
        return ScaledKernel(self, float(scale))

    __rmul__ = __mul__


def _warn_renamed_flag(owner: str, *, stacklevel: int) -> None:
    warnings.warn(
        f"{owner}: Kernel.conditionally_negative_definite is renamed conditionally_positive_definite (what it says of "
        f"the kernel: c^T K c >= 0 when sum(c) = 0); use the new name, the old one is removed in a later release.",
        PerturbDiffDeprecationWarning,
        stacklevel=stacklevel,
    )


class SumKernel(Kernel):
    r"""Sum of kernels, :math:`k(x, y) = \sum_i k_i(x, y)`."""

    def __init__(self, *kernels: Kernel) -> None:
        super().__init__()
        self.kernels = nn.ModuleList(kernels)
        self.conditionally_positive_definite = any(k.conditionally_positive_definite for k in kernels)

    @property
    def adaptive(self) -> bool:
        return any(k.adaptive for k in self.kernels)

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        return sum(k.forward(x, y, diag=diag, same=same) for k in self.kernels)

    def adapt(self, x: Tensor, y: Tensor) -> Kernel:
        return SumKernel(*(k.adapt(x, y) for k in self.kernels))


class ScaledKernel(Kernel):
    r"""Output scale as a wrapper, :math:`k(x, y) = c\, k_0(x, y)` with :math:`c > 0`."""

    def __init__(self, base: Kernel, scale: float) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.conditionally_positive_definite = base.conditionally_positive_definite

    @property
    def adaptive(self) -> bool:
        return self.base.adaptive

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        return self.scale * self.base.forward(x, y, diag=diag, same=same)

    def adapt(self, x: Tensor, y: Tensor) -> Kernel:
        return ScaledKernel(self.base.adapt(x, y), self.scale)


def squared_distances(x: Tensor, y: Tensor, *, same: bool = False) -> Tensor:
    """``||x_i - y_j||^2`` as ``(..., N, M)`` through one GEMM, centred for float32 accuracy."""
    center = x.mean(dim=-2, keepdim=True).detach()
    x = x - center
    y = x if same else y - center
    xx = x.square().sum(-1)
    yy = xx if same else y.square().sum(-1)
    d2 = xx.unsqueeze(-1) + yy.unsqueeze(-2) - 2.0 * (x @ y.transpose(-1, -2))
    d2 = d2.clamp_min(0.0)
    if same:
        d2 = d2 - torch.diag_embed(torch.diagonal(d2, dim1=-2, dim2=-1))  # exact zeros on the diagonal
    return d2


def median_lengthscale(x: Tensor, y: Tensor, max_cells: int = 512) -> Tensor:
    """Median pairwise distance of the pooled sets, per batch element, shape ``(..., 1, 1)``.

    The median heuristic (Gretton et al. 2012) over distinct pairs ``i != j``; an even count
    takes the mean of the two middle values, as ``numpy.median`` does. Sets are subsampled to
    ``max_cells`` each (evenly spaced, deterministic) so the cost stays bounded.
    """
    def thin(t: Tensor) -> Tensor:
        n = t.shape[-2]
        if n <= max_cells:
            return t
        idx = torch.linspace(0, n - 1, max_cells, device=t.device).long()
        return t.index_select(-2, idx)

    x, y = _pad_batch(thin(x.detach()), thin(y.detach()))
    z = torch.cat([x, y], dim=-2)
    d = squared_distances(z, z, same=True).sqrt()
    n = z.shape[-2]
    if n < 2:
        raise InputError("The median heuristic needs at least 2 pooled cells; give a fixed lengthscale.")
    i, j = torch.triu_indices(n, n, offset=1, device=d.device)
    pairs = d[..., i, j]
    m = pairs.shape[-1]
    lower = pairs.kthvalue((m + 1) // 2, dim=-1).values
    upper = pairs.kthvalue(m // 2 + 1, dim=-1).values
    med = 0.5 * (lower + upper)
    return med.clamp_min(torch.finfo(med.dtype).eps)[..., None, None]


def _pad_batch(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Broadcast batch dims of two sets with different cell counts."""
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    return x.expand(*batch, *x.shape[-2:]), y.expand(*batch, *y.shape[-2:])


class RadialKernel(Kernel):
    r"""A kernel :math:`k(x, y) = f(s)` of the scaled squared distance :math:`s = \|x - y\|^2 / l^2`.

    Subclasses implement :meth:`profile` with method-style tensor operations
    (``s.exp()``, ``s.sqrt()``) so the same formula runs on a ``torch.Tensor`` and a
    ``pykeops`` ``LazyTensor``.

    Args:
        lengthscale: ``"median"`` (the default) for the median heuristic, computed per pair of
            sets from the pooled cells when an estimator calls :meth:`adapt`, or a positive number.
            The heuristic is the default because no fixed number suits expression data: at
            ``l = 1`` the Gaussian kernel between two cells of 1000 log-normalised genes is about
            ``1e-12``, and the MMD sees nothing.
        trainable: learn the lengthscale (stored as its logarithm, so it stays positive).
    """

    def __init__(self, lengthscale: float | str = "median", *, trainable: bool = False) -> None:
        super().__init__()
        self.median = isinstance(lengthscale, str) and lengthscale == "median"
        if not self.median and not _positive_number(lengthscale):
            raise InputError(
                f"lengthscale must be a positive finite number or 'median', got {lengthscale!r}."
            )
        if self.median and trainable:
            raise InputError(
                "A 'median' lengthscale is recomputed from each pair of sets and cannot be trained; "
                "give a number with trainable=True."
            )
        value = 1.0 if self.median else float(lengthscale)
        # float64 so float64 inputs get the lengthscale exactly; as a 0-dim tensor it does not
        # promote float32 inputs (backends cast it with ``.to(x.dtype)`` where it matters).
        log_value = torch.tensor(math.log(value), dtype=torch.float64)
        self.raw_lengthscale = nn.Parameter(log_value, requires_grad=trainable)

    @property
    def adaptive(self) -> bool:
        return self.median

    @property
    def lengthscale(self) -> Tensor:
        """Positive lengthscale, ``exp(raw_lengthscale)``; shape ``()`` or ``(..., 1, 1)``.

        A ``"median"`` kernel has none until :meth:`adapt` fixes it for a pair of sets: reading it
        before is an error, so no code path can silently compute with a placeholder.
        """
        if self.median:
            raise InputError(
                f"{type(self).__name__} has a 'median' lengthscale, known only once it sees the cells; "
                f"call kernel.adapt(x, y) (estimators and kernel(x, y) do) or give a number."
            )
        return self.raw_lengthscale.exp()

    @abstractmethod
    def profile(self, s: Tensor) -> Tensor:
        """``f(s)`` for the scaled squared distance ``s >= 0`` (Tensor or KeOps LazyTensor)."""

    def profile_(self, s: Tensor) -> Tensor:
        """``f(s)`` without autograd, computed in place where possible: ``s`` may be overwritten and the
        result is the return value (which may be ``s``). Override with in-place ops for speed."""
        return s.copy_(self.profile(s))

    def profile_grad(self, s: Tensor) -> Tensor:
        """``f'(s)``, for hand-written backward passes; by default through autograd."""
        with torch.enable_grad():
            s = s.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.profile(s).sum(), s)
        return grad

    def scaled_squared_distances(self, x: Tensor, y: Tensor, *, same: bool = False) -> Tensor:
        """``||x - y||^2 / l^2`` as ``(..., N, M)``."""
        return squared_distances(x, y, same=same) / self.lengthscale.square()

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        if diag:
            s = (x - y).square().sum(-1) / self.lengthscale.square().squeeze(-1)
            return self.profile(s)
        return self.profile(self.scaled_squared_distances(x, y, same=same))

    def adapt(self, x: Tensor, y: Tensor) -> Kernel:
        if not self.median:
            return self
        return self.fixed_at(median_lengthscale(x, y).log())

    def fixed_at(self, raw_lengthscale: Tensor) -> RadialKernel:
        """A copy of this kernel whose lengthscale is fixed (not trained) at ``exp(raw_lengthscale)``:
        what :meth:`adapt` computes, or a fitted value read back from a state dict."""
        fitted = copy.copy(self)  # shallow: shares everything but the lengthscale
        fitted._parameters = dict(self._parameters)
        fitted.median = False
        fitted.raw_lengthscale = nn.Parameter(raw_lengthscale.detach().clone(), requires_grad=False)
        return fitted

    def extra_repr(self) -> str:
        if self.median:
            return "lengthscale=median"
        l = self.lengthscale
        return f"lengthscale={l.item():.4g}" if l.numel() == 1 else f"lengthscale=<per set pair, {tuple(l.shape)}>"


def _positive_number(value: Any) -> bool:
    """A real, finite, positive scalar (bools and strings excluded)."""
    if isinstance(value, Tensor):
        return value.numel() == 1 and bool(torch.isfinite(value) & (value > 0))
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def as_kernel(spec: Any, /, **params: Any) -> Kernel:
    """A :class:`Kernel` from a plug-in name (with parameters) or an instance."""
    from ..registry import resolve

    return resolve("perturbdiff.kernels", spec, **params)
