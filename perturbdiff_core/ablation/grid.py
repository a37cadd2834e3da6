"""An ablation grid file parsed into its axes and cells, each cell a checked run config (format: :mod:`perturbdiff_core.ablation`)."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configuration import assign, dotted_keys, merge, nested, parse_overrides, read_yaml
from ..errors import ConfigError, PerturbDiffError, did_you_mean
from ..evaluation import DEFINITIONS, definition_of
from ..names import CELLS_DIR
from ..registry import PluginSpec, is_registered, names
from ..runs.config import RunConfig, config_from_dict, fingerprint, override, plugin_spec, resolved

#: Top-level keys of a grid file.
GRID_KEYS = ("base", "set", "grid", "exclude", "metrics")

#: The axis whose values are averaged over in the summary.
SEED = "seed"


#: Separator of ``axis=label`` parts in a cell's name.
SEPARATOR = "__"

#: Summary columns after the axis columns (no axis may take one of these names).
SUMMARY_COLUMNS = ("metric", "method", "mean", "std", "n_seeds")

#: Key metrics when the grid names none (those present; ``{kernel}`` matches any kernel).
DEFAULT_METRICS = ("pearson_delta", "mse_delta", "spearman_lfc", "overlap_at_N", "mmd2_{kernel}")

#: Plug-in keys checked before any run (built with their parameters where that needs no data).
PLUGIN_GROUPS = {
    "model.kernel": "perturbdiff.kernels",
    "model.estimator": "perturbdiff.estimators",
    "model.schedule": "perturbdiff.schedules",
    "model.denoiser": "perturbdiff.denoisers",
}

_LABEL = re.compile(r"[A-Za-z0-9._+-]+")
_RESERVED = {"condition", "value", *SUMMARY_COLUMNS}


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: its label and the dotted keys it sets (``sets``, then ``extra`` after every axis)."""

    label: str
    sets: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Axis:
    """A config key varied by the grid, its short ``name`` (column and folder names) and its values."""

    key: str
    name: str
    values: tuple[AxisValue, ...]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its axis labels (axis name -> label, in axis order) and its resolved config."""

    labels: dict[str, str]
    config: RunConfig

    @property
    def name(self) -> str:
        """``axis=label`` parts joined by ``__``: the folder name under ``cells/``."""
        return cell_name(self.labels)


def cell_name(labels: Mapping[str, str]) -> str:
    """``kernel=rbf__estimator=biased__seed=0`` from the labels in axis order."""
    return SEPARATOR.join(f"{axis}={label}" for axis, label in labels.items())


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file: the base config values, the shared overrides, the axes, exclusions and key metrics."""

    source: Path
    base: dict[str, Any]
    axes: tuple[Axis, ...]
    exclude: tuple[dict[str, str], ...] = ()
    metrics: tuple[str, ...] = DEFAULT_METRICS

    @property
    def summary_axes(self) -> list[str]:
        """Names of the axes kept in the summary (all but seed)."""
        return [axis.name for axis in self.axes if axis.key != SEED]

    def cells(self) -> list[Cell]:
        """Every cell not excluded, in product order, each config checked; ConfigError names the first bad cell."""
        cells, seen = [], {}
        for combo in itertools.product(*(axis.values for axis in self.axes)):
            labels = {axis.name: value.label for axis, value in zip(self.axes, combo)}
            if any(all(labels[k] == v for k, v in rule.items()) for rule in self.exclude):
                continue
            name = cell_name(labels)
            values = self.base
            for value in combo:
                for key, item in value.sets.items():
                    values = assign(values, key, item)
            for value in combo:
                for key, item in value.extra.items():
                    values = assign(values, key, item)
            values = assign(values, "name", name)
            try:
                config = resolved(config_from_dict(values))
                check_plugins(config)
            except PerturbDiffError as err:
                raise ConfigError(f"{self.source}, cell {name}: {err}") from None
            key = fingerprint(config)
            if key in seen:
                raise ConfigError(
                    f"{self.source}: cells {seen[key]} and {name} have the same configuration (a value's "
                    f"set: overrides another axis); leave one out with an exclude: entry."
                )
            seen[key] = name
            cells.append(Cell(labels, config))
        if not cells:
            raise ConfigError(f"{self.source}: the exclude: entries leave no cell to run.")
        return cells


