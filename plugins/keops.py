"""KeOps kernel reduction: ``w_x^T K(x, y) w_y`` without ever forming the ``N x M`` matrix.

The kernel matrix is a ``pykeops`` ``LazyTensor``: KeOps compiles the formula
``sum_j f(||x_i - y_j||^2 / l^2) wy_j`` into a fused map-reduce kernel that streams over the cells, so memory is
``O((N + M) G)`` and an MMD over 10^5 cells fits anywhere. Gradients to ``x``, ``y``, the weights
and a trainable lengthscale come from KeOps' symbolic autodiff. The first call of each new formula
(kernel, gene count, dtype) compiles C++ (how long: ``benchmarks/README.md``); the binary is
cached on disk (``pykeops.get_build_folder()``) for later runs. Before its first use in a process,
a child process compiles and checks a small formula: a KeOps build that crashes on this machine (a
segmentation fault in its CUDA runtime compiler, say) then makes the backend unavailable, with the
reason, and ``auto`` passes over it (to ``chunked``), instead of killing the training process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import cache
from typing import Any

import torch
from torch import Tensor

from perturbdiff_core.errors import ConfigError, PluginLoadError
from perturbdiff_core.mmd.kernels import Kernel, RadialKernel, ScaledKernel, SumKernel
from perturbdiff_core.mmd.reductions import KernelReduction

_INSTALL_HINT = (
    "install pykeops (pip install pykeops) and a C++ compiler with the Python headers "
    "(e.g. apt-get install g++ python3-dev, or set CXX), or use backend='chunked' instead"
)


#: A Gaussian kernel sum that KeOps compiles and checks against torch, in a child process.
_PROBE = """
import sys, torch
from pykeops.torch import LazyTensor
x = torch.randn(5, 3, dtype=torch.float64, device=sys.argv[1])
y = torch.randn(4, 3, dtype=torch.float64, device=sys.argv[1])
ours = (-((LazyTensor(x[:, None]) - LazyTensor(y[None])) ** 2).sum(-1)).exp().sum(1)
ref = torch.exp(-torch.cdist(x, y) ** 2).sum(1, keepdim=True)
sys.exit(0 if torch.allclose(ours, ref) else 3)
"""
#: Seconds the probe may take: a first KeOps run on a machine also builds its compiler engine.
_PROBE_TIMEOUT_S = 600


def _probe_failure(device_type: str) -> str | None:
    """Why KeOps fails a small formula on ``device_type`` in a child process, or None when it passes.

    A KeOps build that does not match the machine (its CUDA runtime compiler, say) can kill the
    process with a segmentation fault, which no ``except`` catches; the child takes that risk.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, device_type], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"a probe formula did not compile within {_PROBE_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        how = f"crashed ({signal.Signals(-done.returncode).name})"
    elif done.returncode == 3:
        how = "gave a wrong result"
    else:
        how = f"failed ({(done.stderr.strip().splitlines() or ['no message'])[-1]})"
    return f"pykeops {how} on a probe formula on {device_type}"


@cache
def _keops_problem(device_type: str) -> str | None:
    """Why KeOps cannot run on ``device_type`` here, or None when it can (checked once per process)."""
    try:
        import pykeops.config
    except ImportError as err:
        return f"pykeops is not importable ({err})"
    if not pykeops.config.pykeops_base.get_cxx_compiler():
        return "pykeops found no C++ compiler"
    if device_type == "cuda" and not pykeops.config.gpu_available:
        return "pykeops runs in CPU-only mode (it found no CUDA toolkit) but the tensors are on a GPU"
    if device_type not in ("cpu", "cuda"):
        return f"pykeops supports CPU and CUDA tensors, not {device_type!r}"
    return _probe_failure(device_type)


def _lazy_tensor(device_type: str) -> Any:
    """The ``pykeops.torch.LazyTensor`` class, or a PluginLoadError saying what to install."""
    problem = _keops_problem(device_type)
    if problem is not None:
        raise PluginLoadError(f"The keops backend cannot run: {problem}; {_INSTALL_HINT}.")
    from pykeops.torch import LazyTensor

    return LazyTensor


def keops_evaluable(kernel: Kernel) -> bool:
    """True for radial kernels and sums / positive multiples of them (what KeOps can stream)."""
    if isinstance(kernel, RadialKernel):
        return True
    if isinstance(kernel, ScaledKernel):
        return keops_evaluable(kernel.base)
    if isinstance(kernel, SumKernel):
        return all(keops_evaluable(k) for k in kernel.kernels)
    return False


