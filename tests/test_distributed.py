"""Multi-process training: 2 CPU ranks under torchrun (gloo) give one process's weights; rank 0 alone writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from perturbdiff_core.data.batch import Conditioning, SetBatch
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.diffusion.model import RKHSDiffusion
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.runs import distributed
from perturbdiff_core.runs.checkpoint import load_checkpoint
from perturbdiff_core.runs.config import load_config
from perturbdiff_core.runs.training import StepBatches, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

#: float32 gradients all-reduced over 2 ranks are summed in another order than one process sums
#: the global batch: a few ulps per step, grown by AdamW's normalisation over a handful of steps.
RTOL, ATOL = 1e-5, 1e-4  # float32 sums over 2+2 sets vs 4, amplified by Adam where gradients are tiny

#: Logs every write (open for writing, mkdir, rename) under $WATCH_DIR of each torchrun worker to
#: $WRITES_DIR/rank<RANK>.txt; installed as sitecustomize, so it runs before perturbdiff is imported.
WRITE_AUDIT = textwrap.dedent(
    """
    import os, sys
    if "RANK" in os.environ and "WATCH_DIR" in os.environ:
        _watch = os.path.realpath(os.environ["WATCH_DIR"])
        _log = open(os.path.join(os.environ["WRITES_DIR"], "rank" + os.environ["RANK"] + ".txt"), "a", buffering=1)
        _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if (mode is None and not flags & _writing) or (mode is not None and not set(mode) & set("wax+")):
                    return
            elif event in ("os.rename", "os.mkdir"):
                path = args[1] if event == "os.rename" else args[0]
            else:
                return
            if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(_watch):
                _log.write(os.fsdecode(path) + "\\n")

        sys.addaudithook(_hook)
    """
)


def tiny_settings(screen: Path, steps: int) -> dict:
    """A run config (as YAML mapping) training the tiny denoiser on the synthetic screen with B = 4, S = 16."""
    return {
        "seed": 7,
        "data": {"path": str(screen), "cell_type_key": "cell_type", "set_size": 16},
        "split": {"kind": "holdout_combination", "holdout": ["A+B"], "val_fraction": 0.3},
        "model": {"denoiser_params": {"size": "tiny", "hidden": 16, "depth": 1, "heads": 2}, "ema_decay": 0.9},
        "train": {
            "steps": steps, "batch_size": 4, "lr": 0.003, "warmup_steps": 2, "log_every": 1, "val_every": 2,
            "val_sampling_steps": 3, "checkpoint_every": 2, "context_drop_prob": 0.3, "device": "cpu",
        },
    }


def torchrun(config: Path, out: Path, audit: Path, *extra: str) -> None:
    """``torchrun --nproc_per_node 2 -m perturbdiff_core train CONFIG --out OUT`` with one thread per rank."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(audit), os.environ.get("PYTHONPATH", "")]),
        "WATCH_DIR": str(out.parent),
        "WRITES_DIR": str(audit),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "perturbdiff_core", "train", str(config), "--out", str(out), "--quiet", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_run(parallel: Path, single: Path) -> None:
    """Same weights (and EMA), same step, same logged losses in both run folders."""
    a, b = load_checkpoint(parallel / "checkpoints" / "last.pt"), load_checkpoint(single / "checkpoints" / "last.pt")
    assert a.step == b.step
    assert list(a.model_state) == list(b.model_state)  # no "module." prefix from DistributedDataParallel
    for key, value in b.model_state.items():
        torch.testing.assert_close(a.model_state[key], value, rtol=RTOL, atol=ATOL, msg=key)
    log_a, log_b = pd.read_csv(parallel / "train_log.csv"), pd.read_csv(single / "train_log.csv")
    assert list(log_a.step) == list(log_b.step)
    for column in ("loss", "mse", "mmd", "lr", "val_mmd"):
        torch.testing.assert_close(torch.tensor(log_a[column].values), torch.tensor(log_b[column].values),
                                   rtol=RTOL, atol=ATOL, equal_nan=True, msg=column)


def write_screen(tmp_path: Path, layout: str) -> Path:
    """The synthetic screen as one file, or cut by rows into three shards in a folder (a collection)."""
    adata = synthetic_screen(400, 50, seed=3)
    if layout == "file":
        adata.write_h5ad(tmp_path / "screen.h5ad")
        return tmp_path / "screen.h5ad"
    folder = tmp_path / "plates"
    folder.mkdir()
    for i, (start, stop) in enumerate([(0, 130), (130, 300), (300, 400)]):
        adata[start:stop].copy().write_h5ad(folder / f"plate{i}.h5ad")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["file", "shards"])
