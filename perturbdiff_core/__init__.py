"""perturbdiff: diffusion over kernel mean embeddings of single-cell populations.

The core holds the abstract interfaces (kernels, embedding maps, MMD estimators, kernel
reductions, noise schedules, denoisers, perturbation encoders), the entry-point registry and
what composes them. Concrete components are plug-ins found through entry points.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .embeddings import EmbeddingMap
from .errors import PerturbDiffError
from .estimators import MMDEstimator, QuadraticMMD
from .functional import mmd2
from .kernels import Kernel, RadialKernel
from .reductions import KernelReduction
from .registry import list_plugins, load

try:
    __version__ = version("perturbdiff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = [
    "EmbeddingMap",
    "Kernel",
    "KernelReduction",
    "MMDEstimator",
    "PerturbDiffError",
    "QuadraticMMD",
    "RadialKernel",
    "__version__",
    "list_plugins",
    "load",
    "mmd2",
]
