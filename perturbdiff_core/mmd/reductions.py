"""Kernel reductions: weighted kernel sums ``w_x^T K(x, y) w_y`` over batches of sets.

Quadratic-time MMD estimators are written once against this one operation, so the same
estimator runs on a dense kernel matrix, on memory-bounded blocks, or on a KeOps LazyTensor
that never forms the ``N x M`` matrix (the GeomLoss design). The backends are plug-ins of the
``perturbdiff.backends`` group. Each declares where it applies (:meth:`KernelReduction.applies`:
a largest call, the devices, the kernels it evaluates) and how much ``backend="auto"`` prefers it
(:attr:`KernelReduction.priority`); :class:`AutoReduction` picks among the registered ones by
those declarations, per call, so the core names none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, InputError, PerturbDiffError, UnknownPluginError, did_you_mean
from .kernels import Kernel

_GROUP = "perturbdiff.backends"
_TERMS = ("xx", "yy", "xy")


class KernelReduction(ABC):
    """Computes ``sum_ij wx_i K(x_i, y_j) wy_j`` for each set pair, differentiably.

    The class attributes are the backend's declaration to ``backend="auto"``; they do not limit
    what it computes when named explicitly.
    """

    #: ``backend="auto"`` takes, among the backends that :meth:`applies` to a call, the one of
    #: highest priority (ties: the first by name). Higher means faster where it applies.
    priority: int = 0
    #: The largest call ``backend="auto"`` gives this backend, in kernel entries
    #: (``batch * (N^2 + M^2 + N M)`` for an MMD): its memory grows with them. None: any size.
    max_entries: int | None = None
    #: Device types (``"cpu"``, ``"cuda"``, ...) on which ``backend="auto"`` uses it. None: any.
    devices: tuple[str, ...] | None = None

    def supports(self, kernel: Kernel, device_type: str) -> bool:
        """True when this backend can evaluate ``kernel`` on ``device_type``."""
        return True

    def applies(self, kernel: Kernel, device_type: str, entries: int) -> bool:
        """Whether ``backend="auto"`` may use this backend for a call of ``entries`` kernel entries.

        Within :attr:`max_entries`, on one of :attr:`devices`, and :meth:`supports` the kernel
        there, checked last since it may be costly (a compiler probe).
        """
        if self.max_entries is not None and entries > self.max_entries:
            return False
        if self.devices is not None and device_type not in self.devices:
            return False
        return self.supports(kernel, device_type)

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


def _registered_backends() -> list[KernelReduction]:
    """Every ``perturbdiff.backends`` plug-in built with its defaults, most preferred first.

    One that fails to import or to build without parameters is left out: it is still usable by
    name, and ``perturbdiff plugins`` reports why it is broken.
    """
    from ..registry import names, resolve

    built = []
    for name in names(_GROUP):
        try:
            built.append(resolve(_GROUP, name))
        except PerturbDiffError:
            continue
    return sorted(built, key=lambda backend: -backend.priority)  # stable: ties stay in name order


class AutoReduction(KernelReduction):
    """Per call, the registered backend of highest :attr:`~KernelReduction.priority` that
    :meth:`~KernelReduction.applies` to the tensors' device, the call's size and the kernel.

    The built-in declarations give: ``dense`` (whole matrices, the fastest) up to its
    ``max_entries``; above it ``keops`` on CUDA tensors where pykeops runs and evaluates the
    kernel; else ``chunked`` (bounded memory at any size). The backends are built once, with
    their defaults, when this object is.
    """

    def __init__(self) -> None:
        self.backends = _registered_backends()

    def choose(self, kernel: Kernel, x: Tensor, y: Tensor, *, terms: tuple[str, ...] = _TERMS) -> KernelReduction:
        """The backend for this call; ``terms`` are the sums it needs (``"xx"``, ``"yy"``, ``"xy"``)."""
        batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2]).numel()
        sizes = {"x": x.shape[-2], "y": y.shape[-2]}
        entries = batch * sum(sizes[t[0]] * sizes[t[1]] for t in terms)
        for backend in self.backends:
            if backend.applies(kernel, x.device.type, entries):
                return backend
        raise ConfigError(
            f"No registered MMD backend applies to {type(kernel).__name__} on {x.device.type} for "
            f"{entries} kernel entries (registered: {', '.join(type(b).__name__ for b in self.backends) or 'none'}); "
            f"name a backend instead of 'auto'."
        )

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
        backend = self.choose(kernel, x, y, terms=("xy",))
        return backend.weighted_sum(kernel, x, y, wx, wy, same=same, exclude_diagonal=exclude_diagonal)

    def mmd_terms(
        self, kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, exclude_diagonal: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.choose(kernel, x, y).mmd_terms(kernel, x, y, wx, wy, exclude_diagonal=exclude_diagonal)

    def __repr__(self) -> str:
        return "AutoReduction()"


def as_reduction(spec: Any, /, **params: Any) -> KernelReduction:
    """A :class:`KernelReduction` from ``"auto"``, a ``perturbdiff.backends`` plug-in name (built
    with ``params``), or an instance."""
    from ..registry import is_registered, names, resolve

    known = names(_GROUP)
    if isinstance(spec, str) and spec == "auto":
        if params:
            raise InputError(
                f"backend='auto' builds every backend with its defaults; the parameters {sorted(params)} "
                f"need a named backend, one of: {', '.join(known)}."
            )
        return AutoReduction()
    if isinstance(spec, str) and not is_registered(_GROUP, spec):
        raise UnknownPluginError(
            f"Unknown MMD backend {spec!r}{did_you_mean(spec, known)}; choose 'auto' or one of: {', '.join(known)}."
        )
    return resolve(_GROUP, spec, **params)
