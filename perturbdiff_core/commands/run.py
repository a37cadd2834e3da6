"""``perturbdiff run``: train, predict the held-out conditions, compare with the baselines, report."""

from __future__ import annotations

import argparse
import sys

import anndata as ad
import pandas as pd

from ..evaluation.compare import compare, summary_line
from ..evaluation.report import REPORT_FILE, write_report
from ..io import atomic_path
from ..model_predictor import DiffusionPredictor
from ..kernels import as_kernel
from ..predictors import Predictor, as_predictor, predict_anndata, real_anndata
from ..run_config import RunConfig
from ..training import Trainer
from .predict import PREDICTIONS_FILE, write_predictions
from .train import EPILOG as TRAIN_EPILOG
from .train import add_run_arguments, config_of, fit, start

#: Metrics table written into the run folder, and the model's name in it.
METRICS_FILE = "metrics.csv"
MODEL = "model"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``perturbdiff run``."""
    parser = subparsers.add_parser(
        "run",
        help="train, predict the test conditions, evaluate against baselines, write report.html",
        description=(
            f"Train the model of a config (as perturbdiff train), predict the split's test conditions "
            f"({PREDICTIONS_FILE}), predict them with every evaluate.baselines predictor, and write "
            f"{METRICS_FILE} and {REPORT_FILE} into the run folder."
        ),
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser)
    parser.set_defaults(func=run)


def evaluation_plugins(config: RunConfig) -> dict[str, Predictor]:
    """The baselines (and a check of the evaluation kernel), built before training so a typo fails at once."""
    as_kernel(config.evaluate.kernel)
    return {name: as_predictor(name) for name in config.evaluate.baselines}


def predict_all(
    trainer: Trainer, baselines: dict[str, Predictor] | None = None
) -> tuple[dict[str, ad.AnnData], ad.AnnData]:
    """Predictions of the test conditions by the model and every baseline (default: ``evaluate.baselines``), and the real cells."""
    config, data, test = trainer.config, trainer.data, trainer.split.test
    baselines = evaluation_plugins(config) if baselines is None else baselines
    n_cells, seed = config.sample.n_cells, config.seed
    model = DiffusionPredictor(trainer.model, config.sample, device=trainer.device)
    predictions = {MODEL: predict_anndata(model, data, test, n_cells=n_cells, seed=seed, progress=trainer.progress)}
    write_predictions(predictions[MODEL], trainer.run_dir / PREDICTIONS_FILE)
    for name, baseline in baselines.items():
        baseline.fit(data, trainer.split.train)
        predictions[name] = predict_anndata(baseline, data, test, n_cells=n_cells, seed=seed, progress=False)
    return predictions, real_anndata(data, test)


def evaluate_run(trainer: Trainer, predictions: dict[str, ad.AnnData], real: ad.AnnData) -> pd.DataFrame:
    """``metrics.csv`` and ``report.html`` of the run (the evaluation helpers' two calls)."""
    config = trainer.config
    keys = {
        "perturbation_key": config.data.perturbation_key,
        "control_label": config.data.control_label,
        "cell_type_key": config.data.cell_type_key,
    }
    metrics = compare(
        predictions, real, **keys, kernel=config.evaluate.kernel, max_cells=config.evaluate.max_cells, seed=config.seed
    )
    with atomic_path(trainer.run_dir / METRICS_FILE) as tmp:
        metrics.to_csv(tmp, index=False)
    write_report(
        trainer.run_dir, metrics, predictions=predictions, real=real, **keys,
        loss_history=trainer.log(), title=f"perturbdiff run {config.name or trainer.run_dir.name}", model=MODEL,
        seed=config.seed,
    )
    return metrics


def run(args: argparse.Namespace) -> int:
    """Train (or resume), predict, evaluate; print the verdict against the best baseline."""
    config = config_of(args)
    baselines = evaluation_plugins(config)
    trainer = start(args, config)
    if status := fit(trainer, "run"):
        return status
    predictions, real = predict_all(trainer, baselines)
    metrics = evaluate_run(trainer, predictions, real)
    for note in metrics.attrs.get("notes", []):
        print(f"perturbdiff: note: {note}", file=sys.stderr)
    print(summary_line(metrics, MODEL))
    print(f"Wrote {PREDICTIONS_FILE}, {METRICS_FILE} and {REPORT_FILE} to {trainer.run_dir}", file=sys.stderr)
    return 0
