"""Any GPyTorch kernel as a perturbdiff kernel, so GPyTorch's whole zoo works without new code."""

from __future__ import annotations

import contextlib
import inspect
import io
import math
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from perturbdiff_core.errors import ConfigError, InputError, UnknownPluginError
from perturbdiff_core.mmd.kernels import Kernel

if TYPE_CHECKING:
    import gpytorch


@cache
def _gpytorch() -> Any:
    """``gpytorch``, imported on first use rather than when the plug-ins are listed. GPyTorch imports
    pykeops when it is installed, and pykeops prints a note about CUDA on machines without it; that
    note is muted here, since this adapter never runs KeOps (the ``keops`` backend shows it)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import gpytorch
    return gpytorch


def gpytorch_kernel_names() -> list[str]:
    """Names of the kernel classes in ``gpytorch.kernels``."""
    gpytorch = _gpytorch()
    return sorted(
        name
        for name, obj in vars(gpytorch.kernels).items()
        if inspect.isclass(obj) and issubclass(obj, gpytorch.kernels.Kernel) and obj is not gpytorch.kernels.Kernel
    )


def _accepted_params(cls: type) -> set[str]:
    """Named constructor arguments of ``cls`` and its GPyTorch bases (they pass ``**kwargs`` up)."""
    gpytorch = _gpytorch()
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if not (isinstance(klass, type) and issubclass(klass, gpytorch.kernels.Kernel)):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                accepted.add(p.name)
    return accepted


def _build(class_name: str, params: dict[str, Any]) -> gpytorch.kernels.Kernel:
    """``gpytorch.kernels.<class_name>(**params)``, rejecting unknown classes and misspelt arguments.

    GPyTorch's base kernel swallows unknown keyword arguments silently, so they are checked here.
    """
    gpytorch = _gpytorch()
    cls = getattr(gpytorch.kernels, class_name, None) if isinstance(class_name, str) else None
    if not (inspect.isclass(cls) and issubclass(cls, gpytorch.kernels.Kernel)):
        raise UnknownPluginError(
            f"gpytorch.kernels has no kernel class {class_name!r}; known names: "
            f"{', '.join(gpytorch_kernel_names())}."
        )
    accepted = _accepted_params(cls)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(
            f"gpytorch.kernels.{class_name} does not take {', '.join(unknown)}; it accepts "
            f"{', '.join(sorted(accepted))}."
        )
    try:
        return cls(**params)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"gpytorch.kernels.{class_name}({params}) failed: {err}") from err


class GPyTorchKernel(Kernel):
    r"""A ``gpytorch.kernels.Kernel``, evaluated to a dense ``(..., N, M)`` matrix.

    Leading batch dimensions of ``x`` and ``y`` are broadcast before the GPyTorch kernel sees them.

    Args:
        class_name: a class of ``gpytorch.kernels`` (``"RBFKernel"``, ``"MaternKernel"``, ...),
            built with ``params``; give either ``class_name`` or ``kernel``. (Not ``name``: the
            registry's ``load(group, name, **params)`` takes that keyword itself.)
        kernel: an already built GPyTorch kernel (for compositions such as ``ScaleKernel``).
        lengthscale: set on the GPyTorch kernel after construction (kernels with a lengthscale).
        trainable: let the GPyTorch hyperparameters learn; frozen by default, like the built-ins.
        **params: constructor arguments of the ``class_name`` class; misspelt ones are rejected.

    Example:
        >>> import torch
        >>> k = GPyTorchKernel("MaternKernel", nu=2.5, lengthscale=1.3)  # or as_kernel("gpytorch", class_name=...)
        >>> k(torch.randn(4, 10, 3), torch.randn(4, 7, 3)).shape
        torch.Size([4, 10, 7])
    """

    def __init__(
        self,
        class_name: str | None = None,
        *,
        kernel: gpytorch.kernels.Kernel | None = None,
        lengthscale: float | None = None,
        trainable: bool = False,
        **params: Any,
    ) -> None:
        super().__init__()
        gpytorch = _gpytorch()
        if (class_name is None) == (kernel is None):
            raise ConfigError(
                "GPyTorchKernel needs exactly one of class_name='RBFKernel' (a gpytorch.kernels class) "
                "or kernel=<instance>."
            )
        if kernel is not None and params:
            raise ConfigError(f"Parameters {sorted(params)} were given with a built kernel; set them when building it.")
        if kernel is not None and not isinstance(kernel, gpytorch.kernels.Kernel):
            raise ConfigError(f"kernel must be a gpytorch.kernels.Kernel, got {type(kernel).__name__}.")
        self.gpytorch_kernel = _build(class_name, params) if kernel is None else kernel
        if lengthscale is not None:
            self._set_lengthscale(lengthscale)
        self.gpytorch_kernel.requires_grad_(trainable)

    def _set_lengthscale(self, value: float) -> None:
        if not self.gpytorch_kernel.has_lengthscale:
            raise ConfigError(
                f"gpytorch.kernels.{type(self.gpytorch_kernel).__name__} has no lengthscale; drop lengthscale=."
            )
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        if not ok:
            raise InputError(f"lengthscale must be a positive finite number, got {value!r}.")
        self.gpytorch_kernel.lengthscale = value

    def forward(self, x: Tensor, y: Tensor, *, diag: bool = False, same: bool = False) -> Tensor:
        batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
        x = x.expand(*batch, *x.shape[-2:])
        y = x if same else y.expand(*batch, *y.shape[-2:])
        gpytorch = _gpytorch()
        from linear_operator import to_dense  # installed with gpytorch

        with gpytorch.settings.lazily_evaluate_kernels(False):
            return to_dense(self.gpytorch_kernel(x, y, diag=diag))