def _lead(t: Tensor, batch_dims: int, event_dims: int) -> Tensor:
    """``t`` with leading size-1 dims so it has ``batch_dims`` batch dims before its event dims."""
    missing = batch_dims - (t.dim() - event_dims)
    return t.reshape((1,) * missing + tuple(t.shape))


def _lengthscale_batches(kernel: Kernel) -> list[torch.Size]:
    """Batch shapes of every lengthscale in a (composite) radial kernel: ``()`` or ``(...)`` of ``(..., 1, 1)``."""
    if isinstance(kernel, RadialKernel):
        l = kernel.lengthscale
        return [l.shape[:-2] if l.dim() >= 2 else torch.Size()]
    if isinstance(kernel, ScaledKernel):
        return _lengthscale_batches(kernel.base)
    return [s for k in kernel.kernels for s in _lengthscale_batches(k)]


class _Formula:
    """Builds the symbolic kernel ``K_ij = f(||x_i - y_j||^2 / l^2)`` of one reduction."""

    def __init__(self, lazy: Any, x_i: Any, y_j: Any, batch_dims: int, dtype: torch.dtype) -> None:
        self.lazy, self.batch_dims, self.dtype = lazy, batch_dims, dtype
        self.sqdist = x_i.sqdist(y_j)  # ||x_i - y_j||^2 from differences: no float32 cancellation

    def kernel(self, kernel: Kernel) -> Any:
        """``K_ij`` as a LazyTensor; ``kernel`` must satisfy :func:`keops_evaluable`."""
        if isinstance(kernel, RadialKernel):
            return kernel.profile(self.sqdist * self._inverse_square(kernel.lengthscale))
        if isinstance(kernel, ScaledKernel):
            return kernel.scale * self.kernel(kernel.base)
        return sum(self.kernel(k) for k in kernel.kernels)

    def _inverse_square(self, lengthscale: Tensor) -> Any:
        """``1 / l^2`` as a KeOps parameter (a runtime value: no recompilation when it changes)."""
        inv = lengthscale.to(self.dtype).square().reciprocal()
        inv = inv.reshape(inv.shape[:-2]) if inv.dim() >= 2 else inv
        return self.lazy(_lead(inv, self.batch_dims, 0)[..., None, None, None])


class KeOpsReduction(KernelReduction):
    """Streams ``sum_ij wx_i k(x_i, y_j) wy_j`` through KeOps: O(N + M) memory, any set size.

    Slower than the dense GEMM path for small sets (and much slower on CPU); the choice for
    large sets on a GPU. Evaluates radial kernels and their sums and positive multiples.

    ``backend="auto"``: on CUDA tensors only, preferred to ``chunked`` where dense does not apply
    and :meth:`supports` the kernel (pykeops imports and passes its probe).
    """

    priority = 20
    devices = ("cuda",)

    def supports(self, kernel: Kernel, device_type: str) -> bool:
        return keops_evaluable(kernel) and _keops_problem(device_type) is None

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
        if not keops_evaluable(kernel):
            raise ConfigError(
                f"The keops backend evaluates radial kernels k = f(||x - y||^2 / l^2) (and sums "
                f"of them) only; {type(kernel).__name__} is not one. Use backend='dense' or "
                f"backend='chunked' for it."
            )
        lazy = _lazy_tensor(x.device.type)
        lengthscales = _lengthscale_batches(kernel)
        batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2], wx.shape[:-1], wy.shape[:-1], *lengthscales)
        nb = len(batch)
        x_i = lazy(_lead(x, nb, 2).unsqueeze(-2).contiguous())
        y_j = lazy(_lead(y, nb, 2).unsqueeze(-3).contiguous())
        w_j = lazy(_lead(wy.to(x.dtype), nb, 1)[..., None, :, None].contiguous())
        k_ij = _Formula(lazy, x_i, y_j, nb, x.dtype).kernel(kernel)
        try:
            kw = (k_ij * w_j).sum(dim=nb + 1)  # (*batch, N, 1): sum_j K_ij wy_j
        except ImportError as err:  # KeOps failed to compile or load the generated module
            raise PluginLoadError(
                f"KeOps could not compile its kernel ({type(err).__name__}: {err}); {_INSTALL_HINT}."
            ) from err
        total = (wx * kw.squeeze(-1)).sum(-1)
        if exclude_diagonal:
            # Radial kernels are constant on the diagonal: k(x_i, x_i) = f(0).
            first = x[..., :1, :]
            k0 = kernel.forward(first, first, diag=True, same=True).squeeze(-1)
            total = total - k0 * (wx * wy).sum(-1)
        return total
