"""Training an :class:`~perturbdiff_core.diffusion.model.RKHSDiffusion` on a run configuration, resumable exactly.

The training stream is a pure function of ``(seed, step)``: the sets of step ``k`` are the
positions ``k B .. k B + B - 1`` of a sequence of epochs, each a permutation of the training
conditions seeded by ``(seed, epoch)`` (the order of :class:`~perturbdiff_core.data.EpochSampler`),
and each set is drawn from ``(seed, epoch, index)`` (:class:`~perturbdiff_core.data.ConditionSets`);
the time steps, noise, condition dropout and self-conditioning coin of step ``k`` come from a
generator seeded by ``(seed, k)``. A resumed run (weights, EMA, optimizer, scheduler and step
restored from a checkpoint) therefore computes the same losses and weights as an uninterrupted
one, for any number of DataLoader workers.

Optimisation: AdamW, learning rate rising linearly for ``warmup_steps`` then decaying to 0 on a
half cosine (Loshchilov & Hutter 2017), global gradient-norm clipping, EMA update after every step.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from ..data import ConditionSets, EpochSampler, PerturbationData, Split, collate_sets, load_prepared, make_loader, prepare
from ..data.batch import SetBatch
from ..data.loader import seed_worker
from ..data.sources import data_path_name
from ..diffusion.model import RKHSDiffusion
from ..errors import STOP_SIGNALS, ConfigError, Interrupted, NonFiniteError, PerturbDiffError
from ..io import atomic_path
from ..progress import progress_bar, stage
from ..registry import PluginSpec, accepts
from ..threads import apply_threads, resolve_threads
from . import distributed
from .anchor import AUTO_ANCHOR, NO_ANCHOR, PredictorChoice, anchor_shifts, fit_anchor, resolve_anchor
from .ceiling import training_ceiling
from .checkpoint import Checkpoint, checkpoint_path, has_checkpoint, load_run_checkpoint, previous_path, save_checkpoint
from .config import ModelConfig, RunConfig, SampleConfig, TrainConfig, differences, plugin_spec, write_config
from .control_noise import ControlShrinkage
from .ensemble import fit_ensemble
from .folder import RunDir
from .levels import ControlLevels, resolve_control_levels
from .model_predictor import DiffusionPredictor
from .pretraining import marginal_batch, prepare_marginal
from .shrinkage import ShiftShrinkage
from .summary import run_summary
from .transfer import TransferReport, gene_config, load_init, transfer_weights
from .unseen import UnseenContextChange, resolve_unseen_context_change

#: Per-step training log written beside the checkpoints (and plotted by the report).
LOG_COLUMNS = ("step", "loss", "mse", "mmd", "lr", "val_mmd")

#: Configuration keys that define the training stream: a resumed run must keep them.
#: (``data.path`` may change, e.g. when the data moved; the genes come from the checkpoint.)
FIXED_ON_RESUME = ("seed", "data.", "split.", "model.", "train.batch_size", "train.lr", "train.weight_decay",
                   "train.warmup_steps", "train.grad_clip", "train.context_drop_prob", "train.objective",
                   "train.init_from", "train.init_genes")


class TrainingInterrupted(Interrupted):
    """Ctrl-C or SIGTERM during training: a checkpoint of the last completed step was saved first."""

    def __init__(self, step: int, path: Path, signum: int = signal.SIGINT) -> None:
        verb = "terminated" if signum == signal.SIGTERM else "interrupted"
        super().__init__(signum, f"{verb} at step {step}; checkpoint saved to {path}")
        self.step, self.path = step, path


def drop_context(batch: SetBatch, prob: float, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> SetBatch:
    """``batch`` with each set's cell type and, independently, batch index set to 0 (``<unknown>``) with probability ``prob``.

    Index 0 is what a held-out cell type or batch gets at prediction time; training on it
    teaches the model to predict such contexts from their control cells alone. ``shard = (k, n)``:
    the batch is part ``k`` of ``n`` of a global batch, whose draws are sliced (as in ``RKHSDiffusion.loss``).
    """
    cond = batch.cond
    b, (k, n) = cond.cell_type.shape[0], shard
    drop = torch.rand((2, b * n), generator=generator, device=cond.cell_type.device)[:, k * b:(k + 1) * b] < prob
    cond = replace(cond, cell_type=cond.cell_type.masked_fill(drop[0], 0), batch=cond.batch.masked_fill(drop[1], 0))
    return replace(batch, cond=cond)


#: ``train.context_drop_prob: auto`` where the test conditions hold a cell type or batch training lacks.
AUTO_CONTEXT_DROP_PROB = 0.2


def resolve_context_drop(prob: float | str, data: PerturbationData, test: Sequence[str]) -> float:
    """``train.context_drop_prob`` as a number. ``auto`` trains the ``<unknown>`` context only when the
    test conditions need it (:data:`AUTO_CONTEXT_DROP_PROB` where one has a cell type or batch that
    training lacks), since otherwise each dropped set just loses its context: on norman19's held-out
    K562 combinations, 0.2 instead of 0 won 4 instead of 5 of 23 suite pairs (docs/defaults.md)."""
    if prob != "auto":
        return float(prob)
    return AUTO_CONTEXT_DROP_PROB if data.unseen_contexts(test) else 0.0


def resolve_device(name: str, *, option: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as torch spells it, checked to exist here.

    ``option`` names the setting in the error (``--device`` for ``perturbdiff predict``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{option} = {name!r} is not a torch device ({err}); use auto, cpu or cuda.") from None
    problem = _unavailable(device)
    if problem:
        raise ConfigError(f"{option} = {name!r}, but {problem}; use {option}=auto (the GPU when there is one) or cpu.")
    return device


def _unavailable(device: torch.device) -> str | None:
    """Why ``device`` cannot hold tensors in this process, or None (CPU always can)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this torch is a CPU-only build" if torch.version.cuda is None else "torch finds no CUDA GPU here"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "torch finds no Apple MPS device here"
    elif device.type == "meta":
        return "the meta device holds no values to train or sample with"
    return None


