r"""Kernel mean embedding maps: exact (implicit), random Fourier features and Nystrom.

A ``"median"`` lengthscale is fixed once, by the first ``fit(cells)``, on the pooled
representative cells, so every set is embedded in one shared space (a per-pair median would
give every pair of sets its own kernel, and inner products across pairs would not be
comparable); later fits keep it. Maps that need ``fit`` raise :class:`NotFittedError` when
used before it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from perturbdiff_core.errors import ConfigError, InputError, PerturbDiffError
from perturbdiff_core.mmd.embeddings import EmbeddingMap
from perturbdiff_core.mmd.kernels import Kernel, RadialKernel, as_kernel
from perturbdiff_core.validation import check_sets, normalized_weights


class NotFittedError(PerturbDiffError):
    """An embedding map used before the data-dependent set-up it needs; call ``fit(cells)``."""


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _pooled(cells: Tensor) -> Tensor:
    """Validated cells ``(..., N, G)`` pooled over the batch into one ``(N_total, G)`` matrix."""
    check_sets(cells, cells, name_x="cells", name_y="cells")
    return cells.detach().reshape(-1, cells.shape[-1])


class _KernelEmbedding(EmbeddingMap):
    """Shared plumbing: the kernel from a name, a median lengthscale fixed by ``fit``, buffers made at fit."""

    def __init__(self, kernel: str | Kernel) -> None:
        super().__init__(as_kernel(kernel))

    def _fit_kernel(self, pooled: Tensor) -> Kernel:
        """Fix data-dependent hyperparameters (median heuristic) on the pooled cells ``(N, G)``."""
        if self.kernel.adaptive:
            half = pooled.shape[0] // 2
            self.kernel = self.kernel.adapt(pooled[:half], pooled[half:])
        return self.kernel

    def _fitted_kernel(self) -> Kernel:
        if self.kernel.adaptive:
            raise NotFittedError(
                f"{type(self).__name__} has a kernel with a 'median' lengthscale; call "
                f"fit(cells) with representative cells first to fix it, or give a number."
            )
        return self.kernel

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A "median" lengthscale fixed by fit is saved with the (..., 1, 1) shape of adapt (a constructor's is
        # 0-dim): the fresh map takes it as fixed too, before its kernel loads the value.
        saved = state_dict.get(prefix + "kernel.raw_lengthscale")
        if isinstance(self.kernel, RadialKernel) and self.kernel.adaptive and saved is not None and saved.dim() >= 2:
            self.kernel = self.kernel.fixed_at(saved)
        # Buffers made by fit are None in a fresh map: give them the saved shapes before loading.
        for name, value in self._buffers.items():
            if value is None and prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name])
        super()._load_from_state_dict(state_dict, prefix, *args)


class ExactEmbedding(_KernelEmbedding):
    r"""The exact, implicit kernel mean embedding: :math:`\langle \mu_x, \mu_y \rangle = w_x^\top K(x, y)\, w_y`.

    No finite feature vector exists; :meth:`inner` goes through the kernel (O(N M) per pair).
    The energy kernel (only conditionally positive definite) is allowed: ``inner`` then builds
    the energy distance through :math:`\mathrm{MMD}^2 = \langle\mu_x,\mu_x\rangle + \langle\mu_y,\mu_y\rangle - 2\langle\mu_x,\mu_y\rangle`.

    Args:
        kernel: a ``perturbdiff.kernels`` name or a :class:`~perturbdiff_core.mmd.kernels.Kernel`.
    """

    explicit = False

    def __init__(self, kernel: str | Kernel = "rbf") -> None:
        super().__init__(kernel)

    def fit(self, cells: Tensor) -> ExactEmbedding:
        """Fix a ``"median"`` lengthscale on the pooled ``(..., N, G)`` cells; otherwise nothing to do."""
        self._fit_kernel(_pooled(cells))
        return self

    def features(self, x: Tensor) -> Tensor:
        raise ConfigError(
            "The exact embedding is implicit: it has no finite feature vector, only inner products "
            "through the kernel (inner()). Use the 'rff' or 'nystrom' embedding for explicit features."
        )

    def inner(self, x: Tensor, y: Tensor, wx: Tensor | None, wy: Tensor | None) -> Tensor:
        """``wx^T K(x, y) wy`` per set pair ``(...)``; ``None`` weights are uniform."""
        k = self._fitted_kernel()(x, y)
        wx = normalized_weights(wx, x, name="wx")
        wy = normalized_weights(wy, y, name="wy")
        return (wx.unsqueeze(-2) @ k @ wy.unsqueeze(-1))[..., 0, 0]


class RandomFourierFeatures(_KernelEmbedding):
    r"""Random Fourier features :math:`\phi(x) = \sqrt{2/D}\,[\cos(W x), \sin(W x)]` (Rahimi & Recht 2007).

    Bochner: :math:`k(x - y) = \mathbb{E}_\omega \cos(\omega^\top (x - y))` with :math:`\omega` from the
    kernel's spectral density, so :math:`\langle\phi(x), \phi(y)\rangle` is an unbiased estimate of
    :math:`k(x, y)` with error :math:`O(D^{-1/2})`. The ``[cos, sin]`` pair over :math:`D/2`
    frequencies has lower variance than :math:`\cos(\omega^\top x + b)` with random phases
    (Sutherland & Schneider 2015).

    Frequencies are drawn with a CPU generator seeded by ``seed`` (same draws on every device)
    once the gene count is known, at :meth:`fit` or the first :meth:`features` call, and kept
    as a buffer. For radial kernels they are stored for unit lengthscale and divided by the
    current lengthscale at each call, so a trainable lengthscale keeps its gradient. A
    ``"median"`` lengthscale needs :meth:`fit` first.

    Args:
        kernel: a shift-invariant kernel with a spectral sampler (rbf, laplace, matern32,
            matern52, imq), by name or instance.
        num_features: feature dimension :math:`D` (even: :math:`D/2` frequencies, each a cos and a sin).
        seed: seed of the frequency draws.
    """

    def __init__(self, kernel: str | Kernel = "rbf", num_features: int = 1024, seed: int = 0) -> None:
        if _positive_int(num_features, "num_features") % 2:
            raise InputError(f"num_features must be even (a cos and a sin per frequency), got {num_features}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"seed must be an integer, got {seed!r}.")
        super().__init__(kernel)
        self.num_features = num_features
        self.seed = seed
        self.register_buffer("frequencies", None)

    def fit(self, cells: Tensor) -> RandomFourierFeatures:
        """Fix a ``"median"`` lengthscale on the pooled cells and draw the frequencies for their genes."""
        pooled = _pooled(cells)
        self._fit_kernel(pooled)
        self._draw(pooled.shape[-1], pooled.device)
        return self

    def _draw(self, genes: int, device: torch.device) -> None:
        kernel = self._fitted_kernel()
        generator = torch.Generator().manual_seed(self.seed)
        omega = kernel.sample_spectral(self.num_features // 2, genes, generator)
        if isinstance(kernel, RadialKernel):
            omega = omega * kernel.lengthscale.detach().double().reshape(())
        self.frequencies = omega.to(device)

    def features(self, x: Tensor) -> Tensor:
        check_sets(x, x)
        if self.frequencies is None:
            self._draw(x.shape[-1], x.device)
        elif self.frequencies.shape[-1] != x.shape[-1]:
            raise InputError(
                f"x has {x.shape[-1]} genes but the random features were drawn for "
                f"{self.frequencies.shape[-1]}; embed cells on the genes used at fit/first call."
            )
        kernel = self._fitted_kernel()
        omega = self.frequencies.to(x.dtype)
        if isinstance(kernel, RadialKernel):
            omega = omega / kernel.lengthscale.to(x.dtype).reshape(())
        projection = x @ omega.transpose(0, 1)
        scale = math.sqrt(2.0 / self.num_features)
        return scale * torch.cat([projection.cos(), projection.sin()], dim=-1)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, seed={self.seed}"


class Nystrom(_KernelEmbedding):
    r"""Nystrom features :math:`\phi(x) = K(x, L)\, U_r \Lambda_r^{-1/2}` from landmark cells :math:`L`.

    :math:`K(L, L) = U \Lambda U^\top` (float64 eigendecomposition); eigenvalues below
    ``rcond`` times the largest are dropped (the pseudo-inverse, which keeps the features
    stable without biasing them as a jitter would), so
    :math:`\langle\phi(x), \phi(y)\rangle = K(x, L) K(L, L)^{+} K(L, y)`: exact on the landmarks'
    span. :math:`U_r \Lambda_r^{-1/2}` gives the same inner products as :math:`K(L, L)^{-1/2}`
    with only ``r`` (kept eigenvalues) columns, so the feature dimension is ``r``, known after fit.

    Args:
        kernel: a positive-definite kernel, by name or instance.
        num_landmarks: landmark cells drawn without replacement (all cells when fewer).
        seed: seed of the landmark draw.
        rcond: relative eigenvalue cut-off; ``None`` is the square root of the machine
            epsilon of the cells given to :meth:`fit` (float64: 1.5e-8, float32: 3.5e-4),
            which bounds the rounding error that small eigenvalues amplify.
    """

    def __init__(
        self, kernel: str | Kernel = "rbf", num_landmarks: int = 256, seed: int = 0, rcond: float | None = None
    ) -> None:
        _positive_int(num_landmarks, "num_landmarks")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InputError(f"seed must be an integer, got {seed!r}.")
        if rcond is not None and not (isinstance(rcond, float) and 0.0 <= rcond < 1.0):
            raise InputError(f"rcond must be a float in [0, 1) or None, got {rcond!r}.")
        super().__init__(kernel)
        if self.kernel.conditionally_positive_definite:
            raise ConfigError(
                f"Nystrom features need a positive-definite kernel; {type(self.kernel).__name__} is "
                f"only conditionally positive definite (no feature map). Use the exact embedding for it."
            )
        self.num_landmarks = num_landmarks
        self.seed = seed
        self.rcond = rcond
        self.register_buffer("landmarks", None)
        self.register_buffer("projection", None)

    def fit(self, cells: Tensor) -> Nystrom:
        """Draw landmarks from the pooled ``(..., N, G)`` cells and factor their kernel matrix."""
        pooled = _pooled(cells)
        kernel = self._fit_kernel(pooled)
        generator = torch.Generator().manual_seed(self.seed)
        index = torch.randperm(pooled.shape[0], generator=generator)[: self.num_landmarks]
        landmarks = pooled[index.to(pooled.device)]
        with torch.no_grad():
            gram = kernel(landmarks.double())
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        rcond = math.sqrt(torch.finfo(pooled.dtype).eps) if self.rcond is None else self.rcond
        keep = eigenvalues > rcond * eigenvalues[-1]
        self.landmarks = landmarks
        self.projection = eigenvectors[:, keep] / eigenvalues[keep].sqrt()
        return self

    def features(self, x: Tensor) -> Tensor:
        if self.landmarks is None:
            raise NotFittedError(
                "Nystrom features need landmark cells: call fit(cells) with representative "
                "cells (..., N, G) first."
            )
        landmarks = self.landmarks.to(x.dtype)
        check_sets(x, landmarks, name_y="landmarks")
        return self.kernel.forward(x, landmarks) @ self.projection.to(x.dtype)

    @property
    def num_features(self) -> int:
        """Feature dimension ``r``, the number of kept eigenvalues (known after :meth:`fit`)."""
        if self.projection is None:
            raise NotFittedError("Nystrom has no feature dimension before fit(cells).")
        return self.projection.shape[-1]

    def extra_repr(self) -> str:
        return f"num_landmarks={self.num_landmarks}, seed={self.seed}, rcond={self.rcond}"
