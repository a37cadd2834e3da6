"""What was run, as the report's header shows it: the data, the split, the model's plug-ins, the
training budget, the seed, the config's name and the code (version and git commit when known).

So a report read weeks later, or sent to someone, says by itself what it is about.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..data.sources import data_path_name
from .config import RunConfig

#: Held-out values and test conditions named before "... and N more".
SHOWN = 8


def _names(values: Sequence[str]) -> str:
    more = f" ... and {len(values) - SHOWN} more" if len(values) > SHOWN else ""
    return ", ".join(map(str, values[:SHOWN])) + more


def _plugin(name: str, params: dict[str, object]) -> str:
    return name + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")


def source_commit(folder: Path | None = None) -> str | None:
    """The git commit of the perturbdiff source (``+ local changes`` when the tracked files differ
    from it), or ``None`` when it is not a git checkout or git is missing."""
    folder = folder or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" + local changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def run_facts(config: RunConfig, *, test: Sequence[str], steps: int | None = None) -> dict[str, str]:
    """``label -> text`` of a run of ``config`` whose test conditions are ``test`` (``steps``: trained so far)."""
    model, train, sample = config.model, config.train, config.sample
    denoiser = model.denoiser + (f" ({model.denoiser_params['size']})" if "size" in model.denoiser_params else "")
    facts = {
        "config": config.name or "(unnamed)",
        "data": data_path_name(config.data.path) if isinstance(config.data.path, list) else str(config.data.path),
        "split": config.split.kind + (f", reloaded from {config.split.file}" if config.split.file else ""),
        "held out": _names(config.split.holdout) if config.split.holdout else "(none named)",
        "test conditions": f"{len(test)}: {_names(list(test))}",
        "model": f"{denoiser}, lambda {model.mmd_weight:g}, {model.prediction} prediction",
        "kernel": _plugin(model.kernel, model.kernel_params),
        "estimator": _plugin(model.estimator, model.estimator_params),
        "anchor": model.anchor_name,
        "ensemble": sample.ensemble,
        "steps": f"{train.steps if steps is None else f'{steps} of {train.steps}'}, batch {train.batch_size} x "
        f"{config.data.set_size} cells, lr {train.lr:g}",
        "sampling": f"{sample.sampler}, {sample.steps} steps, {sample.populations} population(s) per condition",
        "seed": str(config.seed),
        "perturbdiff": __version__,
    }
    commit = source_commit()
    if commit is not None:
        facts["commit"] = commit
    return facts
