"""``perturbdiff evaluate``: every metric of a prediction (and of baselines) against the real data.

Writes ``metrics.csv`` and, with ``--report``, ``report.html`` beside it. Baselines need the run
folder that made the prediction (``--run DIR``): they are fitted on its training conditions and
predict its held-out conditions, the same split as the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...configuration import parse_overrides
from ...errors import InputError
from ...io import atomic_path, check_output_file
from ...names import ALL_CONDITIONS, METRICS_FILE

if TYPE_CHECKING:  # the data stack is imported when the command runs, not for --help
    import anndata as ad
    import pandas as pd
    from rich.console import Console

    from ...data import DataConfig
    from ...runs.folder import SavedRun

_EPILOG = f"""\
metrics.csv is long format: condition, metric, method, value. A condition is a perturbation
(name@dose with --dose-key) in one context (its --cell-type-key and --context-key values),
compared with the control cells of that context: the labels of split.json. Rows with condition
'{ALL_CONDITIONS}' hold the mean over conditions (NaN skipped) and the metrics defined across
conditions (pearson_edistance, de_spearman_sig). Both files are log1p expression; REAL.h5ad may
be the whole screen: it is cut to the prediction's genes (in any order), its conditions and the
control cells of their contexts, so every gene and condition of PRED must be in it, and PRED
must hold its own control cells. Metric names follow cell-eval where the definitions match; see
perturbdiff_core.evaluation.DEFINITIONS.

