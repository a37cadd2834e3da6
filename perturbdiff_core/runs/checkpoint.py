"""Checkpoints: everything to resume training exactly or to predict anywhere, in one atomic file.

A checkpoint holds the model weights (with the EMA), the optimizer and learning-rate scheduler
states, the step, the run configuration, :meth:`RKHSDiffusion.config`, the data state (genes,
vocabularies, fitted perturbation encoder), the split, the per-step training history, the
perturbdiff version, the distribution and version of every plug-in the run names
(:func:`~perturbdiff_core.runs.config.plugin_records`; loading warns when the installed ones differ)
and a format tag. It is written with ``torch.save`` to a temporary file
renamed into place, and read with ``torch.load(weights_only=True)``, which runs no code from
the file. Every way loading can fail gives one :class:`CheckpointError` saying what to do.

A run keeps two: ``last.pt`` and ``previous.pt``, the checkpoint before it (rotated by a hard link
just before the new one is renamed into place, so ``last.pt`` never goes missing). When
``last.pt`` cannot be read, :func:`load_run_checkpoint` falls back to ``previous.pt`` with a note.
"""

from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..data.config import SplitConfig
from ..data.splits import Split
from ..diffusion.model import RKHSDiffusion
from ..errors import PerturbDiffError, PerturbDiffNote, PerturbDiffWarning, first_line
from ..io import atomic_path, output_error
from ..names import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT
from .anchor import AUTO_ANCHOR, NO_ANCHOR
from .config import RunConfig, config_from_dict, plugin_mismatches, plugin_records
from .folder import RunDir

#: Marks a perturbdiff checkpoint and the version of its layout; a reader accepts only its own.
CHECKPOINT_FORMAT = "perturbdiff.checkpoint/1"

#: The latest checkpoint's file name and the one before it (in :attr:`RunDir.checkpoints`).
LAST, PREVIOUS = LAST_CHECKPOINT, PREVIOUS_CHECKPOINT


#: Checkpoint fields that older checkpoints lack: read as empty.
_OPTIONAL = frozenset({"plugins", "unseen_context_change", "anchor", "ceiling"})


class CheckpointError(PerturbDiffError):
    """A checkpoint file that is missing, unreadable, foreign or from an incompatible version."""


@dataclass
class Checkpoint:
    """The content of a checkpoint file (see the module docstring).

    ``history`` is one dict per training step (``loss``, ``mse``, ``mmd``, ``lr``);
    ``validation`` maps a step to its validation MMD^2; ``plugins`` is
    :func:`~perturbdiff_core.runs.config.plugin_records` of the run config, filled in when saved
    (empty in checkpoints written before it was recorded); ``unseen_context_change`` is the share of
    its change a context training never saw keeps, resolved from the training data when
    ``sample.unseen_context_change`` is ``auto`` (1, all of it, in checkpoints written before it existed);
    ``anchor`` is the run's resolved ``model.anchor`` (``None`` in checkpoints written before ``auto``
    existed: :attr:`anchor_name` then reads the config); ``ceiling`` is each gene's highest value in the
    training cells (``sample.ceiling: training``; ``None`` for ``none`` and in checkpoints written before it existed,
    which predict without a cap).
    """

    step: int
    run_config: RunConfig
    model_config: dict[str, Any]
    model_state: dict[str, Any]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    data_state: dict[str, Any]
    split: Split
    history: list[dict[str, float]]
    validation: dict[int, float]
    version: str = __version__
    plugins: dict[str, Any] = field(default_factory=dict)
    unseen_context_change: float = 1.0
    anchor: str | None = None
    ceiling: torch.Tensor | None = None

    @property
    def anchor_name(self) -> str:
        """The anchor the model was trained with: the resolved ``model.anchor`` (``none`` or a predictor); for a
        checkpoint written before ``auto`` existed, the config's name (``auto`` there trained without one)."""
        if self.anchor is not None:
            return self.anchor
        name = self.run_config.model.anchor_name
        return NO_ANCHOR if name == AUTO_ANCHOR else name

    @property
    def complete(self) -> bool:
        """Whether training reached ``train.steps``."""
        return self.step >= self.run_config.train.steps

    def build_model(self, device: torch.device | str = "cpu") -> RKHSDiffusion:
        """The trained model (weights and EMA) on ``device``."""
        model = RKHSDiffusion.from_config(self.model_config)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as err:
            raise CheckpointError(
                f"The checkpoint's weights do not fit its model configuration ({first_line(err)}); "
                f"the file was altered or written by an incompatible plug-in version."
            ) from None
        return model.to(device)


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/checkpoints/last.pt``."""
    return RunDir(run_dir).last_checkpoint


def previous_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/checkpoints/previous.pt``, the checkpoint before ``last.pt``."""
    return RunDir(run_dir).previous_checkpoint


