"""The diffusion layer: noise schedules, the parameterisation (what the denoiser predicts),
denoisers, samplers, and the model that composes them
(:class:`~perturbdiff_core.diffusion.model.RKHSDiffusion`).

Interfaces: :class:`~perturbdiff_core.diffusion.schedules.NoiseSchedule` and
:class:`~perturbdiff_core.diffusion.denoisers.Denoiser`. Imports the foundation,
:mod:`perturbdiff_core.data` (the set batches it trains on) and :mod:`perturbdiff_core.mmd`.

Before the layered layout this path was the model's module; its names are still served from
here, with a :class:`DeprecationWarning` naming :mod:`perturbdiff_core.diffusion.model`.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The old module's names (``RKHSDiffusion``, ...), from :mod:`.model` with a warning."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    model = importlib.import_module(".model", __name__)
    if not hasattr(model, name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .._moved import warn_moved

    warn_moved(f"{__name__}.{name}", f"{model.__name__}.{name}")
    value = globals()[name] = getattr(model, name)  # warned once: ``from ... import`` reads it twice
    return value
