"""``perturbdiff run``: train, predict the held-out conditions, compare with the baselines, report."""

from __future__ import annotations

import argparse
import signal
import sys

from ...errors import exit_status
from ...names import METRICS_FILE, MODEL, PREDICTIONS_FILE, REPORT_FILE
from .train import EPILOG as TRAIN_EPILOG
from .train import add_run_arguments, config_of, fit, started


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


def run(args: argparse.Namespace) -> int:
    """Train (or resume), predict, evaluate; print the verdict against the best baseline."""
    from ...evaluation.verdict import verdict
    from ...runs.folder import RunDir
    from ...runs.pipeline import evaluate_run, evaluation_plugins, predict_all

    config = config_of(args)
    baselines = evaluation_plugins(config)
    with started(args, config) as trainer:
        if status := fit(trainer, "run"):
            return status
        try:
            predictions, real = predict_all(trainer, baselines)
            metrics = evaluate_run(trainer, predictions, real)
        except KeyboardInterrupt as stop:  # training is saved whole: only prediction and evaluation are left
            verb = "terminated" if exit_status(stop) == 128 + signal.SIGTERM else "interrupted"
            print(f"perturbdiff: {verb} after training finished; predict and evaluate with: perturbdiff run "
                  f"{RunDir(trainer.run_dir).config} --out {trainer.run_dir} --resume", file=sys.stderr)
            return exit_status(stop)
    for note in metrics.attrs.get("notes", []):
        print(f"perturbdiff: note: {note}", file=sys.stderr)
    print("\n".join(sentence.text for sentence in verdict(metrics, MODEL)))
    print(f"Wrote {PREDICTIONS_FILE}, {METRICS_FILE} and {REPORT_FILE} to {trainer.run_dir}", file=sys.stderr)
    return 0
