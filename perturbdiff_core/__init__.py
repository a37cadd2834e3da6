"""perturbdiff: diffusion over kernel mean embeddings of single-cell populations.

The core holds the abstract interfaces (kernels, embedding maps, MMD estimators, kernel
reductions, noise schedules, denoisers, perturbation encoders), the entry-point registry and
what composes them. Concrete components are plug-ins found through entry points. The
sub-packages are layers (``docs/architecture.md``): ``data``, ``mmd``, ``diffusion``,
``evaluation``, ``runs``, ``ablation`` and ``suite``, ``cli``, over the foundation modules here.

The names below are imported on first use (PEP 562), so importing a light submodule (the
command line, :mod:`~perturbdiff_core.names`) does not import torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from . import _moved
from ._lazy import lazy_exports

_moved.install()  # the module paths from before the layered layout still import, with a warning

try:
    __version__ = version("perturbdiff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "EmbeddingMap": "mmd.embeddings",
    "Kernel": "mmd.kernels",
    "KernelReduction": "mmd.reductions",
    "MMDEstimator": "mmd.estimators",
    "PerturbDiffError": "errors",
    "QuadraticMMD": "mmd.estimators",
    "RadialKernel": "mmd.kernels",
    "list_plugins": "registry",
    "load": "registry",
    "mmd2": "mmd.functional",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from .errors import PerturbDiffError
    from .mmd.embeddings import EmbeddingMap
    from .mmd.estimators import MMDEstimator, QuadraticMMD
    from .mmd.functional import mmd2
    from .mmd.kernels import Kernel, RadialKernel
    from .mmd.reductions import KernelReduction
    from .registry import list_plugins, load


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
