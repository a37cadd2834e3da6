"""``train.threads``: resolved from the machine, applied after the data are prepared (whose numba
calls reset libgomp's thread count), and in force during every training step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_training import screen_path, tiny_config  # noqa: F401  (the fixture is used by name)

from perturbdiff_core.errors import ConfigError
from perturbdiff_core.runs.config import load_config
from perturbdiff_core.runs.training import Trainer
from perturbdiff_core.threads import available_cpus, resolve_threads, threads_line

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_honours_omp_num_threads_else_the_cpus_this_process_may_use(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto") == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_threads("auto") == available_cpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(available_cpus() * 2))  # more torchrun processes than CPUs
    assert resolve_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert resolve_threads(4) == 4
    assert threads_line(1) == "training with 1 thread" and threads_line(2) == "training with 2 threads"


def test_threads_must_be_positive_or_auto() -> None:
    assert load_config(None, ["train.threads=auto"]).train.threads == "auto"
    with pytest.raises(ConfigError, match="train.threads = 0 is out of range; set train.threads to an integer > 0 or 'auto'"):
        load_config(None, ["train.threads=0"])
    with pytest.raises(ConfigError, match="train.threads"):
        load_config(None, ["train.threads=many"])


@pytest.mark.parametrize("threads", [1, 2])
def test_every_training_step_runs_with_the_threads_asked_for(screen_path: Path, tmp_path, monkeypatch, threads) -> None:  # noqa: F811
    """The data preparation resets the count (as numba does on its first parallel call); each step
    still computes with ``train.threads``, read inside the loss by a spy."""
    training = sys.modules["perturbdiff_core.runs.training"]
    prepare = training.prepare

    def prepare_like_numba(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        torch.set_num_threads(3)  # what numba's OpenMP layer does to libgomp on a 3-core machine
        return prepared

    monkeypatch.setattr(training, "prepare", prepare_like_numba)
    trainer = Trainer(tiny_config(screen_path, f"train.threads={threads}", "train.steps=4"), tmp_path / "run", progress=False)
    seen: list[int] = []
    loss = trainer.model.loss

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return loss(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "loss", spy)
    torch.set_num_threads(3)  # and whatever runs between construction and training may reset it too
    trainer.fit()
    assert seen == [threads] * 4
