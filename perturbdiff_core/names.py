"""The names perturbdiff gives to what it writes: files and folders of a run, a grid and a suite,
and the special values of its tables.

They live in this import-free module so the command line can put them in its help without
importing torch, pandas or AnnData (``perturbdiff --help`` stays well under a second), and so
the docs can list a run folder's files from one place. The modules that write the files
re-export the names they use.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- run folder

#: Folder of run folders when ``--out`` is not given: ``runs/<config name>``.
RUNS_DIR = "runs"
#: The resolved configuration of a run: repeat the run from this file alone.
CONFIG_FILE = "config.yaml"
#: The distribution and version of every plug-in a run names, beside its config.
PLUGINS_FILE = "plugins.yaml"
#: The split of the run: training, validation and test conditions.
SPLIT_FILE = "split.json"
#: What the data preparation learnt: genes, vocabularies, perturbation encoder.
STATE_FILE = "data_state.json"
#: Folder of the checkpoints, the latest checkpoint and the one before it (the fallback).
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
PREVIOUS_CHECKPOINT = "previous.pt"
#: The lock a run holds on its folder (names its process); removed when the run ends.
LOCK_FILE = ".perturbdiff.lock"
#: Per-step training log (mean losses per ``train.log_every`` steps, validation MMD).
LOG_FILE = "train_log.csv"
#: Predicted cells of the test conditions (cell-eval's layout: predicted cells plus real controls).
PREDICTIONS_FILE = "predictions.h5ad"
#: Metrics of the model and the baselines, long format.
METRICS_FILE = "metrics.csv"
#: The self-contained HTML report.
REPORT_FILE = "report.html"
#: What ``train.init_from`` loaded: genes and vocabularies shared, added and dropped.
TRANSFER_FILE = "transfer.json"
#: Stem of the files ``perturbdiff predict`` writes into a run folder: ``predictions_1.h5ad``, ...
NEW_PREDICTIONS = "predictions"

# ------------------------------------------------------------------------- tables and obs

#: The model's name in the ``method`` column of ``metrics.csv``.
MODEL = "model"
#: The ``condition`` of the aggregate rows (means over conditions) of ``metrics.csv``.
ALL_CONDITIONS = "__all__"
#: obs column of a prediction with several independently sampled populations per condition.
POPULATION_KEY = "population"

# ----------------------------------------------------------------------- ablation grids

#: Folder of the run folders of a grid's cells.
CELLS_DIR = "cells"
#: Every cell's aggregate metrics, the summary over seeds, its Markdown table and its plot.
CELLS_FILE = "cells.csv"
ABLATION_TABLE_FILE = "ablation.csv"
ABLATION_MARKDOWN_FILE = "ablation.md"
ABLATION_PLOT_FILE = "ablation.png"

# ------------------------------------------------------------------------------ suites

#: Folder of the run folders of a suite's tasks.
TASKS_DIR = "tasks"
#: Every metric of every run, the summary against the best baseline, its Markdown and its plot.
SUITE_FILE = "suite.csv"
SUITE_SUMMARY_FILE = "suite_summary.csv"
SUITE_MARKDOWN_FILE = "suite.md"
SUITE_PLOT_FILE = "suite.png"
