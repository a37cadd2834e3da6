"""Plug-in registry over Python entry points.

Every component (built-in or third party) is declared under one of the entry-point groups in
:data:`GROUPS` in some distribution's ``pyproject.toml``. Listing reads only metadata; a
plug-in is imported the first time it is loaded, checked against its interface (an abstract
class, one that misses methods, is refused), and a plug-in that fails to import is reported without
breaking the others.

Names are unique per group only within a distribution. When another distribution registers a
built-in's name, the built-in (distribution ``perturbdiff``) wins and resolving the plain name warns;
``distribution:name`` (``my-pkg:rbf``) picks one explicitly, wherever a plug-in name is accepted.

A plug-in with its parameters is a :class:`PluginSpec`; what :func:`load` builds carries the spec it
was built from as ``plugin_spec``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import ConfigError, PerturbDiffError, PerturbDiffWarning, PluginLoadError, UnknownPluginError, did_you_mean, first_line

#: Entry-point group -> dotted path of the interface its plug-ins must implement.
GROUPS: dict[str, str] = {
    "perturbdiff.kernels": "perturbdiff_core.mmd.kernels:Kernel",
    "perturbdiff.embeddings": "perturbdiff_core.mmd.embeddings:EmbeddingMap",
    "perturbdiff.estimators": "perturbdiff_core.mmd.estimators:MMDEstimator",
    "perturbdiff.backends": "perturbdiff_core.mmd.reductions:KernelReduction",
    "perturbdiff.schedules": "perturbdiff_core.diffusion.schedules:NoiseSchedule",
    "perturbdiff.denoisers": "perturbdiff_core.diffusion.denoisers:Denoiser",
    "perturbdiff.encoders": "perturbdiff_core.data.encoders:PerturbationEncoder",
    "perturbdiff.predictors": "perturbdiff_core.evaluation.predictors:Predictor",
}


#: The distribution of the built-in plug-ins: on a name collision its plug-in wins.
BUILTIN_DISTRIBUTION = "perturbdiff"

#: Separates a distribution from a plug-in name in a qualified name, ``my-pkg:rbf``.
QUALIFIER = ":"


def canonical_distribution(name: str) -> str:
    """A distribution name as the packaging standards compare them (PEP 503): ``My_Pkg`` -> ``my-pkg``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PluginInfo:
    """One registered plug-in: its name, the distribution declaring it and its target.

    ``version`` is the distribution's version. ``others`` are the other distributions that register
    the same name in the same group (a collision); ``chosen`` says whether the plain name resolves to
    this plug-in (the built-in wins a collision; a collision between two other distributions has no
    winner, and only ``distribution:name`` resolves). Either way :attr:`qualified_name` picks it.
    """

    group: str
    name: str
    distribution: str
    target: str
    version: str = "unknown"
    others: tuple[str, ...] = ()
    chosen: bool = True

    @property
    def qualified_name(self) -> str:
        """``distribution:name``, which resolves to this plug-in whatever else is installed."""
        return f"{self.distribution}{QUALIFIER}{self.name}"

    @property
    def collision(self) -> str:
        """What a collision means for this plug-in, in a few words; ``""`` when its name is its own."""
        if not self.others:
            return ""
        others = ", ".join(self.others)
        if self.chosen:
            return f"also registered by {others}; the built-in is used"
        if BUILTIN_DISTRIBUTION in self.others:
            return f"shadowed by the built-in; use {self.qualified_name}"
        return f"also registered by {others}; use {self.qualified_name}"

    def record(self) -> dict[str, str]:
        """``group``, ``name``, ``distribution`` and ``version``, to store beside a run or a checkpoint."""
        return {"group": self.group, "name": self.name, "distribution": self.distribution, "version": self.version}

    def describe(self) -> str:
        """First line of the plug-in's docstring (imports it), or the import error."""
        try:
            obj = _load_entry_point(self.group, self.qualified_name)
        except PluginLoadError as err:
            return f"BROKEN: {err}"
        doc = inspect.getdoc(obj) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise UnknownPluginError(
            f"Unknown plug-in group {group!r}{did_you_mean(group, GROUPS)}; the groups are: {', '.join(GROUPS)}."
        )


@dataclass(frozen=True)
class _Entry:
    """An entry point with the name and version of its distribution."""

    point: EntryPoint
    distribution: str
    version: str


