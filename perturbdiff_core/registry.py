"""Plug-in registry over Python entry points.

Every component (built-in or third party) is declared under one of the entry-point groups in
:data:`GROUPS` in some distribution's ``pyproject.toml``. Listing reads only metadata; a
plug-in is imported the first time it is loaded, checked against its interface, and a plug-in
that fails to import is reported without breaking the others.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import PerturbDiffError, PluginLoadError, UnknownPluginError, did_you_mean, first_line

#: Entry-point group -> dotted path of the interface its plug-ins must implement.
GROUPS: dict[str, str] = {
    "perturbdiff.kernels": "perturbdiff_core.kernels:Kernel",
    "perturbdiff.embeddings": "perturbdiff_core.embeddings:EmbeddingMap",
    "perturbdiff.estimators": "perturbdiff_core.estimators:MMDEstimator",
    "perturbdiff.backends": "perturbdiff_core.reductions:KernelReduction",
    "perturbdiff.schedules": "perturbdiff_core.schedules:NoiseSchedule",
    "perturbdiff.denoisers": "perturbdiff_core.denoisers:Denoiser",
    "perturbdiff.encoders": "perturbdiff_core.encoders:PerturbationEncoder",
    "perturbdiff.predictors": "perturbdiff_core.predictors:Predictor",
}


@dataclass(frozen=True)
class PluginInfo:
    """One registered plug-in: its name, the distribution declaring it and its target."""

    group: str
    name: str
    distribution: str
    target: str

    def describe(self) -> str:
        """First line of the plug-in's docstring (imports it), or the import error."""
        try:
            obj = _load_entry_point(self.group, self.name)
        except PluginLoadError as err:
            return f"BROKEN: {err}"
        doc = inspect.getdoc(obj) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise UnknownPluginError(
            f"Unknown plug-in group {group!r}{did_you_mean(group, GROUPS)}; the groups are: {', '.join(GROUPS)}."
        )


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep)  # first distribution on sys.path wins, like import
    return found


def refresh() -> None:
    """Forget cached entry points (after installing a plug-in package in a running process)."""
    _entry_points.cache_clear()
    _load_entry_point.cache_clear()


def list_plugins(group: str) -> list[PluginInfo]:
    """Every plug-in of ``group``, sorted by name, without importing any of them."""
    _check_group(group)
    infos = []
    for name, ep in sorted(_entry_points(group).items()):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        infos.append(PluginInfo(group, name, dist, ep.value))
    return infos


def names(group: str) -> list[str]:
    """Names of the plug-ins registered in ``group``."""
    return [info.name for info in list_plugins(group)]


def _interface(group: str) -> type:
    module, _, attr = GROUPS[group].partition(":")
    return getattr(importlib.import_module(module), attr)


def _distribution(group: str, name: str) -> str:
    """The distribution that registers plug-in ``name`` of ``group`` (as users ``pip install`` it)."""
    dist = _entry_points(group)[name].dist
    return dist.name if dist is not None else "unknown distribution"


@cache
def _load_entry_point(group: str, name: str) -> Any:
    _check_group(group)
    eps = _entry_points(group)
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise UnknownPluginError(
            f"No plug-in named {name!r} in group {group!r}{did_you_mean(name, eps)}; known names: {known}. "
            f"Check the spelling or install the package that provides it."
        )
    ep = eps[name]
    dist = _distribution(group, name)
    try:
        obj = ep.load()
    except Exception as err:  # a broken plug-in must not break the registry
        raise PluginLoadError(
            f"Plug-in {name!r} ({group}) from {dist} failed to import: "
            f"{type(err).__name__}: {err}. Reinstall {dist} or install what it needs."
        ) from err
    interface = _interface(group)
    ok = (inspect.isclass(obj) and issubclass(obj, interface)) or (
        callable(obj) and not inspect.isclass(obj)
    )
    if not ok:
        raise PluginLoadError(
            f"Plug-in {name!r} ({group}) from {dist} points to {ep.value}, which is not a "
            f"{interface.__name__} subclass or factory; fix its entry point."
        )
    return obj


def load(group: str, name: str, /, **params: Any) -> Any:
    """Import plug-in ``name`` of ``group`` and build it with keyword ``params``."""
    factory = _load_entry_point(group, name)
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as err:
        raise UnknownPluginError(
            f"Plug-in {name!r} ({group}) does not accept these parameters: {err}. "
            f"Its signature is {name}{inspect.signature(factory)}."
        ) from None
    obj = _build(group, name, factory, params)
    interface = _interface(group)
    if not isinstance(obj, interface):
        raise PluginLoadError(
            f"Plug-in {name!r} ({group}) built a {type(obj).__name__}, not a "
            f"{interface.__name__}; fix the plug-in."
        )
    return obj


def _build(group: str, name: str, factory: Any, params: dict[str, Any]) -> Any:
    """``factory(**params)``; a failure that is not a user error becomes a PluginLoadError naming the
    plug-in and its distribution (the traceback of a third party's constructor names neither)."""
    try:
        return factory(**params)
    except PerturbDiffError:  # the plug-in's own message about its parameters
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside foreign code
        dist = _distribution(group, name)
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "no parameters"
        raise PluginLoadError(
            f"Plug-in {name!r} ({group}) from {dist} failed to build with {shown}: {type(err).__name__}: "
            f"{first_line(err)}. Check its parameters, or report the failure to the maintainers of {dist}."
        ) from err


def resolve(group: str, spec: Any, /, **params: Any) -> Any:
    """Turn a name into a plug-in instance; pass an instance of the interface through.

    Strings become objects once, at the boundary; inside the library only objects travel.
    """
    if isinstance(spec, str):
        return load(group, spec, **params)
    interface = _interface(group)
    if isinstance(spec, interface):
        if params:
            raise UnknownPluginError(
                f"Parameters {sorted(params)} were given with an already built "
                f"{type(spec).__name__}; set them when building it instead."
            )
        return spec
    raise UnknownPluginError(
        f"Expected a plug-in name (one of {', '.join(names(group))}) or a "
        f"{interface.__name__} for group {group!r}, got {type(spec).__name__}."
    )