def read_grid(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> GridSpec:
    """Parse a grid file (see the module docstring); ``overrides`` are ``key=value`` pairs as ``--set``."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file has {', '.join(GRID_KEYS)}.")
    if "base" not in raw or "grid" not in raw:
        raise ConfigError(f"{path} needs base: (a run config) and grid: (config key -> list of values).")
    base_path = path.parent / str(raw["base"])
    shared = raw.get("set") or {}
    if not isinstance(shared, Mapping):
        raise ConfigError(f"{path}: set: must be a mapping of config keys to values, e.g. {{train.steps: 300}}.")
    cli = parse_overrides(overrides)
    base = override(override(read_yaml(base_path), nested(shared)), cli)
    if not isinstance(raw["grid"], Mapping) or not raw["grid"]:
        raise ConfigError(f"{path}: grid: must map config keys to lists of values, e.g. {{seed: [0, 1, 2]}}.")
    keys = [str(k) for k in raw["grid"]]
    axes = tuple(
        Axis(key, name, _parse_values(key, raw["grid"][key], base, path)) for key, name in zip(keys, _axis_names(keys))
    )
    owned = {key for axis in axes for value in axis.values for key in value.sets}
    for key in (*dotted_keys(nested(shared)), *dotted_keys(cli)):
        if key in owned or key.startswith(tuple(f"{k}." for k in owned)):
            raise ConfigError(f"{key} is set by an axis of {path}; change its values in grid:, not with set: or --set.")
    return GridSpec(
        source=path,
        base=base,
        axes=axes,
        exclude=_parse_exclude(raw.get("exclude") or [], axes, path),
        metrics=_parse_metrics(raw.get("metrics"), path),
    )


def _axis_names(keys: Sequence[str]) -> list[str]:
    """The last part of each dotted key, or the whole key where that part is shared or a summary column."""
    short = [key.rsplit(".", 1)[-1] for key in keys]
    return [s if short.count(s) == 1 and s not in _RESERVED else k for k, s in zip(keys, short)]


def _parse_values(key: str, values: Any, base: Mapping[str, Any], path: Path) -> tuple[AxisValue, ...]:
    """The values of axis ``key`` with unique, folder-safe labels."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: grid axis {key} must be a non-empty list of values, got {values!r}.")
    params_key = f"{key}_params"
    plugin = _has_key(base, params_key)
    if not plugin and any(isinstance(v, Mapping) for v in values) and not _has_key(base, key):  # a misspelt key
        known = dotted_keys(RunConfig().to_dict())
        raise ConfigError(f"{path}: unknown config key {key} in grid:{did_you_mean(key, known)}.")
    parsed = [_parse_value(key, value, params_key if plugin else None, path) for value in values]
    labels = [value.label for value in parsed]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(
            f"{path}: grid axis {key} has the label(s) {', '.join(repeated)} twice; give each value a distinct label:."
        )
    return tuple(parsed)


def _parse_value(key: str, value: Any, params_key: str | None, path: Path) -> AxisValue:
    """One axis value: plain, ``{name: ..., **params}`` for a plug-in key, or ``{value: ...}``; each mapping
    may add ``label`` and ``set``."""
    where = f"{path}: a value of grid axis {key}"
    if not isinstance(value, Mapping):
        sets = {key: value} | ({params_key: {}} if params_key else {})
        return AxisValue(_label(value, where), sets)
    rest = dict(value)
    label, extra = rest.pop("label", None), rest.pop("set", None) or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"{where} has set: {extra!r}; it must map dotted config keys to values.")
    if params_key is not None and "name" in rest:
        spec = PluginSpec.from_any(rest, where=where)
        sets, default = {key: spec.name, params_key: spec.params}, spec.name
    elif set(rest) == {"value"}:
        sets, default = ({key: rest["value"]} | ({params_key: {}} if params_key else {})), rest["value"]
    else:
        expected = "name: (the plug-in) and its parameters" if params_key else "value:"
        raise ConfigError(f"{where}, {dict(value)!r}, needs {expected}, with optional label: and set:.")
    return AxisValue(_label(default if label is None else label, where), sets, dict(extra))


