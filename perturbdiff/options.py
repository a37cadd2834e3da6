"""From the notebook API's arguments to a checked :class:`~perturbdiff_core.runs.config.RunConfig`.

The order is the command line's: the defaults, then a base config (a YAML file, a RunConfig or a
mapping), then the data keys and the split given as arguments, then the options, which are dotted
keys (``{"train.steps": 500}``, what ``--set`` takes) or nested mappings (``model={"kernel": "rbf"}``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from perturbdiff_core.configuration import merge, nested, read_yaml
from perturbdiff_core.data.config import SplitConfig
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.runs.config import RunConfig, config_from_dict

#: The config's name when neither the base config nor the options give one (names the report).
DEFAULT_NAME = "notebook"


def _base(config: str | os.PathLike[str] | RunConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The base config's values (``name`` from a YAML file's stem when it sets none)."""
    if config is None:
        return {}
    if isinstance(config, RunConfig):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        values = read_yaml(config)
        return {"name": Path(config).stem, **values}
    raise ConfigError(f"config must be a YAML path, a RunConfig or a mapping, got {type(config).__name__}.")


def _split(split: Mapping[str, Any] | SplitConfig | None) -> dict[str, Any]:
    if split is None:
        return {}
    if isinstance(split, SplitConfig):
        return {"split": split.to_dict()}
    if isinstance(split, Mapping):
        return {"split": dict(split)}
    raise ConfigError(
        f"split must be a mapping such as {{'kind': 'holdout_cell_type', 'holdout': ['CD14+Mono']}} or a "
        f"SplitConfig, got {type(split).__name__}."
    )


def run_config(
    config: str | os.PathLike[str] | RunConfig | Mapping[str, Any] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | SplitConfig | None = None,
    options: Mapping[str, Any] | None = None,
) -> RunConfig:
    """The checked run configuration: defaults <- ``config`` <- ``data`` keys <- ``split`` <- ``options``.

    Unknown keys and ill-typed values raise a ConfigError naming the key, as in a YAML config.

    Example:
        >>> run_config(data={"perturbation_key": "condition"}, split={"kind": "random"},
        ...            options={"train.steps": 100, "model": {"kernel": "rbf"}}).train.steps
        100
    """
    values = _base(config)
    if data:
        values = merge(values, {"data": dict(data)})
    values = merge(values, _split(split))
    values = merge(values, nested(dict(options or {})))
    values.setdefault("name", DEFAULT_NAME)
    if values["name"] is None:
        values["name"] = DEFAULT_NAME
    return config_from_dict(values)
