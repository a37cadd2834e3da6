"""Ablation grids: one resumable run per cell of a product of config values, summarised over seeds.

A grid file (``perturbdiff ablate GRID.yaml``)::

    base: kang18_holdout_celltype.yaml   # run config; a relative path is relative to the grid file
    set: {train.steps: 300}              # overrides for every cell (dotted keys, as --set)
    grid:                                # axes: a config key -> its values; cells = the product
      model.kernel:
        - energy
        - {name: rbf, lengthscale: median}
        - {label: mix, name: mixture, base: rbf, lengthscales: [0.5, 1, 2, 4]}
      model.estimator: [biased, unbiased]
      seed: [0, 1, 2]
    exclude:                             # optional: cells to leave out, by axis name and label
      - {kernel: mix, estimator: unbiased}
    metrics: [pearson_delta, mse_delta]  # optional: the key metrics plotted and printed

Axis values. A plain value sets the key. For a plug-in key (one with a ``<key>_params``
sibling: ``model.kernel``, ``model.estimator``, ``model.schedule``, ``model.denoiser``) a value
names the whole plug-in: a plain name sets the params to ``{}``, a mapping ``{name: ..., **params}``
sets both. Any other key takes a mapping ``{value: ...}``. Every mapping may add ``label:`` (its
name in folder names and tables; default the plug-in name or the value) and ``set:`` (dotted keys
this value also sets, e.g. the estimator a random-feature kernel needs; they override the other
axes, and two cells left with the same configuration are an error asking for an ``exclude``).

Order: the base config <- ``set`` <- ``--set`` <- the axes. An axis is named by the last part of
its key (``kernel``) unless that is ambiguous; a cell by ``axis=label`` joined with ``__``, e.g.
``kernel=rbf__estimator=biased__seed=0``. Every cell is checked (keys, types, plug-in names and
parameters, data path, agreement with a folder it already has) before any cell runs.

Output folder: ``cells/<cell>/`` is a run folder (as ``perturbdiff run``); a cell with
``metrics.csv`` is done and skipped, one with a checkpoint resumes, so an interrupted grid
continues where it stopped. ``cells.csv`` holds every cell's aggregate metrics with its axis
labels; ``ablation.csv`` is the tidy summary (one column per axis but seed, then ``metric,
method, mean, std, n_seeds``); ``ablation.md`` the key metrics as a Markdown table (for a README);
``ablation.png`` draws them for the model.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from .checkpoint import checkpoint_path
from .pipeline import METRICS_FILE, MODEL, evaluate_run, predict_all
from .configuration import merge, parse_overrides, read_yaml
from .errors import ConfigError, PerturbDiffError
from .evaluation import ALL_CONDITIONS, DEFINITIONS, definition_of
from .io import atomic_path, atomic_write_text
from .registry import load, names
from .run_config import CONFIG_FILE, RunConfig, config_from_dict, differences, resolved
from .training import Trainer

#: Top-level keys of a grid file.
GRID_KEYS = ("base", "set", "grid", "exclude", "metrics")

#: The axis whose values are averaged over in the summary.
SEED = "seed"

#: Output names inside the grid folder.
CELLS_DIR = "cells"
CELLS_FILE = "cells.csv"
TABLE_FILE = "ablation.csv"
MARKDOWN_FILE = "ablation.md"
PLOT_FILE = "ablation.png"

#: Separator of ``axis=label`` parts in a cell's name.
SEPARATOR = "__"

#: Summary columns after the axis columns.
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

#: Keys that may differ between a cell's folder and the grid without making its results stale.
IGNORED_ON_RESUME = ("data.path", "train.device", "train.num_workers")

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
                    values = _assign(values, key, item)
            for value in combo:
                for key, item in value.extra.items():
                    values = _assign(values, key, item)
            values = _assign(values, "name", name)
            try:
                config = resolved(config_from_dict(values))
                check_plugins(config)
            except PerturbDiffError as err:
                raise ConfigError(f"{self.source}, cell {name}: {err}") from None
            fingerprint = yaml.safe_dump({**config.to_dict(), "name": None}, sort_keys=True)
            if fingerprint in seen:
                raise ConfigError(
                    f"{self.source}: cells {seen[fingerprint]} and {name} have the same configuration (a value's "
                    f"set: overrides another axis); leave one out with an exclude: entry."
                )
            seen[fingerprint] = name
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
    base = merge(merge(read_yaml(base_path), _nested(shared)), cli)
    if not isinstance(raw["grid"], Mapping) or not raw["grid"]:
        raise ConfigError(f"{path}: grid: must map config keys to lists of values, e.g. {{seed: [0, 1, 2]}}.")
    keys = [str(k) for k in raw["grid"]]
    axes = tuple(
        Axis(key, name, _parse_values(key, raw["grid"][key], base, path)) for key, name in zip(keys, _axis_names(keys))
    )
    owned = {key for axis in axes for value in axis.values for key in value.sets}
    for key in (*_dotted(_nested(shared)), *_dotted(cli)):
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
        name = rest.pop("name")
        sets, default = {key: name, params_key: rest}, name
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
            if name not in names(group):
                raise ConfigError(f"{key} = {name!r} is not installed; known: {', '.join(names(group))}.")
        else:
            load(group, name, **getattr(model, f"{key.split('.')[1]}_params"))
    for key, group, values in (
        ("evaluate.kernel", "perturbdiff.kernels", [config.evaluate.kernel]),
        ("evaluate.baselines", "perturbdiff.predictors", config.evaluate.baselines),
    ):
        missing = [v for v in values if v not in names(group)]
        if missing:
            raise ConfigError(f"{key} names {', '.join(missing)}, not installed; known: {', '.join(names(group))}.")


# ------------------------------------------------------------------------------------- dotted keys


def _assign(tree: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with the dotted ``key`` replaced by ``value`` (sections made as needed)."""
    head, _, rest = key.partition(".")
    out = dict(tree)
    if not rest:
        out[head] = value
        return out
    child = out.get(head, {})
    if not isinstance(child, Mapping):
        raise ConfigError(f"Cannot set {key}: {head} holds the value {child!r}, not a section of keys.")
    out[head] = _assign(child, rest, value)
    return out


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 3}`` -> ``{"train": {"steps": 3}}`` (nested mappings pass through)."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        tree = merge(tree, _assign({}, str(key), value))
    return tree


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of every leaf and section of a nested mapping."""
    keys = []
    for key, value in tree.items():
        keys.append(prefix + str(key))
        if isinstance(value, Mapping):
            keys += _dotted(value, f"{prefix}{key}.")
    return keys


def _has_key(tree: Mapping[str, Any], key: str) -> bool:
    """Whether the dotted ``key`` is a field of the run config (defaults included)."""
    node: Any = merge(RunConfig().to_dict(), tree)
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


# ------------------------------------------------------------------------------------------ running


def cell_dir(out: str | os.PathLike[str], cell: Cell) -> Path:
    """``out/cells/<cell name>``."""
    return Path(out) / CELLS_DIR / cell.name


def cell_status(folder: Path) -> str:
    """``done`` (metrics written), ``resume`` (a checkpoint) or ``new``."""
    if (folder / METRICS_FILE).is_file():
        return "done"
    return "resume" if checkpoint_path(folder).is_file() else "new"


def check_folders(cells: Sequence[Cell], out: str | os.PathLike[str]) -> None:
    """ConfigError when a cell's folder holds a run of another configuration (its results would be stale)."""
    for cell in cells:
        saved_file = cell_dir(out, cell) / CONFIG_FILE
        if not saved_file.is_file():
            continue
        changed = [
            key
            for key in differences(read_yaml(saved_file), cell.config.to_dict())
            if not key.startswith(IGNORED_ON_RESUME)
        ]
        if changed:
            raise ConfigError(
                f"{saved_file.parent} was run with another configuration ({', '.join(changed)} differ); run the grid "
                f"into another --out folder, or delete that cell's folder to run it again."
            )


