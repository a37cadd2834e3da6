"""Typed configuration: dataclasses from YAML, ``key=value`` overrides, strict key checking.

No config framework: a config is a tree of small dataclasses; :func:`from_mapping` builds one
from a nested dict, rejecting unknown keys (listing the valid ones), ill-typed values, and numbers
outside the range a field's annotation declares (``Annotated[float, UnitInterval]``, see
:mod:`~perturbdiff_core.constraints`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .constraints import Range
from .errors import ConfigError, did_you_mean

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    """``tp`` as a user reads it: ``int or 'auto'``, ``float or null``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and built, for nested dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Annotated:
        value = _coerce(value, typing.get_args(tp)[0], where)
        check_range(value, tp, where)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            with contextlib.suppress(ConfigError):  # the next arm may fit; the error below names them all
                return _coerce(value, arg, where)
        raise ConfigError(f"{where} = {value!r} is not a valid {_type_name(tp)}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping of keys, got {value!r}.")
        return from_mapping(tp, value, prefix=f"{where}.")
    if origin in (list, tuple, Iterable) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r} (write [a, b] in YAML).")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}.")
        return dict(value)
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} = {value!r}; choose one of {list(choices)}.")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            quote = f" (quote it in YAML: {where.rsplit('.', 1)[-1]}: '{value}')" if tp is str and isinstance(value, int | float | bool) else ""
            raise ConfigError(f"{where} must be {tp.__name__}, got {value!r} ({type(value).__name__}){quote}.")
        return value
    return value


def check_range(value: Any, tp: Any, where: str) -> None:
    """ConfigError naming ``where`` when the number ``value`` lies outside the :class:`~perturbdiff_core.constraints.Range`
    of the annotation ``tp`` (``Annotated[int | None, Positive]``); ``null`` and the type's other
    non-numeric choices (``'auto'``) pass, as do annotations without a range."""
    if typing.get_origin(tp) is not typing.Annotated or value is None or isinstance(value, str):
        return
    base, *marks = typing.get_args(tp)
    arms = typing.get_args(base) if typing.get_origin(base) in (typing.Union, types.UnionType) else (base,)
    alternatives = tuple(_type_name(arm) for arm in arms if arm not in (int, float))
    for mark in marks:
        if isinstance(mark, Range):
            mark.check(value, where, integer=int in arms and float not in arms, alternatives=alternatives)


def check_ranges(config: Any, prefix: str = "") -> None:
    """The range checks of :func:`from_mapping` on a config dataclass built in Python (whose constructor
    only stores values), nested sections included: for library code handed such a config."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")
        else:
            check_range(value, hints[f.name], prefix + f.name)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        named = ", ".join(f"{prefix}{k}{did_you_mean(k, fields, prefix=prefix)}" for k in unknown)
        raise ConfigError(
            f"Unknown config key{'s' if len(unknown) > 1 else ''} {named}; valid keys here: "
            f"{', '.join(prefix + k for k in fields)}."
        )
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"Incomplete config section {prefix.rstrip('.') or cls.__name__}: {err}.") from None


def to_mapping(config: Any) -> dict[str, Any]:
    """A nested plain dict of a config dataclass, ready for YAML."""
    return dataclasses.asdict(config)


def parse_overrides(pairs: Iterable[str], *, flag: str = "--set") -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict; values parsed as YAML (``null``, lists, numbers).

    ``flag`` names the command-line option in error messages.
    """
    tree: dict[str, Any] = {}
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            spaced = i + 1 < len(pairs) and pairs[i + 1].startswith("=")
            hint = f" (no spaces around '=': {pair}={pairs[i + 1][1:] or (pairs[i + 2] if i + 2 < len(pairs) else '')})" if spaced else ""
            raise ConfigError(f"{flag} expects key=value pairs such as train.steps=100 or beta=2, got {pair!r}{hint}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"Cannot parse the value of {key!r} as YAML: {raw!r} ({err}).") from None
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{flag} {key}: {part!r} was already given a value.")
        node[leaf] = value
    return tree


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in ``override`` win.

    A non-empty mapping merges key by key into the mapping it meets; an empty one replaces it (merging
    it would change nothing), so ``--set "model.denoiser_params={}"`` clears the parameters.
    """
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and value and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def assign(tree: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with the dotted ``key`` replaced by ``value`` (sections made as needed)."""
    head, _, rest = key.partition(".")
    out = dict(tree)
    if not rest:
        out[head] = value
        return out
    child = out.get(head, {})
    if not isinstance(child, Mapping):
        raise ConfigError(f"Cannot set {key}: {head} holds the value {child!r}, not a section of keys.")
    out[head] = assign(child, rest, value)
    return out


def nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 3}`` -> ``{"train": {"steps": 3}}`` (nested mappings pass through)."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        tree = merge(tree, assign({}, str(key), value))
    return tree


def dotted_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of every leaf and section of a nested mapping."""
    keys = []
    for key, value in tree.items():
        keys.append(prefix + str(key))
        if isinstance(value, Mapping):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` with clear errors for a missing file or bad syntax."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"No such config file: {path}.")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file; give the path of a YAML file inside it.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Cannot read {path} as a YAML config ({err}); give a readable text file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys at the top level.")
    return data