@cache
def _entry_points(group: str) -> dict[str, tuple[_Entry, ...]]:
    """Name -> every registration of it in ``group``, one per distribution, the built-in first."""
    found: dict[str, list[_Entry]] = {}
    for ep in entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        entries = found.setdefault(ep.name, [])
        if all(canonical_distribution(e.distribution) != canonical_distribution(dist) for e in entries):
            entries.append(_Entry(ep, dist, version))  # a distribution seen twice on sys.path: the first wins, like import
    return {name: tuple(sorted(entries, key=_builtin_first)) for name, entries in found.items()}


def _builtin_first(entry: _Entry) -> tuple[bool, str]:
    """Sort key: the built-in distribution, then the others by name."""
    dist = canonical_distribution(entry.distribution)
    return dist != BUILTIN_DISTRIBUTION, dist


def refresh() -> None:
    """Forget cached entry points (after installing a plug-in package in a running process)."""
    _entry_points.cache_clear()
    _load_entry_point.cache_clear()
    _warned.clear()


def _winner(entries: tuple[_Entry, ...]) -> _Entry | None:
    """The registration a plain name resolves to: the only one, else the built-in, else none (ambiguous)."""
    if len(entries) == 1:
        return entries[0]
    builtin = entries[0]
    return builtin if canonical_distribution(builtin.distribution) == BUILTIN_DISTRIBUTION else None


def _info(group: str, name: str, entry: _Entry, entries: tuple[_Entry, ...]) -> PluginInfo:
    others = tuple(e.distribution for e in entries if e is not entry)
    return PluginInfo(group, name, entry.distribution, entry.point.value, entry.version, others, _winner(entries) is entry)


def list_plugins(group: str, *, all_distributions: bool = False) -> list[PluginInfo]:
    """Every plug-in of ``group``, sorted by name, without importing any of them.

    One per name: the one the plain name resolves to (for a name that two distributions other than
    perturbdiff register, the first by distribution name, with ``chosen`` false). With
    ``all_distributions`` every registration of a colliding name is listed, the built-in first.
    """
    _check_group(group)
    infos = []
    for name, entries in sorted(_entry_points(group).items()):
        shown = entries if all_distributions else [_winner(entries) or entries[0]]
        infos += [_info(group, name, entry, entries) for entry in shown]
    return infos


def names(group: str) -> list[str]:
    """Names of the plug-ins registered in ``group``."""
    return [info.name for info in list_plugins(group)]


def _interface(group: str) -> type:
    module, _, attr = GROUPS[group].partition(":")
    return getattr(importlib.import_module(module), attr)


def _split(spec: str) -> tuple[str | None, str]:
    """``"my-pkg:rbf"`` -> ``("my-pkg", "rbf")``; ``"rbf"`` -> ``(None, "rbf")``."""
    distribution, sep, name = spec.partition(QUALIFIER)
    return (distribution.strip(), name.strip()) if sep else (None, spec)


def _select(group: str, spec: str) -> tuple[str, _Entry, tuple[_Entry, ...]]:
    """The plain name, the registration ``spec`` (``name`` or ``distribution:name``) picks and all of them."""
    _check_group(group)
    eps = _entry_points(group)
    distribution, name = _split(spec)
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise UnknownPluginError(
            f"No plug-in named {name!r} in group {group!r}{did_you_mean(name, eps)}; known names: {known}. "
            f"Check the spelling or install the package that provides it."
        )
    entries = eps[name]
    if distribution is not None:
        for entry in entries:
            if canonical_distribution(entry.distribution) == canonical_distribution(distribution):
                return name, entry, entries
        choices = ", ".join(f"{e.distribution}{QUALIFIER}{name}" for e in entries)
        raise UnknownPluginError(
            f"No plug-in {name!r} from the distribution {distribution!r} in group {group!r}; {name!r} is "
            f"registered by {', '.join(e.distribution for e in entries)}: write {choices}, or install {distribution}."
        )
    entry = _winner(entries)
    if entry is None:
        choices = " or ".join(f"{e.distribution}{QUALIFIER}{name}" for e in entries)
        raise UnknownPluginError(
            f"The plug-in name {name!r} in group {group!r} is registered by "
            f"{', '.join(f'{e.distribution} {e.version}' for e in entries)}; say which one: {choices}."
        )
    return name, entry, entries


def plugin_info(group: str, spec: str) -> PluginInfo:
    """The plug-in that ``spec`` (``name`` or ``distribution:name``) resolves to, from metadata alone.

    Raises:
        UnknownPluginError: no such plug-in, or a name two other distributions register (ambiguous).
    """
    name, entry, entries = _select(group, spec)
    return _info(group, name, entry, entries)


