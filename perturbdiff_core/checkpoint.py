"""Checkpoints: everything to resume training exactly or to predict anywhere, in one atomic file.

A checkpoint holds the model weights (with the EMA), the optimizer and learning-rate scheduler
states, the step, the run configuration, :meth:`RKHSDiffusion.config`, the data state (genes,
vocabularies, fitted perturbation encoder), the split, the per-step training history, the
perturbdiff version and a format tag. It is written with ``torch.save`` to a temporary file
renamed into place, and read with ``torch.load(weights_only=True)``, which runs no code from
the file. Every way loading can fail gives one :class:`CheckpointError` saying what to do.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data.config import SplitConfig
from .data.splits import Split
from .diffusion import RKHSDiffusion
from .errors import PerturbDiffError
from .io import atomic_path
from .run_config import RunConfig, config_from_dict

#: Marks a perturbdiff checkpoint and the version of its layout; a reader accepts only its own.
CHECKPOINT_FORMAT = "perturbdiff.checkpoint/1"

#: Folder of checkpoints inside a run folder, and the latest checkpoint's file name.
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


class CheckpointError(PerturbDiffError):
    """A checkpoint file that is missing, unreadable, foreign or from an incompatible version."""


@dataclass
class Checkpoint:
    """The content of a checkpoint file (see the module docstring).

    ``history`` is one dict per training step (``loss``, ``mse``, ``mmd``, ``lr``);
    ``validation`` maps a step to its validation MMD^2.
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
                f"The checkpoint's weights do not fit its model configuration ({str(err).splitlines()[0]}); "
                f"the file was altered or written by an incompatible plug-in version."
            ) from None
        return model.to(device)


def checkpoint_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/checkpoints/last.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (a reader never sees a partial file)."""
    payload: dict[str, Any] = {f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}
    payload["run_config"] = checkpoint.run_config.to_dict()
    payload["split"] = {"config": asdict(checkpoint.split.config), **{k: getattr(checkpoint.split, k) for k in ("train", "val", "test")}}
    payload["format"] = CHECKPOINT_FORMAT
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


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
            f"Cannot read {path} as a perturbdiff checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
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
    missing = [f.name for f in fields(Checkpoint) if f.name not in payload]
    if missing:
        raise CheckpointError(
            f"{path} lacks {', '.join(missing)}; it was not written by perturbdiff's save_checkpoint. Train again."
        )
    values = {f.name: payload[f.name] for f in fields(Checkpoint)}
    values["run_config"] = config_from_dict(payload["run_config"])
    split = payload["split"]
    values["split"] = Split(SplitConfig.from_dict(split["config"]), list(split["train"]), list(split["val"]), list(split["test"]))
    values["validation"] = {int(k): float(v) for k, v in payload["validation"].items()}
    return Checkpoint(**values)