def _label(value: Any, where: str) -> str:
    """A folder-safe label of ``value`` (letters, digits, ``. _ + -``)."""
    text = value if isinstance(value, str) else yaml.safe_dump(value).removesuffix("...\n").strip()
    if not _LABEL.fullmatch(text) or SEPARATOR in text:
        raise ConfigError(
            f"{where}, {value!r}, gives the label {text!r}, unfit for a folder name; add label: with letters, "
            f"digits, '.', '_', '+' or '-' (no '{SEPARATOR}')."
        )
    return text


def _parse_exclude(rules: Any, axes: Sequence[Axis], path: Path) -> tuple[dict[str, str], ...]:
    """Exclusion rules as axis name -> label; axes may be named by short name or key, labels must exist."""
    if not isinstance(rules, list) or not all(isinstance(rule, Mapping) and rule for rule in rules):
        raise ConfigError(
            f"{path}: exclude: must be a list of mappings axis -> label, e.g. [{{kernel: rff, estimator: unbiased}}]."
        )
    by_name = {axis.name: axis for axis in axes} | {axis.key: axis for axis in axes}
    parsed = []
    for rule in rules:
        out = {}
        for name, label in rule.items():
            axis = by_name.get(str(name))
            if axis is None:
                known = ", ".join(a.name for a in axes)
                raise ConfigError(f"{path}: exclude: names the axis {name!r}; the axes are {known}.")
            labels = [value.label for value in axis.values]
            text = label if isinstance(label, str) else _label(label, f"{path}: exclude:")
            if text not in labels:
                raise ConfigError(f"{path}: exclude: gives {axis.name}={text}; its labels are {', '.join(labels)}.")
            out[axis.name] = text
        parsed.append(out)
    return tuple(parsed)


def _parse_metrics(metrics: Any, path: Path) -> tuple[str, ...]:
    """Key metric names, each a metric of :data:`DEFINITIONS` (``mmd2_rbf`` or the pattern ``mmd2_{kernel}``)."""
    if metrics is None:
        return DEFAULT_METRICS
    if not isinstance(metrics, list) or not metrics:
        raise ConfigError(f"{path}: metrics: must be a non-empty list of metric names.")
    unknown = [m for m in metrics if not isinstance(m, str) or definition_of(m) is None]
    if unknown:
        raise ConfigError(f"{path}: unknown metric(s) {', '.join(map(str, unknown))}; known: {', '.join(DEFINITIONS)}.")
    return tuple(metrics)


def check_plugins(config: RunConfig) -> None:
    """Every plug-in of ``config`` exists; kernel, estimator and schedule accept their parameters (built once)."""
    model = config.model
    for key, group in PLUGIN_GROUPS.items():
        name = getattr(model, key.split(".")[1])
        if key == "model.denoiser":  # its size comes from the data; only the name is checked here
            if not is_registered(group, name):
                raise ConfigError(f"{key} = {name!r} is not installed; known: {', '.join(names(group))}.")
        else:
            plugin_spec(model, key.split(".")[1]).build(group)
    for key, group, values in (
        ("evaluate.kernel", "perturbdiff.kernels", [config.evaluate.kernel]),
        ("evaluate.baselines", "perturbdiff.predictors", config.evaluate.baselines),
    ):
        missing = [v for v in values if not is_registered(group, v)]
        if missing:
            raise ConfigError(f"{key} names {', '.join(missing)}, not installed; known: {', '.join(names(group))}.")


def cell_dir(out: str | os.PathLike[str], cell: Cell) -> Path:
    """``out/cells/<cell name>``."""
    return Path(out) / CELLS_DIR / cell.name


def _has_key(tree: Mapping[str, Any], key: str) -> bool:
    """Whether the dotted ``key`` is a field of the run config (defaults included)."""
    node: Any = merge(RunConfig().to_dict(), tree)
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True