Baselines (perturbdiff.predictors plug-ins: control, context_mean, context_fold, context_mixture, linear, random_train, ...)
are compared on the same conditions: with --run DIR they are fitted on the training
conditions of DIR/split.json (data from DIR/config.yaml and DIR/data_state.json) and predict
its test conditions, which PRED must hold. Without REAL.h5ad the run's real test cells
are read from its data. The run's data keys are the defaults of --perturbation-key,
--control-label, --cell-type-key, --context-key (its batch and covariate keys, less a
--replicate-key among them) and --dose-key, and its train_log.csv is the loss curve of --report.
Example:

  perturbdiff evaluate runs/x/predictions.h5ad --run runs/x \\
      --baselines control context_mean linear random_train --report --out runs/x/eval/metrics.csv
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
    parser.add_argument(
        "real", metavar="REAL.h5ad", nargs="?", default=None,
        help="real cells of the same conditions (with the control cells); default with --run: the run's test conditions",
    )
    parser.add_argument("--control-label", default=None, help="label of control cells (default: the run's, else control)")
    parser.add_argument("--perturbation-key", default=None, help="obs column of perturbations (default: the run's, else perturbation)")
    parser.add_argument("--cell-type-key", default=None, help="obs column of cell types; a condition is then (cell type, perturbation) (default: the run's)")
    parser.add_argument(
        "--context-key", action="append", default=None, metavar="KEY",
        help="further obs column of the context (batch, covariate): each condition is compared with its own context's "
        "control cells; repeatable (default: the run's batch and covariate keys)",
    )
    parser.add_argument("--dose-key", default=None, help="obs column of doses: each dose is its own condition, name@dose (default: the run's)")
    parser.add_argument(
        "--replicate-key", default=None, help="obs column of replicates (batch, donor) in the real data and of sampled populations in the prediction"
    )
    parser.add_argument("--method", default="model", help="name of the predictor in the method column (default: %(default)s)")
    parser.add_argument("--kernel", default="energy", help="perturbdiff.kernels plug-in for MMD (default: %(default)s)")
    parser.add_argument("--kernel-param", action="append", default=[], metavar="KEY=VALUE", help="kernel parameter, VALUE parsed as YAML; repeatable")
    parser.add_argument("--estimator", default="unbiased", help="perturbdiff.estimators plug-in for MMD (default: %(default)s)")
    parser.add_argument("--max-cells", type=int, default=1000, metavar="N", help="subsample populations to at most N cells for MMD (default: %(default)s)")
    parser.add_argument("--fdr", type=float, default=0.05, help="BH FDR threshold of DE genes (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsampling (default: %(default)s)")
    parser.add_argument("--out", default=METRICS_FILE, metavar=METRICS_FILE, help="output CSV (default: %(default)s)")
    parser.add_argument("--baselines", nargs="+", default=[], metavar="NAME", help="predictor plug-ins to compare with on the same split (needs --run)")
    parser.add_argument("--run", default=None, metavar="DIR", help="the run folder of the prediction: its data, split and training log")
    parser.add_argument("--report", action="store_true", help="also write report.html beside --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute the metrics, write the CSV (and report) atomically, print the aggregate table and notes."""
    from rich.console import Console

    from ...data.anndata_io import read_anndata
    from ...evaluation import compare
    from ...evaluation.real_subset import real_for
    from ...evaluation.verdict import verdict
    from ...mmd.etest import build_kernel
    from ...runs.folder import SavedRun

    if args.baselines and args.run is None:
        raise InputError(
            "--baselines needs --run DIR: baselines are fitted on that run's training conditions "
            "(DIR/config.yaml, DIR/split.json) and predict its test conditions."
        )
    if args.real is None and args.run is None:
        raise InputError(
            "Give REAL.h5ad (the real cells of the predicted conditions), or --run DIR to read them from the run's data."
        )
    check_output_file(args.out)  # a folder or an unwritable place fails now, not after the metrics
    folder = SavedRun.load(args.run) if args.run is not None else None
    keys = _keys(args, folder.data.config if folder is not None else None)
    pred: ad.AnnData | str = args.pred
    if args.real is None:
        real = folder.real()
    else:  # the whole screen will do: cut to the prediction's genes, conditions and their contexts' controls
        pred = read_anndata(args.pred)
        normalize = folder is not None and folder.data.config.normalize
        real = real_for(pred, read_anndata(args.real), **keys, normalize=normalize)
    predictions: dict[str, ad.AnnData | str] = {args.method: pred}
    for name in args.baselines:
        if name in predictions:
            raise InputError(
                f"Method name {name!r} is given twice; rename the model with --method or drop the duplicate."
            )
        predictions[name] = folder.predict(name, seed=args.seed)
    table = compare(
        predictions,
        real,
        **keys,
        replicate_key=args.replicate_key,
        kernel=build_kernel(args.kernel, parse_overrides(args.kernel_param, flag="--kernel-param")),
        kernel_name=args.kernel,
        estimator=args.estimator,
        max_cells=args.max_cells,
        fdr_threshold=args.fdr,
        seed=args.seed,
        progress=True,
    )
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    err = Console(stderr=True)
    if args.report:
        from ...evaluation.report import write_report  # matplotlib: imported only when drawing

        path = write_report(
            Path(args.out).parent,
            table,
            predictions=predictions,
            real=real,
            **keys,
            loss_history=folder.loss_history() if folder is not None else None,
            model=args.method,
            seed=args.seed,
            run_info=_facts(args, folder),
        )
        err.print(f"Wrote {path}", markup=False, highlight=False)
    for note in table.attrs.get("notes", []):
        err.print(f"perturbdiff: note: {note}", markup=False, highlight=False)
    out = Console()
    _print_summary(table, out)
    if len(predictions) > 1:
        for sentence in verdict(table, args.method):
            out.print(sentence.text, markup=False, highlight=False)
    n_conditions = table.loc[table.condition != ALL_CONDITIONS, "condition"].nunique()
    err.print(f"Wrote {len(table)} rows ({n_conditions} condition{'' if n_conditions == 1 else 's'}) to {args.out}", markup=False, highlight=False)
    return 0


def _facts(args: argparse.Namespace, folder: SavedRun | None) -> dict[str, str]:
    """The report's header: the run's facts when the prediction is the run's own ``predictions.h5ad``; else the
    predictions file first, with the run named as where the baselines and real cells come from."""
    given = {"predictions": f"{args.pred} (scored as {args.method})"}
    if folder is None:
        return given | {"real cells": str(args.real)}
    from ...runs.folder import RunDir

    if Path(args.pred).resolve() == RunDir(folder.path).predictions.resolve():
        return folder.facts()
    return given | {"baselines, split and real cells from": f"{folder.path} (its model made none of these predictions)"}


def _keys(args: argparse.Namespace, config: DataConfig | None) -> dict[str, Any]:
    """The obs keys of a condition: given on the command line, else the run's, else the defaults."""
    from ...data import DataConfig
    from ...evaluation.predictors import condition_keys

    keys = condition_keys(config if config is not None else DataConfig(), args.replicate_key)
    given = {
        "perturbation_key": args.perturbation_key, "control_label": args.control_label,
        "cell_type_key": args.cell_type_key, "context_keys": args.context_key, "dose_key": args.dose_key,
    }
    return keys | {key: value for key, value in given.items() if value is not None}


def _print_summary(table: pd.DataFrame, console: Console) -> None:
    """The aggregate row of every metric, one column per method, with the metric's best value."""
    from rich import box
    from rich.table import Table

    from ...evaluation import definition_of

    rows = table[table.condition == ALL_CONDITIONS]
    methods = list(rows.method.unique())
    wide = rows.pivot(index="metric", columns="method", values="value").loc[rows.metric.unique(), methods]
    shown = Table(title=f"Mean over conditions ({ALL_CONDITIONS})", title_justify="left", box=box.SIMPLE_HEAD)
    shown.add_column("metric", justify="left", no_wrap=True)
    for method in methods:
        shown.add_column(str(method), justify="right")
    shown.add_column("best", justify="right")
    for metric, values in wide.iterrows():
        definition = definition_of(str(metric))
        best = "" if definition is None or definition.best is None else f"{definition.best:g}"
        shown.add_row(str(metric), *(f"{v:.4g}" for v in values), best)
    console.print(shown)
