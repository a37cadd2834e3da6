"""``perturbdiff ablate``: run a grid of configs (kernel x estimator x ... x seed), resumable, and summarise it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ...names import (
    ABLATION_MARKDOWN_FILE,
    ABLATION_PLOT_FILE,
    ABLATION_TABLE_FILE,
    CELLS_DIR,
    CELLS_FILE,
    MODEL,
    RUNS_DIR,
)
from ._argtypes import add_jobs_option

if TYPE_CHECKING:  # pandas, rich and the run machinery are imported when the command runs, not for --help
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from ...ablation import GridSpec

_EPILOG = f"""\
GRID.yaml:
  base: kang18_holdout_celltype.yaml   # run config (a relative path is relative to GRID.yaml)
  set: {{train.steps: 300}}              # overrides for every cell, as --set
  grid:                                # axes: config key -> values; the cells are their product
    model.kernel:
      - energy                         # a plug-in name (its params become {{}})
      - {{name: rbf, lengthscale: median}}                # a plug-in with its params
      - {{label: rff, name: rbf, lengthscale: median,     # label: names it in folders and tables;
         set: {{model.estimator: embedding,               # set: further keys this value sets
               model.estimator_params: {{embedding: rff, num_features: 512}}}}}}
    model.estimator: [biased, unbiased]
    seed: [0, 1, 2]
  exclude:                             # optional: cells left out, by axis name and label
    - {{kernel: rff, estimator: unbiased}}
  metrics: [pearson_delta, mse_delta, mmd2_energy]   # optional: key metrics to plot and print

Any key of a run config can be an axis (model.mmd_weight, model.schedule, model.denoiser,
train.steps, ...), any installed plug-in a value (third-party ones included). A non-plug-in
value given as a mapping is {{value: ..., label: ...}}. Axes are named by the last part of
their key; a cell by axis=label joined with '__' (kernel=rbf__estimator=biased__seed=0).

Output (--out, default {RUNS_DIR}/<grid name>): {CELLS_DIR}/<cell>/ is a run folder (as
'perturbdiff run'); {CELLS_FILE} holds every cell's aggregate metrics; {ABLATION_TABLE_FILE} the mean
and sd over seeds per axes x metric x method (columns: the axes but seed, metric, method,
mean, std, n_seeds); {ABLATION_MARKDOWN_FILE} the key metrics as a Markdown table (for a README);
{ABLATION_PLOT_FILE} the model's key metrics. Every cell is checked before any
runs. Running the same command again skips finished cells and resumes interrupted ones; a finished
cell is predicted and scored again from its checkpoint, not trained again, when only sample.* or
evaluate.* keys changed; other changed keys are refused.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff ablate``."""
    parser = subparsers.add_parser(
        "ablate",
        help="run a grid of configs (kernel x estimator x ... x seed) and summarise it over seeds",
        description=(
            "Run every cell of an ablation grid as a resumable run folder, then write the mean and "
            "standard deviation over seeds of every metric, a plot of the key metrics, and print them."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("grid", metavar="GRID.yaml", help="grid file (see below and examples/ablation_kang18.yaml)")
    parser.add_argument("--out", metavar="DIR", default=None, help=f"grid folder (default: {RUNS_DIR}/<grid name>)")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="override config keys of every cell (values parsed as YAML); not the grid's axes",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check every cell and list them with their status; run nothing"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-cell training progress bar")
    add_jobs_option(parser, "cell")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the grid, run or resume its cells, write and print the summary."""
    from rich.console import Console
    from rich.markup import escape

    from ...ablation import read_grid, run_grid
    from ._resumable import interrupted, screen

    spec = read_grid(args.grid, args.overrides)
    out = Path(args.out) if args.out is not None else Path(RUNS_DIR) / Path(args.grid).stem
    console = Console(stderr=True, highlight=False)
    if args.dry_run:
        return dry_run(spec, out, console)
    try:
        table = run_grid(
            spec, out, progress=not args.quiet, report=lambda line: console.print(escape(line)), processes=args.jobs
        )
    except KeyboardInterrupt as stop:  # training saved a checkpoint first (TrainingInterrupted says where)
        return interrupted(stop, console, "grid")
    screen().print(summary_table(table, spec))
    console.print(f"Wrote {ABLATION_TABLE_FILE}, {ABLATION_MARKDOWN_FILE}, {ABLATION_PLOT_FILE} and {CELLS_FILE} to {out}")
    return 0


def dry_run(spec: GridSpec, out: Path, console: Console) -> int:
    """List the cells with their status (new, resume, evaluate, done) after checking all of them."""
    from ...ablation import cell_dir, cell_status, check_folders
    from ._resumable import list_statuses

    cells = spec.cells()
    check_folders(cells, out)
    list_statuses([(cell.name, cell_status(cell_dir(out, cell), cell.config)) for cell in cells], console, "cell", out / CELLS_DIR)
    return 0


def summary_table(table: pd.DataFrame, spec: GridSpec) -> Table:
    """The model's key metrics (mean +- sd over seeds) per cell group; baselines below when the same everywhere."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from ...ablation import key_metrics, overview

    metrics = key_metrics(table, spec.metrics)
    model, baselines = overview(table, spec.summary_axes, metrics)
    n_seeds = int(table[table.method == MODEL].n_seeds.max()) if len(table) else 0
    view = Table(title=f"{MODEL}: mean \u00b1 sd over {n_seeds} seed(s)", box=box.SIMPLE_HEAVY)
    for name in model.columns:
        if name in metrics:  # a narrow terminal wraps the numbers rather than cutting them
            view.add_column(name, justify="right", overflow="fold")
        else:
            width = max(len(name), *map(len, model[name]), *map(len, baselines[name]))
            view.add_column(name, no_wrap=True, min_width=width)
    for row in model.itertuples(index=False):
        view.add_row(*map(escape, row))
    if len(baselines):
        view.add_section()
        for row in baselines.itertuples(index=False):
            view.add_row(*(f"[dim]{escape(v)}[/dim]" for v in row))
    return view