def is_registered(group: str, spec: str) -> bool:
    """Whether some installed distribution registers ``spec`` (``name``, or ``distribution:name`` for that
    distribution) in ``group``; loading an ambiguous plain name still fails, saying which names to use."""
    _check_group(group)
    distribution, name = _split(spec)
    entries = _entry_points(group).get(name, ())
    if distribution is None:
        return bool(entries)
    return any(canonical_distribution(e.distribution) == canonical_distribution(distribution) for e in entries)


#: (group, name) pairs whose collision was already reported in this process.
_warned: set[tuple[str, str]] = set()


def _warn_collision(group: str, spec: str) -> None:
    """One warning per process when a plain name that another distribution also registers is resolved."""
    info = plugin_info(group, spec)
    if not info.others or _split(spec)[0] is not None or (group, info.name) in _warned:
        return
    _warned.add((group, info.name))
    alternatives = ", ".join(f"{other}{QUALIFIER}{info.name}" for other in info.others)
    warnings.warn(
        f"Plug-in name {info.name!r} ({group}) is also registered by {', '.join(info.others)}; using the built-in "
        f"from {info.distribution} {info.version}. Write {alternatives} to use the other.",
        PerturbDiffWarning,
        stacklevel=3,
    )


def _distribution(group: str, name: str) -> str:
    """The distribution that registers plug-in ``name`` of ``group`` (as users ``pip install`` it)."""
    return _select(group, name)[1].distribution


@cache
def _load_entry_point(group: str, spec: str) -> Any:
    name, entry, _ = _select(group, spec)
    ep, dist = entry.point, entry.distribution
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
    if inspect.isclass(obj) and inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise PluginLoadError(
            f"Plug-in {name!r} ({group}) from {dist} is an abstract class: {obj.__name__} does not implement "
            f"{missing}. Implement {'them' if ',' in missing else 'it'} (see {GROUPS[group]}) or report it to "
            f"the maintainers of {dist}."
        )
    return obj


@dataclass(frozen=True)
class PluginSpec:
    """A plug-in by name with its parameters: what a config's ``model.kernel`` + ``model.kernel_params``,
    an ablation grid's ``{name: ..., **params}`` and a checkpoint's model configuration each hold.

    ``name`` may be qualified by its distribution (``my-pkg:rbf``). A plug-in built by :meth:`build`
    (or :func:`load`) carries the spec it was built from as ``plugin_spec``, so the name it was loaded
    under is known without searching the entry points.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_any(cls, spec: str | Mapping[str, Any] | PluginSpec, *, where: str = "a plug-in") -> PluginSpec:
        """A spec from a name (``"rbf"``, ``"my-pkg:rbf"``), a mapping ``{"name": ..., **params}`` or a spec.

        ``where`` names the value in the ConfigError a malformed one raises.
        """
        if isinstance(spec, PluginSpec):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
            params = dict(spec)
            return cls(params.pop("name"), params)
        raise ConfigError(
            f"{where} must be a plug-in name or a mapping with a 'name' key (the plug-in name) and its "
            f"parameters, got {spec!r}."
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **params}``, YAML ready; :meth:`from_any` reads it back."""
        return {"name": self.name, **self.params}

    def build(self, group: str) -> Any:
        """The plug-in of ``group`` built with the parameters (see :func:`load`)."""
        return load(group, self.name, **self.params)


def accepts(group: str, name: str, parameter: str) -> bool:
    """Whether plug-in ``name`` of ``group`` takes the keyword ``parameter`` (imports it, builds nothing)."""
    factory = _load_entry_point(group, name)
    signature = inspect.signature(factory)
    return parameter in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )


def load(group: str, name: str, /, **params: Any) -> Any:
    """Import plug-in ``name`` of ``group`` and build it with keyword ``params``; the object carries
    ``plugin_spec``, a :class:`PluginSpec` of ``name`` as given and ``params``.

    ``name`` may be qualified by its distribution, ``my-pkg:rbf``: needed when two distributions other
    than perturbdiff register the same name. When another distribution registers a built-in's name,
    the built-in wins and a :class:`~perturbdiff_core.errors.PerturbDiffWarning` says so, once.
    """
    _warn_collision(group, name)
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
    with contextlib.suppress(AttributeError):  # an object without a __dict__ (__slots__) cannot carry it
        obj.__dict__["plugin_spec"] = PluginSpec(name, dict(params))  # past __setattr__: frozen dataclasses too
    return obj


def _build(group: str, name: str, factory: Any, params: dict[str, Any]) -> Any:
    """``factory(**params)``; a failure that is not a user error becomes a PluginLoadError naming the
    plug-in and its distribution (the traceback of a third party's constructor names neither)."""
    try:
        return factory(**params)
    except PerturbDiffError:  # the plug-in's own message about its parameters
        raise
    except Exception as err:  # any failure inside foreign code
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
