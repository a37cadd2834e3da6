"""Train / validation / test conditions: held-out cell types, batches, perturbations, combinations,
few-shot contexts, or a random share; saved as JSON to repeat a run exactly.

Only perturbed conditions are split. Control cells are model *input*, never targets, so the
controls of a held-out context are always available (the test sets are drawn against them).
The validation conditions are a subset of the training conditions (still trained on), for
periodic validation MMD.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..configuration import check_ranges
from ..errors import ConfigError, DataError
from ..io import atomic_write_text
from .config import SPLIT_KINDS, SplitConfig
from .dataset import Condition, PerturbationData
from .encoders import perturbation_parts

#: Marks the version of a saved split.
SPLIT_FORMAT = "perturbdiff.split/1"


@dataclass
class Split:
    """Condition labels of each part of a split, and the config that made it."""

    config: SplitConfig
    train: list[str]
    val: list[str]
    test: list[str]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the split as JSON (atomically) so :meth:`load` repeats it exactly."""
        payload = {
            "format": SPLIT_FORMAT,
            "config": self.config.to_dict(),
            "train": self.train,
            "val": self.val,
            "test": self.test,
        }
        atomic_write_text(path, json.dumps(payload, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Split:
        """A split written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise DataError(f"No such split file: {path}. Give the split.json written by an earlier run.")
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"Cannot read split file {path}: {err}.") from None
        if not isinstance(payload, dict) or payload.get("format") != SPLIT_FORMAT:
            raise DataError(f"{path} is not a perturbdiff split file (format {SPLIT_FORMAT!r}).")
        config = SplitConfig.from_dict(payload["config"])
        return cls(config, list(payload["train"]), list(payload["val"]), list(payload["test"]))

    def check(self, data: PerturbationData) -> None:
        """Every condition of the split has cells in ``data`` (DataError naming the first that has none)."""
        for label in (*self.train, *self.test):
            data.condition(label)

    def apply(self, data: PerturbationData) -> None:
        """:meth:`check` ``data``, then keep ``split.train_fraction`` of each training condition's cells:
        ``max(1, round(f n))`` of its ``n``, drawn without replacement (seeded by the split seed and the
        label's rank), so every user of the data (training, resuming, baselines) sees the same cells."""
        self.check(data)
        fraction = self.config.train_fraction
        if fraction == 1:
            return
        for i, label in enumerate(sorted(self.train)):
            rows = data.cells(label)
            keep = max(1, round(fraction * len(rows)))
            data.restrict(label, np.random.default_rng([self.config.seed, 2, i]).choice(rows, keep, replace=False))


def _shown(values: list[str], limit: int = 15) -> str:
    text = ", ".join(values[:limit])
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _count(fraction: float, n: int) -> int:
    """``round(fraction * n)`` kept in ``[1, n - 1]``."""
    return min(n - 1, max(1, round(fraction * n)))


def make_split(data: PerturbationData, config: SplitConfig) -> Split:
    """Split ``data``'s perturbed conditions as ``config`` says (or reload ``config.file``).

    Raises:
        ConfigError: unknown kind, a key the kind needs is not configured, a bad fraction.
        DataError: a held-out value absent from the data (valid values listed), one with zero
            perturbed cells, a combination whose parts are not seen alone in training, an empty side.
    """
    check_ranges(config, "split.")
    if config.file is not None:
        split = Split.load(config.file)
        split.check(data)
        return split
    if config.kind not in SPLIT_KINDS:
        raise ConfigError(f"split.kind = {config.kind!r}; choose one of {', '.join(SPLIT_KINDS)}.")
    conditions = sorted(data.perturbed_conditions, key=lambda c: c.label)
    test = _HOLD_OUT[config.kind](data, config, conditions)
    test_labels = {c.label for c in test}
    train = [c for c in conditions if c.label not in test_labels]
    if config.kind == "holdout_combination":
        _require_parts_seen(data, config.holdout, train)
    if not train:
        raise DataError(f"The {config.kind} split leaves no training conditions; hold out fewer values.")
    if not test:
        raise DataError(f"The {config.kind} split holds out no condition; check split.holdout.")
    n_val = round(config.val_fraction * len(train))
    if config.val_fraction > 0:
        n_val = max(1, n_val)
    rng = np.random.default_rng([config.seed, 1])
    val = sorted(np.array([c.label for c in train])[rng.choice(len(train), n_val, replace=False)].tolist())
    return Split(config, [c.label for c in train], val, [c.label for c in test])


def _require_key(data: PerturbationData, config: SplitConfig, field: str) -> None:
    if getattr(data.config, f"{field}_key") is None:
        other = {"cell_type": "batch", "batch": "cell_type"}.get(field)
        hint = (
            f"; or, to hold out values of data.{other}_key ({getattr(data.config, f'{other}_key')!r}), split.kind holdout_{other}"
            if other is not None and getattr(data.config, f"{other}_key") is not None else ""
        )
        raise ConfigError(
            f"split.kind {config.kind} needs data.{field}_key (the obs column of the {field.replace('_', ' ')}){hint}."
        )


def _require_holdout(config: SplitConfig) -> None:
    if not config.holdout:
        raise ConfigError(f"split.kind {config.kind} needs split.holdout: the list of held-out values.")


def _require_present(data: PerturbationData, field: str, values: list[str], valid: set[str], what: str) -> None:
    """Each held-out value has perturbed cells; else DataError saying why and listing valid values."""
    everywhere = {getattr(c, field) for c in data.conditions}
    for value in values:
        if value in valid:
            continue
        left_out = [c for c in data.left_out if getattr(c, field) == value]
        if left_out:
            controls = [c for c in left_out if c.is_control]
            minimum = f"data.min_cells_per_condition = {data.config.min_cells_per_condition}"
            why = (
                f"it has {controls[0].n_cells} control cell(s), fewer than {minimum}" if controls
                else f"each of its {len(left_out)} perturbed condition(s) has fewer cells than {minimum}"
            )
            raise DataError(
                f"Held-out {what} {value!r} was left out of the data: {why}. Lower data.min_cells_per_condition "
                f"to keep it, or hold out one of: {_shown(sorted(valid))}."
            )
        if value in data.unused_categories.get(field, []) or value in everywhere:
            why = "only control cells" if value in everywhere else "a category no cell has"
            raise DataError(
                f"Held-out {what} {value!r} has zero perturbed cells ({why}); hold out one of: {_shown(sorted(valid))}."
            )
        raise DataError(f"Held-out {what} {value!r} does not exist in the data; valid values: {_shown(sorted(valid))}.")


def _hold_out_context(data: PerturbationData, config: SplitConfig, conditions: list[Condition]) -> list[Condition]:
    field = "cell_type" if config.kind == "holdout_cell_type" else "batch"
    _require_key(data, config, field)
    _require_holdout(config)
    valid = {getattr(c, field) for c in conditions}
    _require_present(data, field, config.holdout, valid, field.replace("_", " "))
    held = set(config.holdout)
    return [c for c in conditions if getattr(c, field) in held]


def _canonical(data: PerturbationData, name: str) -> frozenset[str]:
    cfg = data.config
    return frozenset(perturbation_parts(name, cfg.combination_separator, cfg.control_label))


def _hold_out_perturbation(data: PerturbationData, config: SplitConfig, conditions: list[Condition]) -> list[Condition]:
    """The held-out perturbations, and every combination with a held-out single part."""
    _require_holdout(config)
    names = {c.perturbation for c in conditions}
    valid = {_canonical(data, n) for n in names} | {frozenset([p]) for n in names for p in _canonical(data, n)}
    known = {v for v in config.holdout if _canonical(data, v) in valid}
    _require_present(data, "perturbation", [v for v in config.holdout if v not in known], names, "perturbation")
    held = {_canonical(data, v) for v in config.holdout}
    singles = {next(iter(h)) for h in held if len(h) == 1}
    return [
        c for c in conditions if _canonical(data, c.perturbation) in held or _canonical(data, c.perturbation) & singles
    ]


def _hold_out_combination(data: PerturbationData, config: SplitConfig, conditions: list[Condition]) -> list[Condition]:
    _require_holdout(config)
    sep = data.config.combination_separator
    combos = sorted({c.perturbation for c in conditions if len(_canonical(data, c.perturbation)) > 1})
    available = {_canonical(data, n) for n in combos}
    for value in config.holdout:
        parts = _canonical(data, value)
        if len(parts) < 2:
            raise DataError(
                f"{value!r} is not a combination (no {sep!r} between two perturbations); hold out single "
                f"perturbations with split.kind holdout_perturbation."
            )
        if parts not in available:
            _require_present(data, "perturbation", [value], set(combos), "combination")
    held = {_canonical(data, v) for v in config.holdout}
    return [c for c in conditions if _canonical(data, c.perturbation) in held]


def _require_parts_seen(data: PerturbationData, holdout: list[str], train: list[Condition]) -> None:
    """Every part of every held-out combination is trained on alone."""
    seen = {next(iter(p)) for p in (_canonical(data, c.perturbation) for c in train) if len(p) == 1}
    for value in holdout:
        unseen = sorted(_canonical(data, value) - seen)
        if unseen:
            raise DataError(
                f"Combination {value!r} cannot be held out as a combination: its part(s) {', '.join(unseen)} "
                f"are never trained on alone. Hold out combinations whose single parts are in the data, "
                f"or use split.kind holdout_perturbation."
            )


def _few_shot(data: PerturbationData, config: SplitConfig, conditions: list[Condition]) -> list[Condition]:
    """Held-out contexts, less a ``few_shot_fraction`` of each one's conditions moved into training."""
    field = config.few_shot_on
    _require_key(data, config, field)
    _require_holdout(config)
    _require_present(data, field, config.holdout, {getattr(c, field) for c in conditions}, field.replace("_", " "))
    rng = np.random.default_rng([config.seed, 0])
    test = []
    for value in sorted(config.holdout):
        held = [c for c in conditions if getattr(c, field) == value]
        if len(held) < 2:
            raise DataError(
                f"few_shot needs at least 2 perturbed conditions in {field} {value!r} (one to train on, "
                f"one to test), it has {len(held)}; use holdout_{field} instead."
            )
        moved = set(rng.choice(len(held), _count(config.few_shot_fraction, len(held)), replace=False).tolist())
        test += [c for i, c in enumerate(held) if i not in moved]
    return test


def _random(data: PerturbationData, config: SplitConfig, conditions: list[Condition]) -> list[Condition]:
    if config.holdout:
        raise ConfigError("split.kind random draws its test conditions itself; leave split.holdout empty.")
    if len(conditions) < 2:
        raise DataError(f"A random split needs at least 2 perturbed conditions, the data has {len(conditions)}.")
    rng = np.random.default_rng([config.seed, 0])
    chosen = set(rng.choice(len(conditions), _count(config.test_fraction, len(conditions)), replace=False).tolist())
    return [c for i, c in enumerate(conditions) if i in chosen]


_HOLD_OUT: dict[str, Any] = {
    "holdout_cell_type": _hold_out_context,
    "holdout_batch": _hold_out_context,
    "holdout_perturbation": _hold_out_perturbation,
    "holdout_combination": _hold_out_combination,
    "few_shot": _few_shot,
    "random": _random,
}
