"""Running an ablation grid: every unfinished cell trained, predicted and evaluated in its own resumable run folder.

:func:`run_folders` and :func:`check_folder` serve any list of run folders (``perturbdiff suite`` too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Sequence
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ..configuration import read_yaml
from ..errors import ConfigError, Interrupted, PerturbDiffError, stop_signal
from ..evaluation import ALL_CONDITIONS
from ..runs.checkpoint import has_checkpoint
from ..runs.config import RunConfig, config_from_dict, differences
from ..runs.folder import RunDir, RunFolder
from ..runs.pipeline import MODEL, evaluate_run, predict_all
from ..runs.training import Trainer
from ..threads import AUTO, resolve_threads
from .grid import Cell, GridSpec, cell_dir
from .parallel import side_by_side
from .summary import key_metrics, summarize_grid

#: Keys that may differ between a cell's folder and the grid without making its results stale.
IGNORED_ON_RESUME = ("data.path", "train.device", "train.num_workers", "train.threads")
#: Keys that only change what a trained run predicts and how it is scored: a finished folder whose config differs
#: in them is predicted and evaluated again from its checkpoint (status ``evaluate``), not trained again.
AFTER_TRAINING = ("sample.", "evaluate.")


def cell_status(folder: Path, config: RunConfig | None = None) -> str:
    """``done`` (metrics written), ``evaluate`` (metrics written under other :data:`AFTER_TRAINING` settings than
    ``config``'s), ``resume`` (a checkpoint) or ``new``."""
    if RunDir(folder).metrics.is_file():
        after = config is not None and any(key.startswith(AFTER_TRAINING) for key in _differences(folder, config))
        return "evaluate" if after else "done"
    return "resume" if has_checkpoint(folder) else "new"


def _differences(folder: Path, config: RunConfig) -> list[str]:
    """The keys whose value in ``folder``'s saved config differs from ``config``'s (none without a saved config)."""
    if not RunDir(folder).config.is_file():
        return []
    saved = config_from_dict(read_yaml(RunDir(folder).config)).to_dict()  # keys added since take their defaults
    return differences(saved, config.to_dict())


def check_folders(cells: Sequence[Cell], out: str | os.PathLike[str]) -> None:
    """ConfigError when a cell's folder holds a run of another configuration (its results would be stale)."""
    for cell in cells:
        check_folder(cell_dir(out, cell), cell.config)


def check_folder(folder: Path, config: RunConfig) -> None:
    """ConfigError when ``folder`` holds a run whose training differs from ``config``'s (its results would be stale);
    :data:`AFTER_TRAINING` keys may differ (the run is evaluated again)."""
    changed = [key for key in _differences(folder, config) if not key.startswith(IGNORED_ON_RESUME + AFTER_TRAINING)]
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


class Outcome(NamedTuple):
    """How a job ended: its wall time, its metrics table or the message of what stopped it, and the signal number
    when a stop signal (Ctrl-C, SIGTERM) did. Messages, not errors, cross back from a worker process: every error
    class need not survive pickling."""

    seconds: float
    table: pd.DataFrame | None = None
    error: str | None = None
    signum: int | None = None


def timed_run(job: Job, progress: bool) -> Outcome:
    """:func:`run_cell` of ``job``, timed; a :class:`PerturbDiffError` becomes the outcome's message."""
    start = time.perf_counter()
    try:
        table = run_cell(job.config, job.folder, progress=progress)
    except PerturbDiffError as err:
        return Outcome(time.perf_counter() - start, error=str(err))
    return Outcome(time.perf_counter() - start, table)


def run_in_worker(job: Job) -> Outcome:
    """:func:`timed_run` in a worker process, without a progress bar; a stop signal becomes the outcome too."""
    start = time.perf_counter()
    try:
        return timed_run(job, progress=False)
    except KeyboardInterrupt as stop:  # training saved a checkpoint first (its message says where)
        return Outcome(time.perf_counter() - start, error=str(stop) or "interrupted", signum=stop_signal(stop))


def run_folders(
    jobs: Sequence[Job],
    metrics: Sequence[str],
    *,
    progress: bool = True,
    report: Callable[[str], None] = print,
    noun: str = "cell",
    whole: str = "grid",
    processes: int = 1,
) -> None:
    """Run every unfinished job (a finished folder is skipped, one with a checkpoint resumes).

    ``report`` gets one line per job with the model's ``metrics``, as it finishes. With ``processes`` above 1
    that many jobs run side by side in worker processes that share the CPUs, without progress bars
    (:func:`~.parallel.side_by_side`); otherwise one at a time, in order, in this process. A failing job
    stops the others with its name (``noun`` and ``whole`` word the message: a cell of the grid); finished
    folders are kept.
    """
    if processes < 1:
        raise ConfigError(f"processes must be at least 1, got {processes}.")
    width = len(str(len(jobs)))
    todo: list[tuple[str, str, Job]] = []
    for i, job in enumerate(jobs, 1):
        status = cell_status(job.folder, job.config)
        prefix = f"[{i:>{width}}/{len(jobs)}] {job.name}"
        if status == "done":
            report(f"{prefix}: done before, skipped")
        else:
            todo.append((prefix, status, job))
    pending = [job for _, _, job in todo]
    if processes > 1 and len(pending) > 1:
        threads = max(1, resolve_threads(AUTO) // processes)
        report(f"running {min(processes, len(pending))} {noun}s at a time, {threads} thread{'s' * (threads != 1)} each")
        finished = side_by_side(run_in_worker, pending, processes, threads, stops=lambda o: o.error is not None)
    else:
        finished = run_in_turn(pending, progress)
    ended: tuple[Job, Outcome] | None = None  # the first job that failed or was stopped
    with closing(finished):  # an interrupt while reporting stops the jobs still running too
        for index, outcome in finished:
            prefix, status, job = todo[index]
            if outcome.error is not None:
                ended = ended or (job, outcome)
                continue
            verb = {"resume": "resumed and finished", "evaluate": "predicted and evaluated again"}.get(status, "finished")
            report(f"{prefix}: {verb} in {_duration(outcome.seconds)}; {_headline(outcome.table, metrics)}")
    if ended is None:
        return
    job, outcome = ended
    if outcome.signum is not None:
        raise Interrupted(outcome.signum, f"{job.name} {outcome.error}")
    raise PerturbDiffError(
        f"{noun.capitalize()} {job.name} failed: {outcome.error} Fix it and run the {whole} again: finished {noun}s "
        f"are kept."
    )


def run_in_turn(jobs: Sequence[Job], progress: bool) -> Generator[tuple[int, Outcome], None, None]:
    """Each job's index and :func:`timed_run` in this process, in order, up to the first failure."""
    for index, job in enumerate(jobs):
        outcome = timed_run(job, progress)
        yield index, outcome
        if outcome.error is not None:
            return


def run_grid(
    spec: GridSpec,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    report: Callable[[str], None] = print,
    processes: int = 1,
) -> pd.DataFrame:
    """Run every unfinished cell of ``spec`` into ``out/cells/``, ``processes`` at a time, then write the summary;
    returns it.

    All cells are checked first (:meth:`GridSpec.cells`, :func:`check_folders`). ``report`` gets
    one line per cell. A failing cell stops the grid with its name; finished cells are kept.
    """
    cells = spec.cells()
    check_folders(cells, out)
    run_folders([Job(cell.name, cell.config, cell_dir(out, cell)) for cell in cells], spec.metrics,
                progress=progress, report=report, processes=processes)
    return summarize_grid(spec, cells, out)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{seconds:.1f}s"


def _headline(metrics: pd.DataFrame, wanted: Sequence[str]) -> str:
    """``metric value`` of the model's aggregate key metrics, for the progress line."""
    rows = metrics[(metrics.condition == ALL_CONDITIONS) & (metrics.method == MODEL)]
    values = rows.set_index("metric")["value"]
    return ", ".join(f"{m} {values[m]:.4g}" for m in key_metrics(rows, wanted)) or "no key metric"
