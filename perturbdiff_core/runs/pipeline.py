"""The run pipeline after training: predict the test conditions with the model and the baselines,
compare them, write ``predictions.h5ad``, ``metrics.csv`` and ``report.html``.

Shared by ``perturbdiff run`` and ``perturbdiff ablate`` so the command layer stays thin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd

from ..evaluation.compare import compare
from ..evaluation.predictors import (
    Predictor,
    as_predictor,
    condition_keys,
    first_population,
    predict_anndata,
    real_anndata,
)
from ..evaluation.report import write_report
from ..io import atomic_path
from ..mmd.kernels import as_kernel
from ..names import METRICS_FILE as METRICS_FILE
from ..names import MODEL, REPORT_FILE
from ..names import PREDICTIONS_FILE as PREDICTIONS_FILE
from ..progress import stage
from ..threads import apply_threads
from .config import RunConfig
from .folder import RunDir
from .provenance import run_facts
from .summary import resolved_predictors
from .training import Trainer


def write_predictions(adata: ad.AnnData, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def evaluation_plugins(config: RunConfig) -> dict[str, Predictor]:
    """The baselines (and a check of the evaluation kernel), built before training so a typo fails at once."""
    as_kernel(config.evaluate.kernel)
    return {name: as_predictor(name) for name in config.evaluate.baselines}


def predict_all(
    trainer: Trainer, baselines: dict[str, Predictor] | None = None
) -> tuple[dict[str, ad.AnnData], ad.AnnData]:
    """Predictions of the test conditions by the model (``sample.populations`` of them per condition; the
    first is written to ``predictions.h5ad``) and every baseline (default: ``evaluate.baselines``), and the real cells."""
    config, data, test = trainer.config, trainer.data, trainer.split.test
    apply_threads(trainer.threads)
    baselines = evaluation_plugins(config) if baselines is None else baselines
    n_cells, seed = config.sample.n_cells, config.seed
    predictions = {
        MODEL: predict_anndata(
            trainer.predictor(), data, test, n_cells=n_cells, seed=seed, populations=config.sample.populations,
            population_conditions=config.sample.population_conditions, progress=trainer.progress,
        )
    }
    write_predictions(first_population(predictions[MODEL]), RunDir(trainer.run_dir).predictions)
    for name, baseline in baselines.items():
        baseline.fit(data, trainer.split.train)
        predictions[name] = predict_anndata(baseline, data, test, n_cells=n_cells, seed=seed, progress=trainer.progress)
    return predictions, real_anndata(data, test)


def evaluate_run(trainer: Trainer, predictions: dict[str, ad.AnnData], real: ad.AnnData) -> pd.DataFrame:
    """``metrics.csv`` and ``report.html`` of the run (the evaluation helpers' two calls)."""
    config = trainer.config
    apply_threads(trainer.threads)
    keys = condition_keys(config.data)
    metrics = compare(
        predictions, real, **keys, kernel=config.evaluate.kernel, max_cells=config.evaluate.max_cells, seed=config.seed,
        progress=trainer.progress,
    )
    with atomic_path(RunDir(trainer.run_dir).metrics) as tmp:
        metrics.to_csv(tmp, index=False)
    with stage(f"writing {REPORT_FILE}", disable=not trainer.progress):
        _report(trainer, metrics, predictions, real, keys)
    return metrics


def _report(
    trainer: Trainer, metrics: pd.DataFrame, predictions: dict[str, ad.AnnData], real: ad.AnnData, keys: dict[str, Any]
) -> None:
    """``report.html`` of the run."""
    config = trainer.config
    write_report(
        trainer.run_dir, metrics, predictions=predictions, real=real, **keys,
        loss_history=trainer.log(), title=f"perturbdiff run {config.name or trainer.run_dir.name}", model=MODEL,
        seed=config.seed, run_info=run_facts(config, test=trainer.split.test, steps=trainer.step) | resolved_predictors(trainer),
    )