def build_model(
    config: ModelConfig, data: PerturbationData, control_levels: str | None = None, anchor: str | None = None
) -> RKHSDiffusion:
    """A fresh model whose denoiser is sized for ``data`` (genes, perturbation encoding, vocabularies);
    ``control_levels`` and ``anchor``, when given, replace the config's (``auto`` resolved by
    :func:`~.levels.resolve_control_levels` and :func:`~.anchor.resolve_anchor`)."""
    sizes = {
        "num_genes": data.n_genes,
        "perturbation_dim": max(1, data.encoder.dim),  # a marginal model's one-hot encoder is empty; it gets zeros
        "num_cell_types": len(data.vocabularies["cell_type"]),
        "num_batches": len(data.vocabularies["batch"]),
    }
    return _model(config, sizes, control_levels, anchor)


DENOISERS = "perturbdiff.denoisers"

#: Data sizes a model is built with before the data are read, only to check its plug-ins (:func:`check_plugins`).
PLACEHOLDER_SIZES = {"num_genes": 8, "perturbation_dim": 2, "num_cell_types": 2, "num_batches": 2}


def check_plugins(config: RunConfig) -> None:
    """Build every plug-in a run names (the model at placeholder data sizes, the perturbation encoder),
    so a misspelt name or a bad parameter fails in a second, before the data are read."""
    _model(config.model, PLACEHOLDER_SIZES, "centred", NO_ANCHOR)  # the auto values are resolved once the data are read
    plugin_spec(config.data, "encoder").build("perturbdiff.encoders")


def _model(
    config: ModelConfig, sizes: dict[str, int], control_levels: str | None = None, anchor: str | None = None
) -> RKHSDiffusion:
    """The model of ``config`` with a denoiser of the given data sizes; ``control_levels`` and ``anchor``,
    when given, replace the config's (``auto`` resolved)."""
    reserved = {*sizes, "name", "templates"} & set(config.denoiser_params)
    if reserved:
        raise ConfigError(
            f"model.denoiser_params sets {', '.join(sorted(reserved))}, which come from the data or the model; remove them."
        )
    levels = control_levels or config.control_levels
    if levels == "auto":
        raise ConfigError(
            "model.control_levels: auto depends on the data and the split; resolve it first with "
            "perturbdiff_core.runs.levels.resolve_control_levels and pass the result as control_levels."
        )
    # per-cell origins: a denoiser that can read each target cell's control cell is told to
    templates = {"templates": True} if config.origin == "cell" and accepts(DENOISERS, config.denoiser, "templates") else {}
    denoiser = PluginSpec(config.denoiser, {**sizes, **config.denoiser_params, **templates})
    return RKHSDiffusion(
        denoiser,
        plugin_spec(config, "schedule"),
        kernel=plugin_spec(config, "kernel"),
        estimator=plugin_spec(config, "estimator"),
        mmd_weight=config.mmd_weight,
        prediction=config.prediction,
        self_condition_prob=config.self_condition_prob,
        cond_drop_prob=config.cond_drop_prob,
        ema_decay=config.ema_decay,
        relative_to_control=(anchor or config.anchor_name) != NO_ANCHOR or config.origin == "cell",
        origin=config.origin,
        control_levels=levels,
    )


