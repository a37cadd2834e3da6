"""Running an ablation grid: every unfinished cell trained, predicted and evaluated in its own resumable run folder."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from ..checkpoint import has_checkpoint
from ..configuration import read_yaml
from ..errors import ConfigError, PerturbDiffError
from ..evaluation import ALL_CONDITIONS
from ..pipeline import METRICS_FILE, MODEL, evaluate_run, predict_all
from ..run_config import CONFIG_FILE, RunConfig, config_from_dict, differences
from ..run_folder import RunFolder
from ..training import Trainer
from .grid import Cell, GridSpec, cell_dir
from .summary import key_metrics, summarize_grid

#: Keys that may differ between a cell's folder and the grid without making its results stale.
IGNORED_ON_RESUME = ("data.path", "train.device", "train.num_workers")


def cell_status(folder: Path) -> str:
    """``done`` (metrics written), ``resume`` (a checkpoint) or ``new``."""
    if (folder / METRICS_FILE).is_file():
        return "done"
    return "resume" if has_checkpoint(folder) else "new"


def check_folders(cells: Sequence[Cell], out: str | os.PathLike[str]) -> None:
    """ConfigError when a cell's folder holds a run of another configuration (its results would be stale)."""
    for cell in cells:
        saved_file = cell_dir(out, cell) / CONFIG_FILE
        if not saved_file.is_file():
            continue
        saved = config_from_dict(read_yaml(saved_file)).to_dict()  # keys added since it was written take their defaults
        changed = [key for key in differences(saved, cell.config.to_dict()) if not key.startswith(IGNORED_ON_RESUME)]
        if changed:
            raise ConfigError(
                f"{saved_file.parent} was run with another configuration ({', '.join(changed)} differ); run the grid "
                f"into another --out folder, or delete that cell's folder to run it again."
            )


def run_cell(config: RunConfig, folder: Path, *, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) one cell, predict its test conditions, write ``metrics.csv`` and ``report.html``.

    The steps of ``perturbdiff run`` without its command line, in the folder held by this process
    (:class:`~perturbdiff_core.run_folder.RunFolder`); returns the metrics table.
    """
    with RunFolder(folder) as claimed:
        trainer = Trainer(config, folder, resume=has_checkpoint(folder), progress=progress)
        claimed.keep()
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


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def _headline(metrics: pd.DataFrame, wanted: Sequence[str]) -> str:
    """``metric value`` of the model's aggregate key metrics, for the progress line."""
    rows = metrics[(metrics.condition == ALL_CONDITIONS) & (metrics.method == MODEL)]
    values = rows.set_index("metric")["value"]
    return ", ".join(f"{m} {values[m]:.4g}" for m in key_metrics(rows, wanted)) or "no key metric"
