"""Ablation grids: one resumable run per cell of a product of config values, summarised over seeds.

A grid file (``perturbdiff ablate GRID.yaml``)::

    base: kang18_holdout_celltype.yaml   # run config; a relative path is relative to the grid file
    set: {train.steps: 300}              # overrides for every cell (dotted keys, as --set)
    grid:                                # axes: a config key -> its values; cells = the product
      model.kernel:
        - energy
        - {name: rbf, lengthscale: median}
        - {label: mix, name: mixture, base: rbf, lengthscales: [0.5, 1, 2, 4]}
      model.estimator: [biased, unbiased]
      seed: [0, 1, 2]
    exclude:                             # optional: cells to leave out, by axis name and label
      - {kernel: mix, estimator: unbiased}
    metrics: [pearson_delta, mse_delta]  # optional: the key metrics plotted and printed

Axis values. A plain value sets the key. For a plug-in key (one with a ``<key>_params``
sibling: ``model.kernel``, ``model.estimator``, ``model.schedule``, ``model.denoiser``) a value
names the whole plug-in: a plain name sets the params to ``{}``, a mapping ``{name: ..., **params}``
sets both. Any other key takes a mapping ``{value: ...}``. Every mapping may add ``label:`` (its
name in folder names and tables; default the plug-in name or the value) and ``set:`` (dotted keys
this value also sets, e.g. the estimator a random-feature kernel needs; they override the other
axes, and two cells left with the same configuration are an error asking for an ``exclude``).

Order: the base config <- ``set`` <- ``--set`` <- the axes. An axis is named by the last part of
its key (``kernel``) unless that is ambiguous; a cell by ``axis=label`` joined with ``__``, e.g.
``kernel=rbf__estimator=biased__seed=0``. Every cell is checked (keys, types, plug-in names and
parameters, data path, agreement with a folder it already has) before any cell runs.

Output folder: ``cells/<cell>/`` is a run folder (as ``perturbdiff run``); a cell with
``metrics.csv`` is done and skipped, one with a checkpoint resumes, so an interrupted grid
continues where it stopped. ``cells.csv`` holds every cell's aggregate metrics with its axis
labels; ``ablation.csv`` is the tidy summary (one column per axis but seed, then ``metric,
method, mean, std, n_seeds``); ``ablation.md`` the key metrics as a Markdown table (for a README);
``ablation.png`` draws them for the model.
"""

from .grid import (
    CELLS_DIR,
    DEFAULT_METRICS,
    GRID_KEYS,
    SEED,
    Axis,
    AxisValue,
    Cell,
    GridSpec,
    cell_dir,
    cell_name,
    check_plugins,
    read_grid,
)
from .runner import Job, cell_status, check_folder, check_folders, run_cell, run_folders, run_grid
from .summary import (
    CELLS_FILE,
    MARKDOWN_FILE,
    PLOT_FILE,
    SUMMARY_COLUMNS,
    TABLE_FILE,
    collect,
    key_metrics,
    markdown,
    mean_sd,
    overview,
    summarize,
    summarize_grid,
    write_plot,
)

__all__ = [
    "Axis",
    "AxisValue",
    "CELLS_DIR",
    "CELLS_FILE",
    "Cell",
    "DEFAULT_METRICS",
    "GRID_KEYS",
    "GridSpec",
    "Job",
    "MARKDOWN_FILE",
    "PLOT_FILE",
    "SEED",
    "SUMMARY_COLUMNS",
    "TABLE_FILE",
    "cell_dir",
    "cell_name",
    "cell_status",
    "check_folder",
    "check_folders",
    "check_plugins",
    "collect",
    "key_metrics",
    "markdown",
    "mean_sd",
    "overview",
    "read_grid",
    "run_cell",
    "run_folders",
    "run_grid",
    "summarize",
    "summarize_grid",
    "write_plot",
]