#: Training sets drawn to estimate the per-gene data scale of the ``edm`` preconditioning.
DATA_SCALE_SETS = 64


def fit_data_scale(model: RKHSDiffusion, sets: ConditionSets, device: torch.device) -> None:
    """Set ``model``'s per-gene data mean and scale from :data:`DATA_SCALE_SETS` training sets (the
    first epoch's draws, so the same on every rank and on a rerun), in the frame it diffuses."""
    items = [sets[(0, i % len(sets))] for i in range(DATA_SCALE_SETS)]
    batch = collate_sets(items).to(device)
    model.fit_data_scale(model.frame(batch.target.to(model.data_mean.dtype), batch.cond))


#: Devices where torch's fused AdamW kernel runs (one pass over all weights instead of a loop of per-tensor ops).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` with the run's learning rate and weight decay; fused where torch has the
    kernel for every parameter."""
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    r"""Learning-rate multiplier of step ``step`` (0-based): :math:`(k+1)/w` during warm-up, then
    :math:`\tfrac12(1 + \cos(\pi p))` with :math:`p = (k - w) / (K - w)` the progress after warm-up."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int) -> int:
    """The 64-bit seed of the random draws of training step ``step`` (NumPy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0])


class StepBatches(Sampler[list[tuple[int, int]]]):
    """``(epoch, index)`` keys of the sets of steps ``start .. stop - 1``, ``batch_size`` per step.

    Position ``p = step * batch_size + j`` is item ``p mod n`` of epoch ``p // n`` in the
    :class:`EpochSampler` order, so a batch may span two epochs and any step can be started from.
    ``shard = (k, n_parts)`` yields only part ``k`` of ``n_parts`` equal consecutive parts of each
    batch (the keys one rank of a data-parallel job loads).
    """

    def __init__(
        self, n: int, batch_size: int, *, seed: int, start: int, stop: int, shard: tuple[int, int] = (0, 1)
    ) -> None:
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        k, parts = shard
        self.part = slice(k * batch_size // parts, (k + 1) * batch_size // parts)

    def _keys(self, position: int) -> Iterator[tuple[int, int]]:
        epochs = EpochSampler(self.n, seed=self.seed)
        epochs.set_epoch(position // self.n)
        skip = position % self.n
        while True:
            yield from islice(iter(epochs), skip, None)
            skip = 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        keys = self._keys(self.start * self.batch_size)
        for _ in range(len(self)):
            yield list(islice(keys, self.batch_size))[self.part]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _worker_init(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM (the main process saves a checkpoint and stops them) and seed numpy."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    seed_worker(worker_id)


#: Most DataLoader workers ``train.num_workers: auto`` starts per process when the model is on a GPU.
MAX_AUTO_WORKERS = 4


def resolve_workers(num_workers: int | str, device: torch.device) -> int:
    """``train.num_workers`` as a number: ``auto`` is 0 when the model trains on the CPU (its
    threads use the cores) and otherwise up to :data:`MAX_AUTO_WORKERS` per process, one core
    kept for the process itself: next to a GPU step, building sets in the training process stalls every step."""
    if num_workers != "auto":
        return int(num_workers)
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun's processes on this node
    return max(0, min(MAX_AUTO_WORKERS, per_process - 1))


def training_loader(
    sets: ConditionSets,
    train: TrainConfig,
    *,
    seed: int,
    start: int,
    stop: int,
    device: torch.device,
    shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """The batches of steps ``start .. stop - 1`` (this process's part of each, see :class:`StepBatches`),
    built by :func:`resolve_workers` workers, in pinned memory when ``device`` is a GPU so the copy overlaps compute."""
    workers = resolve_workers(train.num_workers, device)
    return DataLoader(
        sets,
        batch_sampler=StepBatches(len(sets), train.batch_size, seed=seed, start=start, stop=stop, shard=shard),
        collate_fn=collate_sets,
        num_workers=workers,
        worker_init_fn=_worker_init,
        pin_memory=device.type == "cuda",
        multiprocessing_context=sets.data.worker_start_method if workers else None,
    )


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], int]]:
    """Within the block a first Ctrl-C or SIGTERM only records the signal (read between steps: the
    function yielded returns its number, 0 before); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    hits: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if hits:
            raise Interrupted(signum)
        hits.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield lambda: hits[0] if hits else 0
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _source_name(source: ad.AnnData | str | os.PathLike[str] | None, config: RunConfig) -> str:
    """How the progress lines call the data: the file name, or an AnnData's shape."""
    if isinstance(source, ad.AnnData):
        return "the AnnData in memory"
    return data_path_name(source if source is not None else config.data.path)


class Trainer:
    """Trains the model of a :class:`RunConfig` into ``run_dir``, or resumes it from ``run_dir/checkpoints/last.pt``.

    A fresh run builds its plug-ins (:func:`check_plugins`), then prepares the data (writing
    ``split.json`` and ``data_state.json``), writes the resolved ``config.yaml`` and refuses a
    folder that already holds a checkpoint; a resumed run rebuilds everything from the checkpoint
    (``previous.pt`` when ``last.pt`` is damaged) and refuses a config that changes the training
    stream (:data:`FIXED_ON_RESUME`). The commands hold the folder with a
    :class:`~perturbdiff_core.runs.folder.RunFolder` while a trainer works in it.

    Args:
        config: the run configuration (``data.path`` already resolved).
        run_dir: the run folder.
        source: the data as an AnnData or path instead of ``config.data.path``.
        resume: continue from the run folder's last checkpoint.
        progress: show a progress bar (tqdm, on stderr; rank 0 only).

    Under torchrun (a process group running, see :mod:`~perturbdiff_core.runs.distributed`) each rank
    trains on its part of every global batch of ``train.batch_size`` sets; rank 0 alone writes the
    run folder and validates, the other ranks read the prepared data from it.

    Example:
        >>> trainer = Trainer(load_config("examples/kang18_holdout_celltype.yaml"), "runs/kang")  # doctest: +SKIP
        >>> log = trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | os.PathLike[str],
        *,
        source: ad.AnnData | str | os.PathLike[str] | None = None,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        distributed.check_joined("Training")
        self.part = distributed.shard(config.train.batch_size)  # (rank, world size)
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress and distributed.is_main()
        self.device = distributed.local_device(resolve_device(config.train.device))
        self.threads = resolve_threads(config.train.threads)  # applied once the data are read (see threads.py)
        self.source_name = _source_name(source, config)
        self._summarized = False  # the summary before training is printed once
        self.checkpoint_file = checkpoint_path(self.run_dir)
        self.history: list[dict[str, float]] = []
        self.validation: dict[int, float] = {}
        self.step = 0
        self.transfer: TransferReport | None = None  # what train.init_from loaded
        reading = stage(f"preparing the data ({self.source_name})", disable=not self.progress)
        if resume:
            checkpoint = load_run_checkpoint(self.run_dir)  # previous.pt, with a note, when last.pt is damaged
            self._check_resumable(checkpoint.run_config)
            with reading:
                self.data = PerturbationData.from_state(checkpoint.data_state, source, config.data)
            self.data.require_same_parts(checkpoint.data_state)
            self.split: Split = checkpoint.split
            self.split.apply(self.data)
            self.model = checkpoint.build_model(self.device)
            self.control_levels = ControlLevels(self.model.control_levels)
            setting = config.sample.unseen_context_change
            self.unseen_context_change = (
                UnseenContextChange(checkpoint.unseen_context_change, why="auto: as the run resolved it when it started")
                if setting == "auto" else UnseenContextChange(float(setting))
            )
            why = "auto: as the run resolved it when it started" if config.model.anchor_name == AUTO_ANCHOR else ""
            self.anchor_choice = PredictorChoice(checkpoint.anchor_name, why)
        else:
            if has_checkpoint(self.run_dir):
                raise ConfigError(
                    f"{self.run_dir} already holds a trained run ({self.checkpoint_file.parent}); pass --resume to "
                    f"continue it, or --out to start a new run in another folder."
                )
            check_plugins(config)  # a typo fails now, not after the data are read
            init = load_init(config.train.init_from) if config.train.init_from else None
            with reading:
                self.data, self.split = self._prepare(source, init)
            torch.manual_seed(config.seed)
            self.control_levels = resolve_control_levels(config.model.control_levels, self.data, self.split, config.seed)
            self.unseen_context_change = resolve_unseen_context_change(
                config.sample.unseen_context_change, self.data, self.split, config.seed, self.control_levels.name
            )
            self.anchor_choice = resolve_anchor(
                config.model.anchor_name, self.data, self.split, config.seed, self.unseen_context_change,
            )
            model = build_model(config.model, self.data, self.control_levels.name, self.anchor_choice.name)
            if init is not None:
                self.transfer = transfer_weights(model, init, self.data, source=str(config.train.init_from))
                if distributed.is_main():
                    self.transfer.write(self.run_dir)
            self.model = model.to(self.device)
            if self.control_levels.vertices is not None:
                self.model.fit_context_levels(self.control_levels.vertices)
        apply_threads(self.threads)  # after the data are read: scanpy's numba calls reset the count
        self.context_drop_prob = resolve_context_drop(config.train.context_drop_prob, self.data, self.split.test)
        unseen = bool(self.data.unseen_contexts(self.split.test))
        self.control_shrinkage = (  # what the test's unseen contexts' control means are worth (training contexts only)
            ControlShrinkage.fit(config.sample.control_shrinkage, self.data, self.split.train, config.seed)
            if unseen else None
        )
        self.shrinkage = (  # the garrote on the anchor's and the ensemble's shifts into the test's unseen contexts
            ShiftShrinkage.fit(config.sample.anchor_shrinkage, config.sample.ensemble_shrinkage, self.data, self.split.train)
            if unseen else None
        )
        self.ceiling = (  # no predicted value above the training cells' highest (sample.ceiling)
            training_ceiling(self.data, self.split.train, config.seed) if config.sample.ceiling == "training" else None
        )
        self.ensemble = fit_ensemble(  # where the test's conditions are extrapolations (read only then)
            config.sample.ensemble, self.anchor_choice.name, self.data, self.split.train,
            [self.data.condition(c) for c in self.split.test], config.seed, response_fdr=config.sample.response_fdr,
        )
        self.params = self.model.trainable_parameters()
        train = config.train
        self.optimizer = make_optimizer(self.params, train)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: lr_factor(k, train.warmup_steps, train.steps)
        )
        if resume:
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
            self.scheduler.load_state_dict(checkpoint.scheduler_state)
            self.step, self.history, self.validation = checkpoint.step, checkpoint.history, checkpoint.validation
        if distributed.is_main():
            write_config(config, self.run_dir)
        held_out = self.data.held_out_fields(self.split.test)
        self.anchor = fit_anchor(self.anchor_choice.name, self.data, self.split.train, held_out)
        shifts = anchor_shifts(self.anchor, self.data, [*self.split.train, *self.split.val])
        self.train_sets = ConditionSets(self.data, self.split.train, seed=config.seed, shifts=shifts)
        if not resume and self.model.prediction == "edm":
            fit_data_scale(self.model, self.train_sets, self.device)
        self.val_loader = (
            make_loader(self.data, self.split.val, train=False, batch_size=train.batch_size, seed=config.seed,
                        samples_per_condition=train.val_sets, shifts=shifts)
            if self.split.val and train.val_every and distributed.is_main()
            else None
        )
        self.ddp = distributed.data_parallel(self.model, self.device, self.part)  # None in one process

    def _prepare(
        self, source: ad.AnnData | str | os.PathLike[str] | None, init: Checkpoint | None
    ) -> tuple[PerturbationData, Split]:
        """Rank 0 prepares the data (marginal or conditional, on the genes ``train.init_genes`` says)
        and writes ``split.json`` and ``data_state.json``; the other ranks then read them."""
        config = self.config
        data_config = config.data if init is None else gene_config(
            config.data, init.data_state["genes"], config.train.init_genes, source
        )
        prepare_data = prepare_marginal if config.train.objective == "marginal" else prepare
        prepared = distributed.main_first(
            lambda: prepare_data(data_config, config.split, source, out_dir=self.run_dir)
        )
        return prepared if prepared is not None else load_prepared(self.run_dir, config.data, source)

    def _check_resumable(self, saved: RunConfig) -> None:
        changed = [
            key
            for key in differences(saved.to_dict(), self.config.to_dict())
            if key != "data.path" and key.startswith(FIXED_ON_RESUME)
        ]
        if changed:
            raise ConfigError(
                f"Cannot resume {self.run_dir}: the config changes {', '.join(changed)}, which define the training "
                f"run. Resume with the run's own {RunDir(self.run_dir).config}, or start a new run with --out."
            )

    # ------------------------------------------------------------------------------ loop

    def fit(self, stop_at: int | None = None) -> pd.DataFrame:
        """Train up to ``train.steps`` (or ``stop_at``), then save a checkpoint; returns :meth:`log`.

        Raises:
            TrainingInterrupted: on Ctrl-C or SIGTERM, after saving the last completed step.
        """
        train = self.config.train
        stop = train.steps if stop_at is None else min(stop_at, train.steps)
        if self.step >= stop:
            if self.step == 0:  # train.steps 0 (zero-shot from train.init_from): still a checkpoint to predict from
                self.save()
            return self.log()
        if self.progress and not self._summarized:
            print("\n".join(run_summary(self, self.source_name)), file=sys.stderr, flush=True)
            self._summarized = True
        loader = training_loader(
            self.train_sets, train, seed=self.config.seed, start=self.step, stop=stop, shard=self.part, device=self.device
        )
        bar = progress_bar(total=stop, initial=self.step, desc="train", unit="steps", disable=not self.progress)
        with deferred_interrupt() as interrupted, bar:
            for batch in loader:
                self.history.append(self._train_step(batch))
                self.step += 1
                self._periodic(bar, stop)
                bar.update(1)
                signum = distributed.any_rank(interrupted(), self.device)  # every rank stops at the same step
                if signum:
                    self.save()
                    raise TrainingInterrupted(self.step, self.checkpoint_file, signum)
        self.save()
        return self.log()

    def _train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step; its random draws come from ``step_seed(seed, step)`` alone."""
        apply_threads(self.threads)  # whatever ran since the last step (validation, a plug-in) may have reset it
        seed = step_seed(self.config.seed, self.step)
        torch.manual_seed(seed)  # anything drawing from torch's global generator is seeded per step too
        generator = torch.Generator(self.device).manual_seed(seed)
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        batch = self._conditioned(batch.to(self.device, non_blocking=True))  # asynchronous from pinned memory on a GPU
        if self.context_drop_prob > 0:
            batch = drop_context(batch, self.context_drop_prob, generator, self.part)
        try:
            terms = self.model.loss(batch, generator) if self.ddp is None else self.ddp(batch, generator)
        except NonFiniteError:  # the data were checked when read: NaN or Inf now comes from a diverging model
            terms = {"loss": torch.tensor(math.nan, device=self.device)}  # every rank then stops below
        nan = terms["loss"].new_tensor(math.nan)  # for a term the model does not report
        loss, mse, mmd = distributed.mean(torch.stack([terms["loss"].detach(), terms.get("mse", nan), terms.get("mmd", nan)])).tolist()
        if not math.isfinite(loss):
            raise self._diverged(f"the training loss became {loss} at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.config.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.model.ema is not None:
            self.model.update_ema()
        return {"loss": loss, "mse": mse, "mmd": mmd, "lr": lr}

    def _diverged(self, what: str) -> PerturbDiffError:
        """The error of a diverging model: ``what`` happened, and the fix (the data were checked when read)."""
        return PerturbDiffError(
            f"{what[0].upper()}{what[1:]} (the model diverged); lower train.lr (now {self.config.train.lr:g}) or set "
            f"train.grad_clip, and resume from the last checkpoint ({self.checkpoint_file}) or start again."
        )

    def _conditioned(self, batch: SetBatch) -> SetBatch:
        """``batch`` as the model sees it: perturbation zeroed for ``train.objective: marginal``."""
        if self.config.train.objective == "marginal":
            return marginal_batch(batch, self.model.denoiser.perturbation_dim)
        return batch

    def _periodic(self, bar: Any, stop: int) -> None:
        """Validation, logging and checkpoints due after the step just taken (``fit`` saves at ``stop``)."""
        train, step = self.config.train, self.step
        last = step == train.steps
        if self.val_loader is not None and (step % train.val_every == 0 or last):
            self.validation[step] = self.validate()
        if step % train.log_every == 0 or last or step in self.validation:
            window = self.history[-train.log_every:]
            postfix = {"loss": f"{np.mean([r['loss'] for r in window]):.4g}"}
            if self.validation:
                postfix["val_mmd"] = f"{self.validation[max(self.validation)]:.4g}"
            bar.set_postfix(postfix, refresh=False)
            self.write_log()
        if step % train.checkpoint_every == 0 and step != stop:
            self.save()

    @torch.no_grad()
    def validate(self) -> float:
        r"""Mean :math:`\mathrm{MMD}^2` (the model's kernel and estimator) between sets sampled by the
        (EMA) model in ``val_sampling_steps`` DDIM steps and the fixed real sets of the validation conditions."""
        assert self.val_loader is not None
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        values = []
        for batch in self.val_loader:
            batch = self._conditioned(batch.to(self.device))
            sampled = self.model.sample(batch.cond, steps=self.config.train.val_sampling_steps, generator=generator)
            try:
                values.append(self.model.estimator(sampled, batch.target.to(sampled.dtype), self.model.kernel))
            except NonFiniteError:
                raise self._diverged(f"the validation samples became NaN or Inf after step {self.step}") from None
        return torch.cat(values).mean().item()

    # ---------------------------------------------------------------------------- output

    def predictor(self, sample: SampleConfig | None = None) -> DiffusionPredictor:
        """The model's predictor with every rule this run resolved from its training data (anchor, unseen-context
        change, control and shift shrinkage, ensemble, ceiling), sampling as ``sample`` (default: the run's)."""
        return DiffusionPredictor(
            self.model, sample or self.config.sample, device=self.device, anchor=self.anchor,
            unseen_context_change=self.unseen_context_change.scale, control_shrinkage=self.control_shrinkage,
            ensemble=self.ensemble, shrinkage=self.shrinkage, ceiling=self.ceiling,
        )

    def log(self) -> pd.DataFrame:
        """``train_log.csv``'s table: per ``log_every`` steps the mean ``loss``, ``mse``, ``mmd``, the
        step's ``lr``, and ``val_mmd`` at validation steps (NaN elsewhere)."""
        every = self.config.train.log_every
        rows = []
        for end in sorted({*range(every, self.step + 1, every), *self.validation, *([self.step] if self.step else [])}):
            window = self.history[max(0, end - every):end]
            rows.append(
                {
                    "step": end,
                    **{k: float(np.mean([r[k] for r in window])) for k in ("loss", "mse", "mmd")},
                    "lr": window[-1]["lr"],
                    "val_mmd": self.validation.get(end, math.nan),
                }
            )
        return pd.DataFrame(rows, columns=list(LOG_COLUMNS))

    def write_log(self) -> Path:
        """Write :meth:`log` to ``run_dir/train_log.csv`` atomically (rank 0 only)."""
        path = RunDir(self.run_dir).train_log
        if distributed.is_main():
            with atomic_path(path) as tmp:
                self.log().to_csv(tmp, index=False)
        return path

    def save(self) -> Path:
        """Checkpoint the current step to ``run_dir/checkpoints/last.pt`` (atomically) and write the log.

        Rank 0 writes; every rank returns once the checkpoint is on disk.
        """
        if not distributed.is_main():
            distributed.barrier()
            return self.checkpoint_file
        checkpoint = Checkpoint(
            step=self.step,
            run_config=self.config,
            model_config=self.model.config(),
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(),
            data_state=self.data.to_state(),
            split=self.split,
            history=self.history,
            validation=self.validation,
            unseen_context_change=self.unseen_context_change.scale,
            anchor=self.anchor_choice.name,
            ceiling=self.ceiling,
        )
        self.write_log()
        path = save_checkpoint(self.checkpoint_file, checkpoint, previous=previous_path(self.run_dir))
        distributed.barrier()
        return path

