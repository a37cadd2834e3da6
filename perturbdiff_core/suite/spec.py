"""A suite file parsed into tasks and runs (task x seed), each run a checked config (format: :mod:`perturbdiff_core.suite`)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..ablation import check_plugins
from ..configuration import assign, dotted_keys, nested, parse_overrides, read_yaml
from ..data import PerturbationData
from ..data.splits import make_split
from ..errors import ConfigError, PerturbDiffError
from ..evaluation import definition_of
from ..names import TASKS_DIR
from ..runs.config import RunConfig, config_from_dict, fingerprint, override, resolved

#: Top-level keys of a suite file, and the keys of one task.
SUITE_KEYS = ("seeds", "set", "metrics", "tasks")
TASK_KEYS = ("name", "config", "set")


#: Seeds when the suite file names none.
DEFAULT_SEEDS = (0,)

#: Headline metrics when the suite file names none (``{kernel}`` matches the evaluation kernel).
DEFAULT_METRICS = (
    "pearson_delta",
    "mse_delta",
    "mae_delta",
    "mmd2_{kernel}",
    "de_direction_match",
    "de_sig_genes_recall",
    "overlap_at_N",
    "roc_auc",
    "zero_fraction_mae",
)

#: Config keys the suite sets for every run itself; ``set:`` and ``--set`` may not.
OWNED_KEYS = ("seed", "name")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class Task:
    """One task: its folder-safe name and its config values (the task's config <- set <- --set <- the task's set)."""

    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class SuiteRun:
    """One run of the suite: a task at one seed, with its resolved and checked config."""

    task: str
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        """``<task>/seed=<s>``: its folder under ``tasks/``, and its name in progress lines and errors."""
        return f"{self.task}/seed={self.seed}"


def run_name(task: str, seed: int) -> str:
    """The run config's ``name`` (the title of its report): ``<task>__seed=<s>``."""
    return f"{task}__seed={seed}"


def run_dir(out: str | os.PathLike[str], run: SuiteRun) -> Path:
    """``out/tasks/<task>/seed=<s>``."""
    return Path(out) / TASKS_DIR / run.task / f"seed={run.seed}"


@dataclass(frozen=True)
class SuiteSpec:
    """A parsed suite file: its tasks, seeds and headline metrics, and notes on metrics this version does not define."""

    source: Path
    tasks: tuple[Task, ...]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    metrics: tuple[str, ...] = DEFAULT_METRICS
    notes: tuple[str, ...] = ()

    def runs(self) -> list[SuiteRun]:
        """Every task at every seed, in file order, each config checked (keys, types, plug-ins, data path);
        ConfigError names the first bad task, or two tasks that would run the same configuration."""
        runs, seen = [], {}
        for task in self.tasks:
            for seed in self.seeds:
                values = assign(assign(task.values, "seed", seed), "name", run_name(task.name, seed))
                try:
                    config = resolved(config_from_dict(values))
                    check_plugins(config)
                except PerturbDiffError as err:
                    raise ConfigError(f"{self.source}, task {task.name}: {err}") from None
                key = fingerprint(config)
                if seen.setdefault(key, task.name) != task.name:
                    raise ConfigError(
                        f"{self.source}: tasks {seen[key]} and {task.name} have the same configuration; "
                        f"change one task's set: (e.g. its split.holdout) or remove it."
                    )
                runs.append(SuiteRun(task.name, seed, config))
        return runs