def run_cell(config: RunConfig, folder: Path, *, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) one cell, predict its test conditions, write ``metrics.csv`` and ``report.html``.

    The steps of ``perturbdiff run`` without its command line; returns the metrics table.
    """
    trainer = Trainer(config, folder, resume=checkpoint_path(folder).is_file(), progress=progress)
    trainer.fit()
    predictions, real = predict_all(trainer)
    return evaluate_run(trainer, predictions, real)


def run_grid(
    spec: GridSpec,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run every unfinished cell of ``spec`` into ``out/cells/``, then write the summary; returns it.

    All cells are checked first (:meth:`GridSpec.cells`, :func:`check_folders`). ``report`` gets
    one line per cell. A failing cell stops the grid with its name; finished cells are kept.
    """
    cells = spec.cells()
    check_folders(cells, out)
    width = len(str(len(cells)))
    for i, cell in enumerate(cells, 1):
        folder = cell_dir(out, cell)
        status = cell_status(folder)
        prefix = f"[{i:>{width}}/{len(cells)}] {cell.name}"
        if status == "done":
            report(f"{prefix}: done before, skipped")
            continue
        start = time.perf_counter()
        try:
            metrics = run_cell(cell.config, folder, progress=progress)
        except PerturbDiffError as err:
            raise PerturbDiffError(
                f"Cell {cell.name} failed: {err} Fix it and run the grid again: finished cells are kept."
            ) from err
        verb = "resumed and finished" if status == "resume" else "finished"
        report(f"{prefix}: {verb} in {_duration(time.perf_counter() - start)}; {_headline(metrics, spec.metrics)}")
    return summarize_grid(spec, cells, out)