def has_checkpoint(run_dir: str | os.PathLike[str]) -> bool:
    """Whether the run folder holds a checkpoint to resume from (``last.pt`` or ``previous.pt``)."""
    return checkpoint_path(run_dir).is_file() or previous_path(run_dir).is_file()


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint, *, previous: str | os.PathLike[str] | None = None) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (a reader never sees a partial file).

    With ``previous``, a complete file already at ``path`` becomes ``previous`` (atomically, just
    before the new one replaces it), so one damaged or unwanted checkpoint never leaves a run
    without a way back. A failed write (a full disk, ...) leaves both files as they were and
    raises :class:`~perturbdiff_core.errors.OutputError` naming the path.
    """
    payload: dict[str, Any] = {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}
    payload["run_config"] = checkpoint.run_config.to_dict()
    payload["split"] = {"config": asdict(checkpoint.split.config), **{k: getattr(checkpoint.split, k) for k in ("train", "val", "test")}}
    payload["plugins"] = checkpoint.plugins or plugin_records(checkpoint.run_config)
    payload["format"] = CHECKPOINT_FORMAT
    path = Path(path)
    with atomic_path(path) as tmp:
        _torch_save(payload, tmp, path)
        if previous is not None and _complete(path):
            _keep_as(path, Path(previous))
    return path


def _torch_save(payload: dict[str, Any], tmp: Path, path: Path) -> None:
    """``torch.save``, whose file writer reports a failed write (a full disk) as a RuntimeError without errno."""
    try:
        torch.save(payload, tmp)
    except RuntimeError as err:
        if "inline_container" not in str(err) and "PytorchStreamWriter" not in str(err):
            raise
        reason = f"torch's file writer stopped ({first_line(err, 120)})"
        raise output_error(path, err, reason=reason, fix="free space on that disk (the usual cause) or write elsewhere, then resume") from None


def _complete(path: Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` file: a zip archive whose directory, at its end, reads
    (a cheap test: truncated and zero-byte files fail it)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False


def _keep_as(path: Path, kept: Path) -> None:
    """Make ``kept`` a copy of ``path`` atomically: a hard link (no data copied) where the file system has them."""
    with atomic_path(kept) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)


def load_checkpoint(path: str | os.PathLike[str], map_location: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError for any other file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at {path}. Train first (perturbdiff train CONFIG.yaml --out RUN_DIR) or give "
            f"the path of an existing checkpoint."
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file fails anywhere inside torch.load's unpickler
        raise CheckpointError(
            f"Cannot read {path} as a perturbdiff checkpoint ({type(err).__name__}: {first_line(err, 200)}); "
            f"the file is corrupt, truncated or not a checkpoint. Use another checkpoint or train again."
        ) from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path} is not a perturbdiff checkpoint (it has no {CHECKPOINT_FORMAT!r} tag).")
    version = payload.get("version", "unknown")
    if payload["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was written by perturbdiff {version} in format {payload['format']!r}, but perturbdiff "
            f"{__version__} reads {CHECKPOINT_FORMAT!r}; load it with perturbdiff {version} "
            f"(pip install perturbdiff=={version}) or train again."
        )
    missing = [f.name for f in fields(Checkpoint) if f.name not in payload and f.name not in _OPTIONAL]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}; it was not written by perturbdiff's save_checkpoint. Train again."
        )
    values = {f.name: payload[f.name] for f in fields(Checkpoint) if f.name in payload}
    values["plugins"] = dict(payload.get("plugins") or {})
    changed = plugin_mismatches(values["plugins"])
    if changed:
        warnings.warn(
            f"{path} was trained with other plug-ins than the installed ones: {'; '.join(changed)}. Its "
            f"predictions may differ; install the recorded versions to reproduce them.",
            PerturbDiffWarning,
            stacklevel=2,
        )
    values["run_config"] = config_from_dict(payload["run_config"])
    split = payload["split"]
    values["split"] = Split(SplitConfig.from_dict(split["config"]), list(split["train"]), list(split["val"]), list(split["test"]))
    values["validation"] = {int(k): float(v) for k, v in payload["validation"].items()}
    return Checkpoint(**values)


def load_run_checkpoint(run_dir: str | os.PathLike[str], map_location: torch.device | str = "cpu") -> Checkpoint:
    """The run folder's latest readable checkpoint: ``last.pt``, or ``previous.pt`` with a note when
    ``last.pt`` is missing or unreadable (a truncated file, a disk error); ``last.pt``'s error when neither reads."""
    try:
        return load_checkpoint(checkpoint_path(run_dir), map_location)
    except CheckpointError as err:
        if not previous_path(run_dir).is_file():
            raise
        try:
            checkpoint = load_checkpoint(previous_path(run_dir), map_location)
        except CheckpointError:
            raise err from None
        warnings.warn(
            f"{checkpoint_path(run_dir)} cannot be used ({first_line(err, 120)}); using the checkpoint before it, "
            f"{previous_path(run_dir)} (step {checkpoint.step}).",
            PerturbDiffNote,
            stacklevel=2,
        )
        return checkpoint
