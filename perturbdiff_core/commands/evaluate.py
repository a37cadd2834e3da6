"""``perturbdiff evaluate``: every metric of a prediction against the real data, as ``metrics.csv``."""

from __future__ import annotations

import argparse

import pandas as pd
from rich import box
from rich.console import Console
from rich.table import Table

from ..evaluation import ALL_CONDITIONS, evaluate
from ..evaluation.definitions import DEFINITIONS
from ..io import atomic_path
from .etest import build_kernel, parse_params

_EPILOG = f"""\
metrics.csv is long format: condition, metric, method, value. Rows with condition
'{ALL_CONDITIONS}' hold the mean over conditions (NaN skipped) and the metrics defined across
conditions (pearson_edistance, de_spearman_sig). Both files are log1p expression on the same
genes (the prediction is reordered to the real gene order), hold the same conditions and the
control cells. Metric names follow cell-eval where the definitions match; see
perturbdiff_core.evaluation.DEFINITIONS.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics of predicted against real cells (pseudobulk, DE, discrimination, MMD)",
        description=(
            "Compare a predicted with a real AnnData per held-out condition and on average: "
            "pseudobulk, differential expression, perturbation discrimination, MMD and, with "
            "--replicate-key, population variability. Writes the table atomically."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pred", metavar="PRED.h5ad", help="predicted cells (with the control cells)")
    parser.add_argument("real", metavar="REAL.h5ad", help="real cells of the same conditions (with the control cells)")
    parser.add_argument("--control-label", default="control", help="label of control cells (default: %(default)s)")
    parser.add_argument("--perturbation-key", default="perturbation", help="obs column of perturbations (default: %(default)s)")
    parser.add_argument("--cell-type-key", default=None, help="obs column of cell types; a condition is then (cell type, perturbation)")
    parser.add_argument("--replicate-key", default=None, help="obs column of replicates (batch, donor) in the real data and of sampled populations in the prediction")
    parser.add_argument("--method", default="model", help="name of the predictor in the method column (default: %(default)s)")
    parser.add_argument("--kernel", default="energy", help="perturbdiff.kernels plug-in for MMD (default: %(default)s)")
    parser.add_argument("--kernel-param", action="append", default=[], metavar="KEY=VALUE", help="kernel parameter, VALUE parsed as YAML; repeatable")
    parser.add_argument("--estimator", default="unbiased", help="perturbdiff.estimators plug-in for MMD (default: %(default)s)")
    parser.add_argument("--max-cells", type=int, default=1000, metavar="N", help="subsample populations to at most N cells for MMD (default: %(default)s)")
    parser.add_argument("--fdr", type=float, default=0.05, help="BH FDR threshold of DE genes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsampling (default: %(default)s)")
    parser.add_argument("--out", default="metrics.csv", metavar="metrics.csv", help="output CSV (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute the metrics, write the CSV atomically, print the aggregate table and any notes."""
    table = evaluate(
        args.pred,
        args.real,
        perturbation_key=args.perturbation_key,
        control_label=args.control_label,
        cell_type_key=args.cell_type_key,
        replicate_key=args.replicate_key,
        method=args.method,
        kernel=build_kernel(args.kernel, parse_params(args.kernel_param, "--kernel-param")),
        kernel_name=args.kernel,
        estimator=args.estimator,
        max_cells=args.max_cells,
        fdr_threshold=args.fdr,
        seed=args.seed,
    )
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    err = Console(stderr=True)
    for note in table.attrs.get("notes", []):
        err.print(f"perturbdiff: note: {note}", markup=False, highlight=False)
    _print_summary(table, Console())
    n_conditions = table.loc[table.condition != ALL_CONDITIONS, "condition"].nunique()
    err.print(f"Wrote {len(table)} rows ({n_conditions} conditions) to {args.out}", markup=False, highlight=False)
    return 0


def _print_summary(table: pd.DataFrame, console: Console) -> None:
    """The aggregate row of every metric, with its best value."""
    shown = Table(title=f"Mean over conditions ({ALL_CONDITIONS})", title_justify="left", box=box.SIMPLE_HEAD)
    for column, justify in (("metric", "left"), ("method", "left"), ("value", "right"), ("best", "right")):
        shown.add_column(column, justify=justify)
    for row in table[table.condition == ALL_CONDITIONS].itertuples(index=False):
        definition = DEFINITIONS.get(row.metric) or DEFINITIONS.get(_template(row.metric))
        best = "" if definition is None or definition.best is None else f"{definition.best:g}"
        shown.add_row(row.metric, row.method, f"{row.value:.4g}", best)
    console.print(shown)


def _template(metric: str) -> str:
    """``mmd2_rbf`` -> ``mmd2_{kernel}``: the DEFINITIONS key of a kernel-named metric."""
    for key in DEFINITIONS:
        if "{kernel}" in key:
            head, tail = key.split("{kernel}")
            if metric.startswith(head) and metric.endswith(tail) and len(metric) > len(head) + len(tail):
                return key
    return metric