def read_suite(
    path: str | os.PathLike[str], overrides: Iterable[str] = (), *, seeds: int | None = None
) -> SuiteSpec:
    """Parse a suite file (see :mod:`perturbdiff_core.suite`); ``overrides`` are ``--set`` pairs, ``seeds``
    (``--seeds N``) replaces the file's seeds by ``0 .. N-1``."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a suite file has {', '.join(SUITE_KEYS)}.")
    if "tasks" not in raw:
        raise ConfigError(f"{path} needs tasks: (a list of {{name: ..., config: ..., set: {{...}}}}).")
    shared = _overrides(raw.get("set"), f"{path}: set:")
    cli = parse_overrides(overrides)
    _refuse_owned(cli, "--set")
    metrics, notes = _parse_metrics(raw.get("metrics"), path)
    return SuiteSpec(
        source=path,
        tasks=_parse_tasks(raw["tasks"], shared, cli, path),
        seeds=_parse_seeds(raw.get("seeds"), path) if seeds is None else _seed_range(seeds),
        metrics=metrics,
        notes=notes,
    )


def check_splits(runs: Sequence[SuiteRun], source: Path) -> None:
    """Each run's split holds out values its data has (held-out cell types present, combinations with their
    single parts trained on, ...), so a typo fails before any run; ConfigError naming the task.

    Each data file is read once, without selecting genes (the split needs the cells' labels only).
    """
    datasets: dict[str, PerturbationData] = {}
    checked: set[tuple[str, str]] = set()
    for run in runs:
        data_config = replace(run.config.data, n_genes=None, gene_list=None)
        key = (repr(data_config), repr(run.config.split))
        if key in checked:
            continue
        try:
            if key[0] not in datasets:
                datasets[key[0]] = PerturbationData(None, data_config)
            make_split(datasets[key[0]], run.config.split)
        except PerturbDiffError as err:
            raise ConfigError(f"{source}, task {run.task}: {err}") from None
        checked.add(key)


def _parse_tasks(tasks: Any, shared: dict[str, Any], cli: dict[str, Any], path: Path) -> tuple[Task, ...]:
    """The tasks with unique folder-safe names, each config read and overridden in order."""
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{path}: tasks: must be a non-empty list of {{name: ..., config: ..., set: {{...}}}}.")
    parsed: list[Task] = []
    for i, task in enumerate(tasks, 1):
        where = f"{path}, task {task.get('name', i) if isinstance(task, Mapping) else i}"
        if not isinstance(task, Mapping):
            raise ConfigError(f"{where} is {task!r}; a task is a mapping with {', '.join(TASK_KEYS)}.")
        unknown = sorted(set(task) - set(TASK_KEYS))
        if unknown:
            keys = ", ".join(map(str, unknown))
            raise ConfigError(f"{where}: unknown key(s) {keys}; a task has {', '.join(TASK_KEYS)}.")
        name, config = task.get("name"), task.get("config")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: name: {name!r} is unfit for a folder name; use letters, digits, '.', '_', '+' or '-', "
                f"starting with a letter or digit."
            )
        if name in (t.name for t in parsed):
            raise ConfigError(f"{path}: two tasks are named {name}; give each task its own name.")
        if not isinstance(config, str) or not config:
            raise ConfigError(f"{where} needs config: (a run config file, relative to {path.name}).")
        own = _overrides(task.get("set"), f"{where}: set:")
        try:
            values = override(override(override(read_yaml(path.parent / config), shared), cli), own)
        except PerturbDiffError as err:
            raise ConfigError(f"{where}: {err}") from None
        parsed.append(Task(name, values))
    return tuple(parsed)


def _overrides(values: Any, where: str) -> dict[str, Any]:
    """A ``set:`` mapping (dotted keys, as ``--set``) as a nested tree; never the keys the suite owns."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of config keys to values, e.g. {{train.steps: 300}}.")
    tree = nested(values)
    _refuse_owned(tree, where)
    return tree


def _refuse_owned(tree: Mapping[str, Any], where: str) -> None:
    owned = [key for key in dotted_keys(tree) if key in OWNED_KEYS]
    if owned:
        raise ConfigError(
            f"{where} sets {', '.join(owned)}; the suite sets each run's seed (seeds: or --seeds) and name itself."
        )


def _parse_seeds(seeds: Any, path: Path) -> tuple[int, ...]:
    """The file's seeds: distinct non-negative integers (default :data:`DEFAULT_SEEDS`)."""
    if seeds is None:
        return DEFAULT_SEEDS
    valid = isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    if not valid or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise ConfigError(f"{path}: seeds: must be a non-empty list of distinct integers >= 0, got {seeds!r}.")
    return tuple(seeds)


def _seed_range(n: int) -> tuple[int, ...]:
    """``--seeds N``: the seeds ``0 .. N-1``."""
    if n < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n}.")
    return tuple(range(n))


def _parse_metrics(metrics: Any, path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Headline metric names, and a note naming those this version does not define (kept, not refused:
    a plug-in or a newer evaluation may write them; without a definition they are never compared)."""
    if metrics is None:
        return DEFAULT_METRICS, ()
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError(f"{path}: metrics: must be a non-empty list of metric names.")
    unknown = [m for m in metrics if definition_of(m) is None]
    notes = (
        (f"{path}: metric(s) {', '.join(unknown)} have no definition in this version; summarised where the runs "
         f"write them, never compared with a baseline (is one misspelt?).",)
        if unknown
        else ()
    )
    return tuple(dict.fromkeys(metrics)), notes
