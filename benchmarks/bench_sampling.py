"""Sample quality and time against the number of sampling steps (DDIM with eta 0, DDPM), on a trained run.

Each row predicts the run's held-out (test) conditions with one sampler and number of steps, from
the same seed (same control sets and initial noise), and is scored against the real held-out
cells by :func:`perturbdiff_core.evaluation.compare` (the ``__all__`` mean over conditions):
``mmd2_energy`` (MMD^2 under the energy kernel, unbiased: the energy distance), ``pearson_delta``
and ``mse``. Time is the wall time of ``predict_anndata`` for all test conditions (median of
``--repeats``, after one warm-up sample); cells/s is the predicted cells kept (a condition's last
set is cut to the condition's size) over that time. The run's baselines are scored too,
as a reference for the scale of each metric.

Run on a trained run folder (``perturbdiff run CONFIG --out DIR``)::

    OMP_NUM_THREADS=1 python benchmarks/bench_sampling.py --run runs/kang18_holdout_celltype --output benchmarks/SAMPLING_RESULTS.md

Without ``--run`` it first trains a tiny model on a synthetic screen (``--train-steps`` steps), so
it runs stand-alone; that model is far from converged, so its rows are for timing and checking the
script, not for the quality trend. ``--quick`` is a sanity check (few rows, 20 training steps when
there is no run).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model import header
from cases import DEVICE

from perturbdiff_core.data import PerturbationData
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.diffusion.model import RKHSDiffusion
from perturbdiff_core.errors import PerturbDiffError
from perturbdiff_core.evaluation import aggregate, compare
from perturbdiff_core.evaluation.predictors import Predictor, as_predictor, predict_anndata, real_anndata
from perturbdiff_core.io import atomic_write_text
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint
from perturbdiff_core.runs.config import RunConfig, SampleConfig, config_from_dict
from perturbdiff_core.runs.model_predictor import DiffusionPredictor
from perturbdiff_core.runs.prediction import checkpoint_predictor, open_data, training_data
from perturbdiff_core.runs.training import Trainer

DDIM_STEPS = (5, 10, 20, 50, 100, 250)
DDPM_STEPS = (50, 250, 1000)
QUICK_DDIM_STEPS = (5, 10)
QUICK_DDPM_STEPS = (10,)
#: Kernel of the distribution metric; the metrics reported, as named in the ``compare`` table.
KERNEL = "energy"
METRICS = (f"mmd2_{KERNEL}", "pearson_delta", "mse")

#: The stand-alone run: a tiny denoiser on a synthetic screen, holding out cell type t3.
SYNTHETIC_RUN = {
    "name": "synthetic",
    "data": {"cell_type_key": "cell_type", "set_size": 64},
    "split": {"kind": "holdout_cell_type", "holdout": ["t3"], "val_fraction": 0.0},
    "model": {"denoiser_params": {"size": "tiny"}, "ema_decay": 0.99},
    "train": {"lr": 1e-3, "warmup_steps": 20, "context_drop_prob": 0.2, "val_every": 0, "log_every": 10},
    "evaluate": {"baselines": ["control", "context_mean"], "max_cells": 500},
}
SYNTHETIC_SCREEN = {"n_cells": 1800, "n_genes": 200, "cell_types": ("t1", "t2", "t3")}


@dataclass
class Trained:
    """A trained model with its data, its run configuration, the conditions to predict, where it came from and
    its predictor for a sampling configuration: the run's, with every rule it resolved (anchor, ensemble, ...),
    so each row times and scores what ``perturbdiff predict`` would give with that sampler."""

    model: RKHSDiffusion
    data: PerturbationData
    config: RunConfig
    test: list[str]
    train: list[str]
    source: str
    predictor: Callable[[SampleConfig], DiffusionPredictor]


def from_run(run_dir: Path) -> Trained:
    """The last checkpoint of a run folder, its data (the run's file) and its test conditions."""
    checkpoint = load_checkpoint(checkpoint_path(run_dir))
    config = checkpoint.run_config
    data = open_data(checkpoint, None)
    test = [data.condition(c) for c in checkpoint.split.test]
    train_data = functools.cache(lambda: training_data(checkpoint, data))

    def predictor(sample: SampleConfig) -> DiffusionPredictor:
        return checkpoint_predictor(checkpoint, DEVICE, train_data, test, data, sample)

    return Trained(
        checkpoint.build_model(DEVICE),
        data,
        config,
        list(checkpoint.split.test),
        list(checkpoint.split.train),
        f"run `{run_dir}` (checkpoint at step {checkpoint.step} of {config.train.steps}, data `{config.data.path}`)",
        predictor,
    )


def train_synthetic(steps: int, folder: Path) -> Trained:
    """A tiny model trained for ``steps`` steps on :data:`SYNTHETIC_SCREEN` (:data:`SYNTHETIC_RUN`)."""
    values = {**SYNTHETIC_RUN, "train": {**SYNTHETIC_RUN["train"], "steps": steps, "device": str(DEVICE)}}
    trainer = Trainer(config_from_dict(values), folder, source=synthetic_screen(**SYNTHETIC_SCREEN), progress=False)
    trainer.fit()
    return Trained(
        trainer.model,
        trainer.data,
        trainer.config,
        list(trainer.split.test),
        list(trainer.split.train),
        f"tiny CrossDiT trained here for {steps} steps on `synthetic_screen({SYNTHETIC_SCREEN})`, "
        f"config {values}",
        trainer.predictor,
    )


@dataclass(frozen=True)
class Sampler:
    """One row: a sampler (``ddim`` with eta 0, or ``ddpm``) and its number of network calls."""

    name: str
    steps: int

    @property
    def label(self) -> str:
        """``ddim-50``: the row's name in the ``compare`` table."""
        return f"{self.name}-{self.steps}"


def predict(trained: Trained, predictor: Predictor, seed: int) -> ad.AnnData:
    """``predictor``'s cells of the test conditions (and their contexts' real controls)."""
    return predict_anndata(
        predictor, trained.data, trained.test, n_cells=trained.config.sample.n_cells, seed=seed, progress=False
    )


def timed_prediction(trained: Trained, sampler: Sampler, seed: int, repeats: int) -> tuple[ad.AnnData, float]:
    """The prediction of ``sampler`` and the median seconds of ``repeats`` identical predictions."""
    sample = replace(trained.config.sample, sampler=sampler.name, steps=sampler.steps, eta=0.0)
    predictor = trained.predictor(sample)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        adata = predict(trained, predictor, seed)
        times.append(time.perf_counter() - start)
    return adata, statistics.median(times)


def quality(trained: Trained, predictions: dict[str, ad.AnnData], seed: int) -> dict[str, dict[str, float]]:
    """``{row label: {metric: value}}``, the ``__all__`` values of :data:`METRICS` from one ``compare`` call."""
    cfg = trained.config
    table = compare(
        predictions,
        real_anndata(trained.data, trained.test),
        perturbation_key=cfg.data.perturbation_key,
        control_label=cfg.data.control_label,
        cell_type_key=cfg.data.cell_type_key,
        kernel=KERNEL,
        max_cells=cfg.evaluate.max_cells,
        seed=seed,
    )
    wide = aggregate(table)
    return {label: {m: float(wide.loc[m, label]) for m in METRICS} for label in predictions}


def samplers(ddim: Sequence[int], ddpm: Sequence[int], total: int) -> tuple[list[Sampler], list[int]]:
    """The rows to run (at most ``total`` steps, the schedule's length) and the step counts left out."""
    wanted = [Sampler("ddim", n) for n in ddim] + [Sampler("ddpm", n) for n in ddpm]
    return [s for s in wanted if s.steps <= total], sorted({s.steps for s in wanted if s.steps > total})


def describe(trained: Trained, args: argparse.Namespace, argv: list[str] | None, left_out: list[int]) -> list[str]:
    """Markdown bullets: the machine and command, the model, what is predicted and how it is scored and timed."""
    conditions = [trained.data.condition(c) for c in trained.test]
    cfg = trained.config
    lines = [
        *header("bench_sampling.py", argv),
        f"- model: {trained.source}",
        f"- predicted: {', '.join(c.label for c in conditions)} ({predicted_cells(trained)} cells in sets of "
        f"{trained.data.config.set_size}, {trained.data.n_genes} genes, up to {cfg.sample.chunk_sets} sets at once), "
        f"seed {seed_of(trained, args)} for every row; schedule of T = {trained.model.schedule.num_steps} steps",
        f"- quality: `compare` against the real held-out cells, mean over the conditions; `{METRICS[0]}` with "
        f"at most {cfg.evaluate.max_cells} cells per population",
        f"- time: median of {args.repeats} prediction(s) of all test conditions after one warm-up sample",
    ]
    if left_out:
        lines.append(f"- left out: {left_out} steps (more than the schedule's T = {trained.model.schedule.num_steps})")
    return lines


def seed_of(trained: Trained, args: argparse.Namespace) -> int:
    """``--seed``, or the run's seed."""
    return trained.config.seed if args.seed is None else args.seed


def predicted_cells(trained: Trained) -> int:
    """Cells predicted over the test conditions (each as many as it has, or ``sample.n_cells``)."""
    n_cells = trained.config.sample.n_cells
    return sum(trained.data.condition(c).n_cells if n_cells is None else n_cells for c in trained.test)


def report(trained: Trained, args: argparse.Namespace, argv: list[str] | None) -> list[str]:
    """Time and score every row, score the baselines; the report's markdown lines (times go to stderr as they come)."""
    seed = seed_of(trained, args)
    rows, left_out = samplers(args.ddim_steps, args.ddpm_steps, trained.model.schedule.num_steps)
    lines = ["# Sample quality and speed against the number of sampling steps", "", *describe(trained, args, argv, left_out)]
    names = trained.config.evaluate.baselines if args.baselines is None else args.baselines
    baselines = {name: as_predictor(name) for name in names}  # a misspelt name fails before any sampling
    warm_up = replace(trained.config.sample, steps=1)
    trained.predictor(warm_up).predict(trained.data, trained.data.condition(trained.test[0]), 1, seed)
    predictions, seconds = {}, {}
    for sampler in rows:
        predictions[sampler.label], seconds[sampler.label] = timed_prediction(trained, sampler, seed, args.repeats)
        print(f"{sampler.label}: {seconds[sampler.label]:.2f} s", file=sys.stderr, flush=True)
    for name, baseline in baselines.items():
        predictions[name] = predict(trained, baseline.fit(trained.data, trained.train), seed)
    scores = quality(trained, predictions, seed)

    def values(label: str) -> str:
        return " | ".join(f"{scores[label][m]:.4g}" for m in METRICS)

    lines += ["", f"| sampler | steps | s | cells/s | {' | '.join(METRICS)} |", "|---|---:|---:|---:|" + "---:|" * len(METRICS)]
    cells = predicted_cells(trained)
    lines += [f"| {r.name} | {r.steps} | {seconds[r.label]:.2f} | {cells / seconds[r.label]:.0f} | {values(r.label)} |" for r in rows]
    lines += [f"| baseline `{name}` (reference) | | | | {values(name)} |" for name in baselines]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, metavar="DIR", help="trained run folder (default: train a tiny synthetic model first)")
    parser.add_argument("--ddim-steps", type=int, nargs="*", default=None, help=f"DDIM (eta 0) rows (default {DDIM_STEPS})")
    parser.add_argument("--ddpm-steps", type=int, nargs="*", default=None, help=f"DDPM rows (default {DDPM_STEPS})")
    parser.add_argument("--baselines", nargs="*", default=None, help="reference baselines (default: the run's evaluate.baselines)")
    parser.add_argument("--seed", type=int, default=None, help="sampling and evaluation seed (default: the run's seed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed predictions per row (median)")
    parser.add_argument("--train-steps", type=int, default=200, help="training steps of the stand-alone synthetic model")
    parser.add_argument("--quick", action="store_true", help=f"sanity check: DDIM {QUICK_DDIM_STEPS}, DDPM {QUICK_DDPM_STEPS}, 20 training steps")
    parser.add_argument("--output", type=Path, default=None, help="also write the table (markdown) here, atomically")
    args = parser.parse_args(argv)
    args.ddim_steps = args.ddim_steps if args.ddim_steps is not None else (QUICK_DDIM_STEPS if args.quick else DDIM_STEPS)
    args.ddpm_steps = args.ddpm_steps if args.ddpm_steps is not None else (QUICK_DDPM_STEPS if args.quick else DDPM_STEPS)
    if min([args.repeats, args.train_steps, *args.ddim_steps, *args.ddpm_steps]) < 1:
        parser.error("--repeats, --train-steps, --ddim-steps and --ddpm-steps take positive integers")
    try:
        with tempfile.TemporaryDirectory() as folder:
            trained = from_run(args.run) if args.run else train_synthetic(20 if args.quick else args.train_steps, Path(folder))
            lines = report(trained, args, argv)
    except PerturbDiffError as err:  # a missing run, data file or baseline: one line, no traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print("\n".join(lines))
    if args.output is not None:
        atomic_write_text(args.output, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
