"""Typed config loading: nested dataclasses, strict keys, YAML-valued overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from perturbdiff_core.configuration import from_mapping, merge, parse_overrides, read_yaml, to_mapping
from perturbdiff_core.errors import ConfigError


@dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-3
    name: str | None = None


@dataclass
class Outer:
    seed: int = 0
    holdout: list[str] = field(default_factory=list)
    train: Inner = field(default_factory=Inner)


def test_nested_build_and_round_trip():
    cfg = from_mapping(Outer, {"seed": 3, "holdout": ["a", "b"], "train": {"steps": 5, "lr": 1}})
    assert cfg.train.steps == 5 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert from_mapping(Outer, to_mapping(cfg)) == cfg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"train\.stepz.*valid keys here: train\.steps, train\.lr"):
        from_mapping(Outer, {"train": {"stepz": 5}})


@pytest.mark.parametrize(
    "data, message",
    [({"seed": "three"}, "seed must be int"), ({"holdout": "a"}, "must be a list"), ({"train": {"steps": True}}, "steps must be int")],
)
def test_wrong_types_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(Outer, data)


def test_overrides_parse_yaml_values_and_nest():
    tree = parse_overrides(["split.holdout=[k562]", "data.batch_key=null", "train.steps=100", "seed=7"])
    assert tree == {"split": {"holdout": ["k562"]}, "data": {"batch_key": None}, "train": {"steps": 100}, "seed": 7}
    assert merge({"train": {"steps": 1, "lr": 0.1}}, tree)["train"] == {"steps": 100, "lr": 0.1}


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="No such config file"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(bad)


@pytest.mark.parametrize(
    ("data", "guess"),
    [({"trian": {"steps": 5}}, "(did you mean 'train'?)"), ({"train": {"stpes": 5}}, "(did you mean 'train.steps'?)")],
)
def test_a_misspelt_key_gets_a_guess(data, guess):
    with pytest.raises(ConfigError) as err:
        from_mapping(Outer, data)
    assert guess in str(err.value)


def test_a_key_close_to_nothing_gets_no_guess():
    with pytest.raises(ConfigError) as err:
        from_mapping(Outer, {"zzzz": 1})
    assert "did you mean" not in str(err.value)


def test_a_config_path_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        read_yaml(tmp_path)
