"""One call from configs to ready data: validate, split, fit the encoder, save the split and state."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad

from ..io import atomic_write_text
from ..names import SPLIT_FILE, STATE_FILE
from .config import DataConfig, SplitConfig
from .dataset import PerturbationData
from .splits import Split, make_split


def prepare(
    data_config: DataConfig,
    split_config: SplitConfig,
    source: ad.AnnData | str | os.PathLike[str] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> tuple[PerturbationData, Split]:
    """Validated data fitted on the training conditions (``split.train_fraction`` of their cells), and its split.

    Every check (data, split, encodability of each test condition) runs before anything is
    written; with ``out_dir`` the split (``split.json``, reloadable through ``split.file``) and
    the data state (``data_state.json``: genes, vocabularies, encoder) are then written atomically.
    """
    data = PerturbationData(source, data_config)
    split = make_split(data, split_config)
    split.apply(data)
    data.fit(split.train)
    data.encode(split.test)  # an unseen perturbation without a vector fails here, not after training
    if out_dir is not None:
        save_prepared(data, split, out_dir)
    return data, split


def save_prepared(data: PerturbationData, split: Split, out_dir: str | os.PathLike[str]) -> None:
    """Write ``split.json`` and ``data_state.json`` (genes, vocabularies, encoder) atomically into ``out_dir``."""
    out = Path(out_dir)
    split.save(out / SPLIT_FILE)
    atomic_write_text(out / STATE_FILE, json.dumps(data.to_state(), indent=1) + "\n")


def load_prepared(
    out_dir: str | os.PathLike[str], data_config: DataConfig, source: ad.AnnData | str | os.PathLike[str] | None = None
) -> tuple[PerturbationData, Split]:
    """The data and split that :func:`save_prepared` wrote into ``out_dir``, read again from ``source``."""
    out = Path(out_dir)
    data = PerturbationData.from_state(json.loads((out / STATE_FILE).read_text()), source, data_config)
    split = Split.load(out / SPLIT_FILE)
    split.apply(data)
    return data, split
