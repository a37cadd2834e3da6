"""perturbdiff: diffusion over kernel mean embeddings of single-cell populations.

The core holds the abstract interfaces (kernels, embedding maps, MMD estimators, kernel
reductions, noise schedules, denoisers, perturbation encoders), the entry-point registry and
what composes them. Concrete components are plug-ins found through entry points.

The names below are imported on first use (PEP 562), so importing a light submodule (the
command line, :mod:`~perturbdiff_core.names`) does not import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("perturbdiff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "EmbeddingMap": "embeddings",
    "Kernel": "kernels",
    "KernelReduction": "reductions",
    "MMDEstimator": "estimators",
    "PerturbDiffError": "errors",
    "QuadraticMMD": "estimators",
    "RadialKernel": "kernels",
    "list_plugins": "registry",
    "load": "registry",
    "mmd2": "functional",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from .embeddings import EmbeddingMap
    from .errors import PerturbDiffError
    from .estimators import MMDEstimator, QuadraticMMD
    from .functional import mmd2
    from .kernels import Kernel, RadialKernel
    from .reductions import KernelReduction
    from .registry import list_plugins, load


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
