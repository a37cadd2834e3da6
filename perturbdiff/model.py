"""``PerturbDiff``: the command line's train, predict and run, for an AnnData in a notebook.

Every call goes through the machinery the commands use (:class:`~perturbdiff_core.runs.training.Trainer`,
:func:`~perturbdiff_core.runs.prediction.predict_run`, :func:`~perturbdiff_core.runs.pipeline.predict_all` and
:func:`~perturbdiff_core.runs.pipeline.evaluate_run`), so the same configuration and seed give the same
numbers as ``perturbdiff run``. The model lives in a run folder, as a command's run does: its
checkpoints make :meth:`PerturbDiff.train` resumable and :meth:`PerturbDiff.save` a copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd

from perturbdiff_core.configuration import read_yaml
from perturbdiff_core.data.config import SplitConfig
from perturbdiff_core.errors import InputError
from perturbdiff_core.io import TMP_SUFFIX
from perturbdiff_core.names import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, LOCK_FILE
from perturbdiff_core.runs.checkpoint import has_checkpoint, load_run_checkpoint
from perturbdiff_core.runs.config import RunConfig, check, config_from_dict, resolved
from perturbdiff_core.runs.folder import RunDir, RunFolder

from .options import run_config

#: The key of ``AnnData.uns`` where a prediction keeps what :func:`perturbdiff.evaluate` needs.
UNS_KEY = "perturbdiff"


class PerturbDiff:
    """A PerturbDiff model of a perturbation screen held in an AnnData.

    Args:
        adata: log1p-normalised cells (or counts with ``data.normalize: True``) with the
            perturbation of each cell in ``obs[perturbation_key]`` and its controls labelled
            ``control_label``; ``None`` to read ``data.path`` of ``config``.
        perturbation_key, control_label, cell_type_key, batch_key: the obs columns, as ``data.*``.
        split: which conditions are held out, e.g. ``{"kind": "holdout_cell_type", "holdout":
            ["CD14+Mono"]}``, or a :class:`~perturbdiff_core.data.config.SplitConfig`.
        config: a base configuration: a YAML file as the command line takes, a RunConfig or a mapping.
        run_dir: the run folder that holds the checkpoints and outputs; default a new temporary
            folder (``save`` copies it somewhere lasting).
        **options: further config keys, dotted (``**{"train.steps": 500}``) or nested
            (``model={"kernel": "rbf"}``); see ``docs/config.md``.

    Example:
        >>> model = PerturbDiff(adata, perturbation_key="condition", cell_type_key="cell_type",
        ...                     split={"kind": "holdout_cell_type", "holdout": ["CD14+Mono"]},
        ...                     **{"train.steps": 500})  # doctest: +SKIP
        >>> model.train()  # doctest: +SKIP
        >>> pred = model.predict()  # doctest: +SKIP
    """

    def __init__(
        self,
        adata: ad.AnnData | None = None,
        *,
        perturbation_key: str | None = None,
        control_label: str | None = None,
        cell_type_key: str | None = None,
        batch_key: str | None = None,
        split: Mapping[str, Any] | SplitConfig | None = None,
        config: str | os.PathLike[str] | RunConfig | Mapping[str, Any] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        given = {
            "perturbation_key": perturbation_key,
            "control_label": control_label,
            "cell_type_key": cell_type_key,
            "batch_key": batch_key,
        }
        data = {key: value for key, value in given.items() if value is not None}
        if adata is not None and not isinstance(adata, ad.AnnData):
            raise InputError(f"adata must be an AnnData (or None to read data.path), got {type(adata).__name__}.")
        self.adata = adata
        self.config = run_config(config, data=data, split=split, options=options)
        if adata is None:
            self.config = resolved(self.config)  # data.path found as the command line finds it
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._temporary: weakref.finalize | None = None  # removes a temporary run folder with the model

    def __repr__(self) -> str:
        where = self.run_dir if self.run_dir is not None else "no run folder yet"
        return f"PerturbDiff({self.config.name!r}, {self.trained_steps} of {self.config.train.steps} steps, {where})"

    # ------------------------------------------------------------------------------ state

    @property
    def trained_steps(self) -> int:
        """Steps trained so far (the run folder's last checkpoint), 0 before training."""
        if self.run_dir is None or not has_checkpoint(self.run_dir):
            return 0
        return load_run_checkpoint(self.run_dir).step

    def history(self) -> pd.DataFrame:
        """The training log (``train_log.csv``): mean losses per ``train.log_every`` steps, validation MMD."""
        log = RunDir(self._trained_dir()).train_log
        return pd.read_csv(log) if log.exists() else pd.DataFrame()

    def _folder(self) -> Path:
        """The run folder, made on first use (a temporary one unless ``run_dir`` was given)."""
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="perturbdiff-"))
            self._temporary = weakref.finalize(self, shutil.rmtree, self.run_dir, True)
        return self.run_dir

    def _trained_dir(self) -> Path:
        if self.run_dir is None or not has_checkpoint(self.run_dir):
            raise InputError("The model is not trained yet; call model.train() first (or PerturbDiff.load(DIR)).")
        return self.run_dir

    def _trainer(self, resume: bool, progress: bool) -> Any:
        from perturbdiff_core.runs.training import Trainer

        return Trainer(self.config, self._folder(), source=self.adata, resume=resume, progress=progress)

    # --------------------------------------------------------------------------- training

    def train(self, steps: int | None = None, *, progress: bool = True) -> pd.DataFrame:
        """Train to ``steps`` (default ``train.steps``), resuming the run folder's last checkpoint when
        there is one; returns the training log.

        Interrupted (Ctrl-C, or the notebook's stop button), it saves the last completed step first:
        calling ``train()`` again continues exactly where it stopped. More steps than before
        continue the same run with the learning-rate schedule of the new total.
        """
        if steps is not None:
            self.config = replace(self.config, train=replace(self.config.train, steps=steps))
            check(self.config)
        with RunFolder(self._folder()) as folder:
            trainer = self._trainer(resume=has_checkpoint(folder.path), progress=progress)
            folder.keep()
            return trainer.fit()

    # ------------------------------------------------------------------------- prediction

    def predict(
        self,
        conditions: Sequence[str] | None = None,
        *,
        adata: ad.AnnData | str | os.PathLike[str] | None = None,
        n_cells: int | None = None,
        seed: int | None = None,
        populations: int = 1,
        device: str | None = None,
        progress: bool = True,
    ) -> ad.AnnData:
        """Predicted cells, like ``predictions.h5ad``: the predicted cells of each condition and the
        real control cells of its context (as ``perturbdiff predict`` writes them).

        Args:
            conditions: perturbation names or condition labels ``perturbation|cell_type``; default
                the split's test conditions (with ``adata``: every perturbed condition in it).
            adata: other cells to predict from (an AnnData or ``.h5ad`` path; genes aligned by name).
            n_cells: cells per condition (default: as many as the real condition has).
            seed: sampling seed (default: the config's).
            populations: independent populations per condition, labelled in obs ``population``.
            device: torch device (default: ``train.device``).
        """
        from perturbdiff_core.runs.prediction import predict_run
        from perturbdiff_core.runs.training import resolve_device

        checkpoint = load_run_checkpoint(self._trained_dir())
        data = str(adata) if isinstance(adata, (str, os.PathLike)) else adata
        pred = predict_run(
            checkpoint,
            device=resolve_device(device or checkpoint.run_config.train.device),
            data=data,
            run_data=self.adata,
            conditions=conditions,
            n_cells=n_cells,
            seed=seed,
            populations=populations,
            progress=progress,
        )
        pred.uns[UNS_KEY] = evaluation_settings(checkpoint.run_config)
        return pred

    def evaluate(self, *, progress: bool = True) -> pd.DataFrame:
        """What ``perturbdiff run`` does after training: predict the test conditions with the model and
        every ``evaluate.baselines`` predictor, compare them, and write ``predictions.h5ad``,
        ``metrics.csv`` and ``report.html`` into the run folder; returns the metrics (long format)."""
        from perturbdiff_core.runs.pipeline import evaluate_run, predict_all

        self._trained_dir()
        with RunFolder(self._folder()) as folder:
            trainer = self._trainer(resume=True, progress=progress)
            folder.keep()
            predictions, real = predict_all(trainer)
            return evaluate_run(trainer, predictions, real)

    @property
    def report(self) -> Path:
        """The run folder's ``report.html`` (written by :meth:`evaluate`)."""
        return RunDir(self._trained_dir()).report

    @property
    def predictions_file(self) -> Path:
        """The run folder's ``predictions.h5ad`` (written by :meth:`evaluate`)."""
        return RunDir(self._trained_dir()).predictions

    # ---------------------------------------------------------------------- save and load

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Copy the run folder (config, split, data state, checkpoints, log, outputs) to ``path``, a new
        or empty folder; :meth:`load` reads it back. Returns ``path``."""
        source, target = self._trained_dir(), Path(path)
        if target.exists() and target.resolve() == source.resolve():
            return target
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InputError(f"{target} exists and is not an empty folder; save into a new folder.")
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns(LOCK_FILE, f"*{TMP_SUFFIX}"))
        if target.exists():
            target.rmdir()
        partial.rename(target)  # the whole folder appears at once
        temporary = getattr(self, "_temporary", None)
        if temporary is not None:  # the model lives in the saved folder from now on
            self.run_dir, self._temporary = target, None
            temporary()
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], adata: ad.AnnData | None = None) -> PerturbDiff:
        """The model saved in ``path`` (a run folder of :meth:`save` or of ``perturbdiff train``/``run``).

        ``adata`` is the data it was trained on, needed to predict or train further when it was
        trained from an AnnData in memory (its config then has no ``data.path``).
        """
        folder = Path(path)
        if not RunDir(folder).config.is_file() or not has_checkpoint(folder):
            raise InputError(f"{folder} holds no trained model (no {CONFIG_FILE} and {CHECKPOINT_DIR}/{LAST_CHECKPOINT}); give a run folder.")
        config = config_from_dict(read_yaml(RunDir(folder).config))
        if adata is None and config.data.path is None:
            raise InputError(
                f"The model in {folder} was trained from an AnnData in memory; pass it: PerturbDiff.load(path, adata)."
            )
        model = cls.__new__(cls)
        model.adata, model.config, model.run_dir, model._temporary = adata, config, folder, None
        return model


def evaluation_settings(config: RunConfig) -> dict[str, Any]:
    """What :func:`perturbdiff.evaluate` reads from a prediction's ``uns``: the data keys and how the run evaluates."""
    data = config.data
    return {
        "perturbation_key": data.perturbation_key,
        "control_label": data.control_label,
        "cell_type_key": data.cell_type_key or "",
        "context_keys": [k for k in (data.cell_type_key, data.batch_key, *data.covariate_keys) if k is not None],
        "dose_key": data.dose_key or "",
        "normalize": data.normalize,
        "kernel": config.evaluate.kernel,
        "max_cells": config.evaluate.max_cells,
        "seed": config.seed,
    }
