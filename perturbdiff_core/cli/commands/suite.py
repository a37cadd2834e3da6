"""``perturbdiff suite``: run a list of tasks (run config + overrides) times seeds, resumable, and say where the model
beats, ties with and loses to the best baseline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ...names import (
    MODEL,
    RUNS_DIR,
    SUITE_FILE,
    SUITE_MARKDOWN_FILE,
    SUITE_PLOT_FILE,
    SUITE_SUMMARY_FILE,
    TASKS_DIR,
)
from ._argtypes import add_jobs_option

if TYPE_CHECKING:  # pandas, rich and the run machinery are imported when the command runs, not for --help
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from ...suite import SuiteSpec

_EPILOG = f"""\
SUITE.yaml:
  seeds: [0, 1, 2]                     # default [0]; --seeds N means the seeds 0 .. N-1
  set: {{train.steps: 1000}}             # optional: overrides for every task, as --set
  metrics: [pearson_delta, mse_delta, mmd2_energy, roc_auc]   # optional: headline metrics
  tasks:
    - name: kang18_CD14+Mono                    # folder-safe: letters, digits, . _ + -
      config: kang18_holdout_celltype.yaml      # run config, relative to SUITE.yaml
      set: {{split.holdout: [CD14+Mono]}}         # optional: this task's overrides
    - name: norman19_combo_fold0
      config: norman19_holdout_combination.yaml
      set: {{split.holdout: [KLF1+MAP2K6, MAPK1+TGFBR2]}}

Order: the task's config <- set <- --set <- the task's set <- the seed. Every (task, seed) is
checked (keys, plug-ins, data path, held-out values in the data) before any runs. Headline
metrics this version does not define are kept with a note and never compared.

Output (--out, default {RUNS_DIR}/<suite name>): {TASKS_DIR}/<task>/seed=<s>/ is a run folder (as
'perturbdiff run'); {SUITE_FILE} holds every row of every run's metrics.csv (task, seed,
condition, metric, method, value); {SUITE_SUMMARY_FILE} per task and headline metric the model's
mean and sd over seeds, the best baseline (closest to the metric's best value, by its mean
over seeds) and the outcome (beats, ties, loses, skipped); {SUITE_MARKDOWN_FILE} the same as tables
with the overall count, and the count on every directional metric of metrics.csv; {SUITE_PLOT_FILE} the
headline metrics per task. Running the same command
again skips finished runs and resumes interrupted ones; a finished run is predicted and scored again
from its checkpoint, not trained again, when only sample.* or evaluate.* keys changed (another
baseline list, say); other changed keys are refused.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff suite``."""
    parser = subparsers.add_parser(
        "suite",
        help="run tasks x seeds (configs with overrides) and compare the model with the best baseline per task",
        description=(
            "Run every task of a suite at every seed as a resumable run folder, then write every metric, the "
            "model's mean and sd over seeds against the best baseline on the headline metrics, a plot, and print "
            "where the model beats, ties with and loses to the best baseline."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", metavar="SUITE.yaml", help="suite file (see below and examples/suite_cpu.yaml)")
    parser.add_argument("--out", metavar="DIR", default=None, help=f"suite folder (default: {RUNS_DIR}/<suite name>)")
    parser.add_argument(
        "--seeds", type=int, metavar="N", default=None, help="run the seeds 0 .. N-1 instead of the file's seeds"
    )
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys of every task (values parsed as YAML); a task's own set: wins",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check every (task, seed) and list them with their status; run nothing"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-run training progress bar")
    add_jobs_option(parser, "run")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the suite, run or resume its runs, write and print the summary."""
    from rich.console import Console
    from rich.markup import escape

    from ...suite import control_line, headline, read_suite, run_suite
    from ._resumable import interrupted, screen

    spec = read_suite(args.suite, args.overrides, seeds=args.seeds)
    out = Path(args.out) if args.out is not None else Path(RUNS_DIR) / Path(args.suite).stem
    console = Console(stderr=True, highlight=False)
    for note in spec.notes:
        console.print(f"perturbdiff: note: {escape(note)}")
    if args.dry_run:
        return dry_run(spec, out, console)
    try:
        done = run_suite(
            spec, out, progress=not args.quiet, report=lambda line: console.print(escape(line)), processes=args.jobs
        )
    except KeyboardInterrupt as stop:  # training saved a checkpoint first (TrainingInterrupted says where)
        return interrupted(stop, console, "suite")
    shown = screen()
    shown.print(summary_table(done.summary, len(spec.seeds)))
    shown.print(escape(headline(done.summary)))
    shown.print(escape(control_line(done.means)))
    console.print(f"Wrote {SUITE_FILE}, {SUITE_SUMMARY_FILE}, {SUITE_MARKDOWN_FILE} and {SUITE_PLOT_FILE} to {escape(str(out))}")
    return 0


def dry_run(spec: SuiteSpec, out: Path, console: Console) -> int:
    """List every (task, seed) with its status (new, resume, evaluate, done) after checking all of them."""
    from ...ablation import cell_status
    from ...suite import checked_runs, run_dir
    from ._resumable import list_statuses

    runs = checked_runs(spec, out)
    list_statuses([(run.name, cell_status(run_dir(out, run), run.config)) for run in runs], console, "run", out / TASKS_DIR)
    return 0


def summary_table(summary: pd.DataFrame, n_seeds: int) -> Table:
    """Tasks x headline metrics: the model's mean \u00b1 sd, coloured by its outcome against the best baseline."""
    import pandas as pd
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from ...ablation import mean_sd
    from ...suite import SKIPPED

    styles = {"beats": "green", "ties": "yellow", "loses": "red", SKIPPED: "dim"}
    metrics = list(dict.fromkeys(summary.metric[summary.note != "not in metrics.csv"]))
    view = Table(
        title=f"{MODEL}: mean \u00b1 sd over {n_seeds} seed(s) against the best baseline",
        caption="[green]beats[/green]  [yellow]ties[/yellow]  [red]loses[/red]  [dim]skipped (undefined)[/dim]",
        box=box.SIMPLE_HEAVY,
    )
    tasks = list(dict.fromkeys(summary.task))
    view.add_column("task", no_wrap=True, min_width=max(map(len, ["task", *tasks])))
    for metric in metrics:  # a narrow terminal wraps the numbers rather than cutting them
        view.add_column(metric, justify="right", overflow="fold")
    cells = summary.set_index(["task", "metric"])
    for task in tasks:
        row = [escape(task)]
        for metric in metrics:
            if (task, metric) not in cells.index:
                row.append("")
                continue
            found = cells.loc[(task, metric)]
            text = "-" if pd.isna(found.model_mean) else mean_sd(found.model_mean, found.model_sd)
            row.append(f"[{styles[found.outcome]}]{escape(text)}[/{styles[found.outcome]}]")
        view.add_row(*row)
    return view
