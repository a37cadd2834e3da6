"""Suites: tasks (a run config and its overrides) times seeds, one resumable run each, summarised against the baselines.

A suite file (``perturbdiff suite SUITE.yaml``)::

    seeds: [0, 1, 2]                  # default [0]; --seeds N means the seeds 0 .. N-1
    set: {train.steps: 1000}          # optional: overrides for every task (dotted keys, as --set)
    metrics: [pearson_delta, mse_delta, mmd2_energy, roc_auc]   # optional: the headline metrics
    tasks:
      - name: kang18_CD14+Mono                    # folder-safe: letters, digits, '.', '_', '+', '-'
        config: kang18_holdout_celltype.yaml      # a run config, relative to the suite file
        set: {split.holdout: [CD14+Mono]}         # optional: this task's overrides
      - name: norman19_combo_fold0
        config: norman19_holdout_combination.yaml
        set: {split.holdout: [KLF1+MAP2K6, MAPK1+TGFBR2]}

Order: the task's config <- the suite's ``set`` <- ``--set`` <- the task's ``set`` <- ``seed`` and
``name`` (``<task>__seed=<s>``), which the suite sets itself. Every run is checked before any runs:
keys, types, plug-ins, the data path, the split against its data (held-out values present,
combinations with their parts trained on), no two tasks with the same configuration, no folder
holding another configuration. A headline metric this version does not define (one a newer
evaluation or a plug-in writes) is kept with a note: summarised where the runs write it, never
compared. A headline metric a task's runs do not write, NaN for the model or every baseline, or
a DE metric of a task without real DE genes (NaN, or 0 by convention), is skipped for that task
with the reason.

Output folder: ``tasks/<task>/seed=<s>/`` is a run folder (as ``perturbdiff run``); one with
``metrics.csv`` is done and skipped, one with a checkpoint resumes. ``suite.csv`` holds every row
of every run's ``metrics.csv`` (``task, seed, condition, metric, method, value``);
``suite_summary.csv`` per task and headline metric the model's mean and sd over seeds, the best
baseline by its mean over seeds (closest to the metric's best value) and the outcome (``beats``,
``ties``, ``loses`` or ``skipped``, with a note); ``suite.md`` the same as Markdown tables with
the overall count, the pairs where the model is worse than the control baseline on mse_delta or
the MMD, and the same comparison on every directional metric of ``metrics.csv``; ``suite.png`` the
headline metrics per task.
"""

from .runner import checked_runs, run_suite
from .spec import (
    DEFAULT_METRICS,
    DEFAULT_SEEDS,
    SUITE_KEYS,
    TASK_KEYS,
    TASKS_DIR,
    SuiteRun,
    SuiteSpec,
    Task,
    check_splits,
    read_suite,
    run_dir,
    run_name,
)
from .summary import (
    CONTROL,
    CONTROL_METRICS,
    LONG_COLUMNS,
    MARKDOWN_FILE,
    PLOT_FILE,
    SKIPPED,
    SUITE_FILE,
    SUMMARY_COLUMNS,
    SUMMARY_FILE,
    SuiteSummary,
    collect,
    control_line,
    every_metric,
    headline,
    report,
    summarize_suite,
    task_means,
    task_table,
    versus_baselines,
    worse_than_control,
    write_plot,
)

__all__ = [
    "CONTROL",
    "CONTROL_METRICS",
    "DEFAULT_METRICS",
    "DEFAULT_SEEDS",
    "LONG_COLUMNS",
    "MARKDOWN_FILE",
    "PLOT_FILE",
    "SKIPPED",
    "SUITE_FILE",
    "SUITE_KEYS",
    "SUMMARY_COLUMNS",
    "SUMMARY_FILE",
    "TASKS_DIR",
    "TASK_KEYS",
    "SuiteRun",
    "SuiteSpec",
    "SuiteSummary",
    "Task",
    "check_splits",
    "checked_runs",
    "collect",
    "control_line",
    "every_metric",
    "headline",
    "read_suite",
    "report",
    "run_dir",
    "run_name",
    "run_suite",
    "summarize_suite",
    "task_means",
    "task_table",
    "versus_baselines",
    "worse_than_control",
    "write_plot",
]
