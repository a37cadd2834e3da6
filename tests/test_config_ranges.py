"""Range constraints of config fields (perturbdiff_core.constraints): checked when a config loads.

The field cases are read from the annotations, so a field given a range later is covered here without
a new test.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from perturbdiff_core.configuration import check_ranges, from_mapping
from perturbdiff_core.constraints import HalfOpenUnit, NonNegative, OpenUnit, Positive, Range, UnitInterval
from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.runs.config import RunConfig, check, config_from_dict, load_config


def _ranged_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, Range, bool, bool]]:
    """``(dotted key, range, integer, nullable)`` of every field of ``cls`` annotated with a Range."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls, include_extras=True)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _ranged_fields(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is typing.Annotated:
            base, *marks = typing.get_args(tp)
            arms = typing.get_args(base) if typing.get_origin(base) in (typing.Union, types.UnionType) else (base,)
            for mark in marks:
                if isinstance(mark, Range):
                    out.append((prefix + f.name, mark, int in arms, type(None) in arms))
    return out


FIELDS = _ranged_fields()


def _nested(key: str, value: Any) -> dict[str, Any]:
    *sections, leaf = key.split(".")
    tree: dict[str, Any] = {leaf: value}
    for section in reversed(sections):
        tree = {section: tree}
    return tree


def _outside(limits: Range, integer: bool) -> list[float]:
    """Values just outside each bounded end of ``limits``."""
    step = 1 if integer else 0.5
    values = []
    if limits.low is not None:
        values.append(limits.low - step if limits.closed_left else limits.low)
    if limits.high is not None:
        values.append(limits.high + step if limits.closed_right else limits.high)
    return [int(v) if integer else float(v) for v in values]


def _boundaries(limits: Range, integer: bool) -> list[float]:
    """The closed ends of ``limits`` (and, for an open lower end of an integer range, the first integer above)."""
    values = []
    if limits.low is not None:
        values.append(limits.low if limits.closed_left else (limits.low + 1 if integer else None))
    if limits.high is not None and limits.closed_right:
        values.append(limits.high)
    return [int(v) if integer else float(v) for v in values if v is not None]


def test_the_config_has_ranged_fields_of_every_kind() -> None:
    keys = {key for key, *_ in FIELDS}
    assert {"model.cond_drop_prob", "model.ema_decay", "train.threads", "sample.n_cells", "split.val_fraction", "seed"} <= keys
    assert any(nullable for *_, nullable in FIELDS) and any(integer for *_, integer, _ in FIELDS)


@pytest.mark.parametrize(("key", "limits", "integer", "nullable"), FIELDS, ids=[key for key, *_ in FIELDS])
def test_out_of_range_values_are_refused_when_the_config_loads(key: str, limits: Range, integer: bool, nullable: bool) -> None:
    for value in _outside(limits, integer):
        with pytest.raises(ConfigError) as err:
            from_mapping(RunConfig, _nested(key, value))
        kind = "an integer" if integer else "a number"
        message = str(err.value)
        assert message.startswith(f"{key} = {value!r} is out of range; set {key} to {kind} {limits.text}"), message
        assert ("or null" in message) == nullable


@pytest.mark.parametrize(("key", "limits", "integer", "nullable"), FIELDS, ids=[key for key, *_ in FIELDS])
def test_boundaries_and_null_are_accepted_where_allowed(key: str, limits: Range, integer: bool, nullable: bool) -> None:
    section, _, leaf = key.rpartition(".")
    for value in _boundaries(limits, integer) + ([None] if nullable else []):
        config = from_mapping(RunConfig, _nested(key, value))
        assert getattr(getattr(config, section) if section else config, leaf) == value


def test_nan_is_out_of_every_range() -> None:
    with pytest.raises(ConfigError, match=r"model.mmd_weight = nan is out of range"):
        load_config(None, ["model.mmd_weight=.nan"])


def test_a_number_written_as_a_yaml_string_is_converted_then_checked() -> None:
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError, match=r"train.lr = -0.001 is out of range; set train.lr to a number > 0\."):
        load_config(None, ["train.lr=-1e-3"])


def test_the_other_choices_of_the_type_are_named_in_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"train.num_workers = -2 is out of range; set train.num_workers to an integer >= 0 or 'auto'\."):
        config_from_dict({"train": {"num_workers": -2}})
    assert config_from_dict({"train": {"num_workers": "auto", "threads": "auto"}}).train.threads == "auto"


def test_a_config_changed_in_python_is_checked_again() -> None:
    config = load_config(None)
    with pytest.raises(ConfigError, match=r"train.steps = -1 is out of range"):
        check(replace(config, train=replace(config.train, steps=-1)))
    with pytest.raises(ConfigError, match=r"data.set_size = 0 is out of range"):
        check_ranges(replace(config, data=replace(config.data, set_size=0)))
    check_ranges(config)


@pytest.mark.parametrize(
    ("limits", "text", "inside", "outside"),
    [
        (Positive, "> 0", [1e-9, 3], [0, -1]),
        (NonNegative, ">= 0", [0, 2.5], [-1e-9]),
        (UnitInterval, "in [0, 1]", [0, 0.5, 1], [-0.1, 1.1]),
        (HalfOpenUnit, "in [0, 1)", [0, 0.999], [1]),
        (OpenUnit, "in (0, 1)", [0.5], [0, 1]),
        (Range(0, 1, closed_left=False), "in (0, 1]", [1], [0]),
        (Range(2), ">= 2", [2], [1]),
        (Range(high=5, closed_right=False), "< 5", [-3], [5]),
        (Range(0.5, 2.5), "in [0.5, 2.5]", [0.5, 2.5], [0.4]),
    ],
)
def test_range_text_and_membership(limits: Range, text: str, inside: list[float], outside: list[float]) -> None:
    assert limits.text == text
    assert all(v in limits for v in inside) and not any(v in limits for v in outside)
    assert math.nan not in limits


def test_check_takes_numpy_numbers_and_refuses_booleans_and_strings() -> None:
    assert Positive.check(np.int64(3), "n", integer=True) == 3
    assert UnitInterval.check(np.float32(0.5), "p") == 0.5
    with pytest.raises(ConfigError, match=r"n = True is not an integer; set n to an integer > 0\."):
        Positive.check(True, "n", integer=True)
    with pytest.raises(ConfigError, match=r"n = 2.5 is not an integer"):
        Positive.check(2.5, "n", integer=True)
    with pytest.raises(InputError, match=r"p = 'x' is not a number; set p to a number in \[0, 1\] or None\."):
        UnitInterval.check("x", "p", alternatives=("None",), error=InputError)


def test_the_model_checks_its_python_arguments_with_the_same_ranges() -> None:
    from perturbdiff_core.diffusion.model import RKHSDiffusion

    denoiser = {"name": "deepsets", "num_genes": 3}  # never built: the ranges are checked first
    with pytest.raises(ConfigError, match=r"cond_drop_prob = 1.5 is out of range; set cond_drop_prob to a number in \[0, 1\]\."):
        RKHSDiffusion(denoiser, cond_drop_prob=1.5)
    with pytest.raises(ConfigError, match=r"ema_decay = 1.0 is out of range; set ema_decay to a number in \[0, 1\) or None\."):
        RKHSDiffusion(denoiser, ema_decay=1.0)