def summarize_grid(spec: GridSpec, cells: Sequence[Cell], out: str | os.PathLike[str]) -> pd.DataFrame:
    """Collect the cells' metrics into ``cells.csv``; write ``ablation.csv``, ``ablation.md`` and ``ablation.png``."""
    out = Path(out)
    long = collect(cells, out)
    with atomic_path(out / CELLS_FILE) as tmp:
        long.to_csv(tmp, index=False)
    table = summarize(long, spec.summary_axes)
    with atomic_path(out / TABLE_FILE) as tmp:
        table.to_csv(tmp, index=False)
    metrics = key_metrics(table, spec.metrics)
    atomic_write_text(out / MARKDOWN_FILE, markdown(*overview(table, spec.summary_axes, metrics)))
    write_plot(table, spec.summary_axes, metrics, out / PLOT_FILE)
    return table


def collect(cells: Sequence[Cell], out: str | os.PathLike[str]) -> pd.DataFrame:
    """The aggregate (``__all__``) rows of every cell's ``metrics.csv`` with one column per axis label."""
    frames = []
    for cell in cells:
        path = cell_dir(out, cell) / METRICS_FILE
        if not path.is_file():
            raise PerturbDiffError(f"Cell {cell.name} has no {METRICS_FILE} yet; run the grid to finish it.")
        metrics = pd.read_csv(path)
        rows = metrics[metrics.condition == ALL_CONDITIONS].drop(columns="condition")
        frames.append(rows.assign(**cell.labels)[[*cell.labels, "metric", "method", "value"]])
    return pd.concat(frames, ignore_index=True)


def summarize(long: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof 1) over seeds per ``axes`` x metric x method.

    ``n_seeds`` counts the seeds with a value (NaN skipped). Rows keep the grid's order.
    """
    keys = [*axes, "metric", "method"]
    grouped = long.groupby(keys, sort=False)["value"]
    table = grouped.agg(mean="mean", std="std", n_seeds="count").reset_index()
    return table[[*axes, *SUMMARY_COLUMNS]]


def key_metrics(table: pd.DataFrame, wanted: Sequence[str]) -> list[str]:
    """The metrics of ``table`` matching ``wanted`` (names or ``{kernel}`` patterns), in ``wanted`` order."""
    present = list(dict.fromkeys(table.metric))
    found = []
    for name in wanted:
        pattern = DEFINITIONS.get(name) if "{kernel}" in name else None
        found += [m for m in present if m == name or (pattern is not None and definition_of(m) is pattern)]
    return list(dict.fromkeys(found))


def shared_baselines(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """Each baseline's mean of ``metric`` if the same in every cell group (a grid over model keys), else ``None``."""
    rows = table[(table.metric == metric) & (table.method != MODEL)]
    if rows.empty:
        return None
    means = rows.groupby("method", sort=False)["mean"]
    spread = (means.max() - means.min()).fillna(0.0)
    return means.first() if bool((spread <= 1e-9 * (1.0 + means.first().abs().fillna(0.0))).all()) else None


def best_baseline(table: pd.DataFrame, metric: str) -> tuple[str, float] | None:
    """The shared baseline closest to the metric's best value, and its mean; ``None`` if none applies."""
    baselines, definition = shared_baselines(table, metric), definition_of(metric)
    if baselines is None or definition is None or definition.best is None or baselines.dropna().empty:
        return None
    gaps = (baselines.dropna() - definition.best).abs()
    name = str(gaps.idxmin())
    return name, float(baselines[name])