def test_two_cpu_ranks_train_and_resume_like_one_process(tmp_path: Path, layout: str) -> None:
    screen = write_screen(tmp_path, layout)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_settings(screen, steps=5)))
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(WRITE_AUDIT)
    runs = tmp_path / "runs"
    parallel, single = runs / "ddp", runs / "one"

    torchrun(config, parallel, audit, "--set", "train.steps=3")  # stops at step 3 ...
    Trainer(load_config(config, ["train.steps=3"]), single, progress=False).fit()
    assert_same_run(parallel, single)
    assert load_checkpoint(parallel / "checkpoints" / "last.pt").step == 3
    torchrun(config, parallel, audit, "--resume")  # ... and resumes to step 5 on both ranks
    Trainer(load_config(config), single, resume=True, progress=False).fit()
    assert_same_run(parallel, single)

    assert not (audit / "rank1.txt").exists() or (audit / "rank1.txt").read_text() == ""
    written = {Path(line).name for line in (audit / "rank0.txt").read_text().split()}
    assert {"config.yaml", "split.json", "data_state.json", "train_log.csv", "last.pt"} <= written
    assert sorted(p.name for p in parallel.rglob("*") if p.is_file()) == sorted(
        p.name for p in single.rglob("*") if p.is_file()
    )


def test_a_batch_size_not_divisible_by_the_processes_is_refused(tmp_path: Path, monkeypatch) -> None:
    screen = tmp_path / "screen.h5ad"
    synthetic_screen(200, 20, seed=1).write_h5ad(screen)
    config = load_config(None, [f"{k}={v}" for k, v in {"data.path": screen, "train.batch_size": 3}.items()])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="batch_size = 3 .* not divisible by 2"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_torchrun_launch_outside_train_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="torchrun"):
        Trainer(load_config(None, ["data.path=unused.h5ad"]), tmp_path / "run", progress=False)


def test_step_batch_parts_make_up_the_global_batch() -> None:
    whole = list(StepBatches(7, 4, seed=3, start=2, stop=9))
    parts = [list(StepBatches(7, 4, seed=3, start=2, stop=9, shard=(k, 2))) for k in range(2)]
    assert [a + b for a, b in zip(*parts)] == whole
    assert all(len(p) == 2 for part in parts for p in part)


def test_sharded_losses_average_to_the_global_loss_and_gradient() -> None:
    """Each part draws the global batch's t, noise, dropout and coin, sliced: mean of parts == whole, in float64."""
    g, b = 6, 4
    gen = torch.Generator().manual_seed(0)
    cond = Conditioning(
        control=torch.rand(b, 9, g, generator=gen, dtype=torch.float64) * 2,
        perturbation=torch.randn(b, 3, generator=gen, dtype=torch.float64),
        cell_type=torch.tensor([1, 2, 0, 1]),
        batch=torch.zeros(b, dtype=torch.long),
    )
    batch = SetBatch(torch.rand(b, 8, g, generator=gen, dtype=torch.float64) * 3, cond)
    denoiser = {"name": "cross_dit", "num_genes": g, "perturbation_dim": 3, "num_cell_types": 3, "num_batches": 1,
                "size": "tiny", "hidden": 16, "depth": 1, "heads": 2}
    model = RKHSDiffusion(denoiser, self_condition_prob=0.5, cond_drop_prob=0.5, ema_decay=None).double()
    with torch.no_grad():  # non-zero weights everywhere (the output layer starts at zero)
        for p in model.denoiser.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)

    def loss_and_grad(part: SetBatch, shard: tuple[int, int], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model.loss(part, torch.Generator().manual_seed(seed), shard=shard)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]

    def half(k: int) -> SetBatch:
        rows = slice(2 * k, 2 * k + 2)
        c = batch.cond
        return SetBatch(batch.target[rows], Conditioning(c.control[rows], c.perturbation[rows], c.cell_type[rows], c.batch[rows]))

    for seed in range(4):  # seeds with and without the self-conditioning coin
        whole, grads = loss_and_grad(batch, (0, 1), seed)
        (l0, g0), (l1, g1) = loss_and_grad(half(0), (0, 2), seed), loss_and_grad(half(1), (1, 2), seed)
        torch.testing.assert_close((l0 + l1) / 2, whole, rtol=1e-12, atol=0)
        for full, a, c in zip(grads, g0, g1):
            torch.testing.assert_close((a + c) / 2, full, rtol=1e-10, atol=1e-12)
