"""Module paths from before the layered layout (``docs/architecture.md``), kept importable.

``import perturbdiff_core.kernels`` (and ``from perturbdiff_core.kernels import Kernel``, and every
other path in :data:`MOVED`) still works: a finder on :data:`sys.meta_path` serves the module
under its new path, the same module object (so the same classes), with a
:class:`DeprecationWarning` that names the new path. A moved package carries its submodules
(``perturbdiff_core.commands.train`` is ``perturbdiff_core.cli.commands.train``).

The one place that knows the old layout; installed by :mod:`perturbdiff_core` on import. It
imports nothing heavy, so ``perturbdiff --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: Old module (under ``perturbdiff_core``) -> its new path. Removed in a later release. (Two
#: modules of ``evaluation`` were renamed so that no two modules share a name: ``data.pairing``
#: and ``runs.pipeline`` keep theirs.)
MOVED = {
    "anchor": "runs.anchor",
    "batch": "data.batch",
    "checkpoint": "runs.checkpoint",
    "commands": "cli.commands",
    "denoisers": "diffusion.denoisers",
    "distributed": "runs.distributed",
    "embeddings": "mmd.embeddings",
    "encoders": "data.encoders",
    "estimators": "mmd.estimators",
    "etest": "mmd.etest",
    "evaluation.pairing": "evaluation.paired",
    "evaluation.pipeline": "evaluation.metrics",
    "functional": "mmd.functional",
    "kernels": "mmd.kernels",
    "model_predictor": "runs.model_predictor",
    "parameterization": "diffusion.parameterization",
    "pipeline": "runs.pipeline",
    "prediction": "runs.prediction",
    "predictors": "evaluation.predictors",
    "pretraining": "runs.pretraining",
    "provenance": "runs.provenance",
    "reductions": "mmd.reductions",
    "reference": "cli.reference",
    "run_config": "runs.config",
    "run_folder": "runs.folder",
    "samplers": "diffusion.samplers",
    "schedules": "diffusion.schedules",
    "summary": "runs.summary",
    "training": "runs.training",
    "transfer": "runs.transfer",
    "two_sample": "mmd.two_sample",
}
# ``perturbdiff_core.diffusion`` was the model's module and is now the package of the diffusion
# layer: the package forwards the old module's names (see ``diffusion/__init__.py``).

PACKAGE = __name__.rpartition(".")[0]


def new_name(fullname: str) -> str | None:
    """The current path of a module imported by its old path, or None when the path is current."""
    prefix = PACKAGE + "."
    if not fullname.startswith(prefix):
        return None
    name = fullname[len(prefix) :]
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return f"{prefix}{new}{name[len(old):]}"
    return None


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """The one-line deprecation of an old path."""
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path is removed in a later release).",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _AliasLoader(importlib.abc.Loader):
    """Serves the module at its new path under the old name: the same object, not a copy."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warn_moved(spec.name, self.new)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system set __spec__ to the alias's spec; the module keeps its own.
        module.__spec__ = self._spec


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED` (and of their submodules)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder first on :data:`sys.meta_path`, once."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