def overview(table: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The key metrics as text: the model's ``mean ± sd`` per group of cells (one column per axis, or
    ``method``), and each baseline's mean when the same in every group (else an empty frame)."""
    labels = list(axes) or ["method"]
    model = table[table.method == MODEL]
    groups = model.groupby(list(axes), sort=False) if axes else [((MODEL,), model)]
    rows = []
    for key, group in groups:
        values = group.set_index("metric")
        rows.append([*map(str, key), *(_mean_sd(values, m) for m in metrics)])
    baselines = {m: shared_baselines(table, m) for m in metrics}
    shared = []
    if metrics and all(b is not None for b in baselines.values()):
        for method in baselines[metrics[0]].index:
            cells = [f"{baselines[m].get(method, math.nan):.4g}" for m in metrics]
            shared.append([str(method), *[""] * (len(labels) - 1), *cells])
    columns = [*labels, *metrics]
    return pd.DataFrame(rows, columns=columns), pd.DataFrame(shared, columns=columns)


def markdown(model: pd.DataFrame, baselines: pd.DataFrame) -> str:
    """A Markdown table of :func:`overview` (baselines in italics below the model rows)."""
    lines = ["| " + " | ".join(model.columns) + " |", "|" + "---|" * len(model.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in model.itertuples(index=False)]
    lines += ["| " + " | ".join(f"*{v}*" if v else "" for v in row) + " |" for row in baselines.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _mean_sd(values: pd.DataFrame, metric: str) -> str:
    if metric not in values.index:
        return ""
    mean, sd = values.at[metric, "mean"], values.at[metric, "std"]
    return f"{mean:.4g}" if pd.isna(sd) else f"{mean:.4g} \u00b1 {sd:.1g}"


def write_plot(table: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str], path: Path) -> Path:
    """Bars of the model's mean +- sd per key metric: groups along the first axis, one bar per combination of
    the others; the best baseline (when the same in every cell) as a dashed line. Written atomically."""
    model = table[table.method == MODEL]
    x_axis, hue_axes = (axes[0], list(axes[1:])) if axes else (None, [])
    xs = list(dict.fromkeys(model[x_axis])) if x_axis else ["model"]
    hues = list(dict.fromkeys(model[hue_axes].astype(str).agg(" / ".join, axis=1))) if hue_axes else [""]
    shown = list(metrics) or list(dict.fromkeys(model.metric))[:4]
    ncols = min(4, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(max(3.4, 1.0 + 0.3 * len(xs) * len(hues)) * ncols, 3.2 * nrows), layout="constrained")
    grid = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    width = 0.8 / len(hues)
    positions = np.arange(len(xs))
    for ax, metric in zip(grid, shown):
        rows = model[model.metric == metric]
        for j, hue in enumerate(hues):
            sub = rows if not hue_axes else rows[rows[hue_axes].astype(str).agg(" / ".join, axis=1) == hue]
            sub = sub.set_index(x_axis).reindex(xs) if x_axis else sub
            ax.bar(positions + (j - (len(hues) - 1) / 2) * width, sub["mean"].to_numpy(dtype=float), width,
                   yerr=sub["std"].fillna(0.0).to_numpy(dtype=float), capsize=2, label=hue or None)
        best = best_baseline(table, metric)
        if best is not None:
            ax.axhline(best[1], color="k", linestyle="--", linewidth=1, label=f"best baseline ({best[0]})")
        ax.set_xticks(positions, xs, rotation=30, ha="right", fontsize=8)
        definition = definition_of(metric)
        ax.set_title(metric + (definition.arrow if definition is not None else ""), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    grid[0].legend(fontsize=7)
    for ax in grid[len(shown):]:
        ax.set_visible(False)
    bars = f"; bars: {' / '.join(hue_axes)}" if hue_axes else ""
    fig.suptitle(f"model, mean \u00b1 sd over seeds{bars}", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def _headline(metrics: pd.DataFrame, wanted: Sequence[str]) -> str:
    """``metric value`` of the model's aggregate key metrics, for the progress line."""
    rows = metrics[(metrics.condition == ALL_CONDITIONS) & (metrics.method == MODEL)]
    values = rows.set_index("metric")["value"]
    return ", ".join(f"{m} {values[m]:.4g}" for m in key_metrics(rows, wanted)) or "no key metric"
