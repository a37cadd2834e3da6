"""Running an ablation grid: every unfinished cell trained, predicted and evaluated in its own resumable run folder.

:func:`run_folders` and :func:`check_folder` serve any list of run folders (``perturbdiff suite`` too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ..configuration import read_yaml
from ..errors import ConfigError, PerturbDiffError
from ..evaluation import ALL_CONDITIONS
from ..runs.checkpoint import has_checkpoint
from ..runs.config import RunConfig, config_from_dict, differences
from ..runs.folder import RunDir, RunFolder
from ..runs.pipeline import MODEL, evaluate_run, predict_all
from ..runs.training import Trainer
from .grid import Cell, GridSpec, cell_dir
from .summary import key_metrics, summarize_grid

#: Keys that may differ between a cell's folder and the grid without making its results stale.
IGNORED_ON_RESUME = ("data.path", "train.device", "train.num_workers", "train.threads")


def cell_status(folder: Path) -> str:
    """``done`` (metrics written), ``resume`` (a checkpoint) or ``new``."""
    if RunDir(folder).metrics.is_file():
        return "done"
    return "resume" if has_checkpoint(folder) else "new"


def check_folders(cells: Sequence[Cell], out: str | os.PathLike[str]) -> None:
    """ConfigError when a cell's folder holds a run of another configuration (its results would be stale)."""
    for cell in cells:
        check_folder(cell_dir(out, cell), cell.config)


def check_folder(folder: Path, config: RunConfig) -> None:
    """ConfigError when ``folder`` holds a run of another configuration than ``config`` (its results would be stale)."""
    saved_file = RunDir(folder).config
    if not saved_file.is_file():
        return
    saved = config_from_dict(read_yaml(saved_file)).to_dict()  # keys added since it was written take their defaults
    changed = [
        key for key in differences(saved, config.to_dict()) if not key.startswith(IGNORED_ON_RESUME)
    ]
    if changed:
        raise ConfigError(
            f"{folder} was run with another configuration ({', '.join(changed)} differ); run into another --out "
            f"folder, or delete {folder} to run it again."
        )


def run_cell(config: RunConfig, folder: Path, *, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) one cell, predict its test conditions, write ``metrics.csv`` and ``report.html``.

    The steps of ``perturbdiff run`` without its command line, in the folder held by this process
    (:class:`~perturbdiff_core.runs.folder.RunFolder`); returns the metrics table.
    """
    with RunFolder(folder) as claimed:
        trainer = Trainer(config, folder, resume=has_checkpoint(folder), progress=progress)
        claimed.keep()
        trainer.fit()
        predictions, real = predict_all(trainer)
        return evaluate_run(trainer, predictions, real)


class Job(NamedTuple):
    """One run to do: its name in progress lines and errors, its checked config, its run folder."""

    name: str
    config: RunConfig
    folder: Path


def run_folders(
    jobs: Sequence[Job],
    metrics: Sequence[str],
    *,
    progress: bool = True,
    report: Callable[[str], None] = print,
    noun: str = "cell",
    whole: str = "grid",
) -> None:
    """Run every unfinished job in order (a finished folder is skipped, one with a checkpoint resumes).

    ``report`` gets one line per job with the model's ``metrics``. A failing job stops the others with
    its name (``noun`` and ``whole`` word the message: a cell of the grid); finished folders are kept.
    """
    width = len(str(len(jobs)))
    for i, job in enumerate(jobs, 1):
        status = cell_status(job.folder)
        prefix = f"[{i:>{width}}/{len(jobs)}] {job.name}"
        if status == "done":
            report(f"{prefix}: done before, skipped")
            continue
        start = time.perf_counter()
        try:
            table = run_cell(job.config, job.folder, progress=progress)
        except PerturbDiffError as err:
            raise PerturbDiffError(
                f"{noun.capitalize()} {job.name} failed: {err} Fix it and run the {whole} again: finished {noun}s "
                f"are kept."
            ) from err
        verb = "resumed and finished" if status == "resume" else "finished"
        report(f"{prefix}: {verb} in {_duration(time.perf_counter() - start)}; {_headline(table, metrics)}")


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
    run_folders([Job(cell.name, cell.config, cell_dir(out, cell)) for cell in cells], spec.metrics,
                progress=progress, report=report)
    return summarize_grid(spec, cells, out)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def _headline(metrics: pd.DataFrame, wanted: Sequence[str]) -> str:
    """``metric value`` of the model's aggregate key metrics, for the progress line."""
    rows = metrics[(metrics.condition == ALL_CONDITIONS) & (metrics.method == MODEL)]
    values = rows.set_index("metric")["value"]
    return ", ".join(f"{m} {values[m]:.4g}" for m in key_metrics(rows, wanted)) or "no key metric"
