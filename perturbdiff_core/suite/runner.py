"""Running a suite: every (task, seed) checked first, then each unfinished one run in its own resumable folder."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..ablation import Job, check_folder, runner
from .spec import SuiteRun, SuiteSpec, check_splits, run_dir
from .summary import SuiteSummary, summarize_suite


def checked_runs(spec: SuiteSpec, out: str | os.PathLike[str]) -> list[SuiteRun]:
    """Every run of ``spec``, checked before any runs: configs (:meth:`SuiteSpec.runs`), splits against their data
    (:func:`check_splits`), and no folder holding another configuration (:func:`~.ablation.check_folder`)."""
    runs = spec.runs()
    check_splits(runs, spec.source)
    for run in runs:
        check_folder(run_dir(out, run), run.config)
    return runs


def run_suite(
    spec: SuiteSpec,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    report: Callable[[str], None] = print,
    processes: int = 1,
) -> SuiteSummary:
    """Run every unfinished (task, seed) of ``spec`` into ``out/tasks/``, ``processes`` at a time (side by side in
    their own processes, :func:`~perturbdiff_core.ablation.runner.run_folders`), then write the summary; returns it.

    Finished runs (``metrics.csv`` written) are skipped and interrupted ones resume from their checkpoint
    (:func:`~perturbdiff_core.ablation.run_folders`). A failing run stops the suite with its name.
    """
    runs = checked_runs(spec, out)
    jobs = [Job(run.name, run.config, run_dir(out, run)) for run in runs]
    runner.run_folders(jobs, spec.metrics, progress=progress, report=report, noun="run", whole="suite",
                       processes=processes)
    return summarize_suite(spec, runs, out)
