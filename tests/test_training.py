"""Trainer: run folder contents, learning-rate schedule, the training stream, exact resume, Ctrl-C, checkpoints."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from perturbdiff_core.data import DataConfig, EpochSampler, PerturbationData
from perturbdiff_core.data.batch import Conditioning, SetBatch
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.errors import ConfigError, OutputError, PerturbDiffError, PerturbDiffNote
from perturbdiff_core.mmd.functional import mmd2
from perturbdiff_core.runs.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_run_checkpoint,
    previous_path,
)
from perturbdiff_core.runs.config import RunConfig, TrainConfig, load_config
from perturbdiff_core.runs.summary import run_summary
from perturbdiff_core.runs.training import (
    AUTO_CONTEXT_DROP_PROB,
    LOG_COLUMNS,
    MAX_AUTO_WORKERS,
    StepBatches,
    Trainer,
    TrainingInterrupted,
    build_model,
    drop_context,
    lr_factor,
    make_optimizer,
    resolve_context_drop,
    resolve_device,
    resolve_workers,
    training_loader,
)
from perturbdiff_core.runs.transfer import load_init

#: A denoiser small enough for many short trainings in the test suite.
TINY_NET = "model.denoiser_params={size: tiny, hidden: 16, depth: 1, heads: 2}"

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="session")
def screen_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic screen on disk: 2 cell types x (A, B, C, A+B) and controls, 40 genes."""
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    synthetic_screen(600, 40, seed=3).write_h5ad(path)
    return path


def tiny_config(screen_path: Path, *overrides: str) -> RunConfig:
    """A run config training a tiny model on the synthetic screen for a few steps."""
    base = [
        f"data.path={screen_path}",
        "data.cell_type_key=cell_type",
        "data.set_size=12",
        "split.kind=holdout_combination",
        "split.holdout=[A+B]",
        "split.val_fraction=0.3",
        TINY_NET,
        "model.ema_decay=0.9",
        "train.steps=8",
        "train.batch_size=3",
        "train.lr=0.003",
        "train.warmup_steps=2",
        "train.log_every=2",
        "train.val_every=4",
        "train.val_sampling_steps=4",
        "train.checkpoint_every=4",
        "train.context_drop_prob=0.3",
        "train.device=cpu",
        "sample.steps=5",
        "evaluate.max_cells=60",
        "seed=5",
    ]
    return load_config(None, [*base, *overrides])


def states_equal(a: dict, b: dict) -> bool:
    """Nested state dicts (tensors, numbers, lists, dicts) equal exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------- schedule and stream


def test_lr_rises_linearly_then_follows_a_half_cosine_to_zero() -> None:
    warmup, total = 10, 110
    factors = np.array([lr_factor(k, warmup, total) for k in range(total)])
    np.testing.assert_allclose(factors[:warmup], np.arange(1, warmup + 1) / warmup)
    progress = (np.arange(warmup, total) - warmup) / (total - warmup)
    np.testing.assert_allclose(factors[warmup:], 0.5 * (1 + np.cos(np.pi * progress)))
    assert factors[warmup] == 1.0 and factors[warmup + 50] == pytest.approx(0.5) and factors[-1] < 1e-3
    assert lr_factor(0, 0, 5) == 1.0  # no warm-up


def test_optimizer_is_fused_adamw_following_its_closed_form() -> None:
    """Three steps of the Trainer's optimizer on random float64 weights and gradients against the
    AdamW update written out (decoupled weight decay, bias-corrected moments)."""
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(11, generator=gen, dtype=torch.float64)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    train = TrainConfig(lr=0.01, weight_decay=0.1)
    optimizer = make_optimizer(params, train)
    assert optimizer.defaults["fused"]
    (b1, b2), eps = optimizer.defaults["betas"], optimizer.defaults["eps"]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    for step in range(1, 4):
        grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**step), v[i] / (1 - b2**step)
            weights[i] = weights[i] * (1 - train.lr * train.weight_decay) - train.lr * m_hat / (v_hat.sqrt() + eps)
    for p, w in zip(params, weights):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_step_batches_walk_through_epoch_orders_from_any_step() -> None:
    n, b, seed = 7, 3, 11
    epochs = EpochSampler(n, seed=seed)
    flat = [key for _ in range(6) for key in epochs]  # six epochs in EpochSampler's own order
    full = list(StepBatches(n, b, seed=seed, start=0, stop=12))
    assert full == [flat[i * b:(i + 1) * b] for i in range(12)]
    assert list(StepBatches(n, b, seed=seed, start=5, stop=12)) == full[5:]
    assert sorted(k[1] for k in flat[:n]) == list(range(n))  # an epoch visits each item once
    assert len(StepBatches(n, b, seed=seed, start=4, stop=9)) == 5


def test_build_model_sizes_the_denoiser_for_the_data(screen_path: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(screen_path), tmp_path / "run", progress=False)
    net = trainer.model.denoiser
    assert net.num_genes == 40 and net.perturbation_dim == trainer.data.encoder.dim
    assert net.num_cell_types == 3  # <unknown>, t1, t2
    config = tiny_config(screen_path, "model.denoiser_params={size: tiny, num_genes: 5}")
    with pytest.raises(ConfigError, match="num_genes"):
        build_model(config.model, trainer.data)


def test_a_batch_maps_every_tensor_and_keeps_its_labels() -> None:
    gen = torch.Generator().manual_seed(2)
    cond = Conditioning(torch.randn(2, 3, 4, generator=gen), torch.randn(2, 5, generator=gen), torch.tensor([1, 2]), torch.tensor([0, 1]))
    batch = SetBatch(torch.randn(2, 3, 4, generator=gen), cond, ["a", "b"])
    tensors = [batch.target, cond.control, cond.perturbation, cond.cell_type, cond.batch]
    doubled = batch.map_tensors(lambda t: 2 * t)
    mapped = [doubled.target, doubled.cond.control, doubled.cond.perturbation, doubled.cond.cell_type, doubled.cond.batch]
    assert all(torch.equal(m, 2 * t) for m, t in zip(mapped, tensors)) and doubled.condition == ["a", "b"]
    first = cond.map_tensors(lambda t: t[:1])  # e.g. the predictor's chunks of sets
    assert [t.shape[0] for t in (first.control, first.perturbation, first.cell_type, first.batch)] == [1, 1, 1, 1]


def test_drop_context_sets_unknown_indices_at_the_given_rate() -> None:
    n = 20_000
    cond = Conditioning(torch.zeros(n, 1, 2), torch.zeros(n, 3), torch.randint(1, 5, (n,)), torch.randint(1, 3, (n,)))
    batch = SetBatch(torch.zeros(n, 1, 2), cond)
    dropped = drop_context(batch, 0.3, torch.Generator().manual_seed(0)).cond
    for before, after in ((cond.cell_type, dropped.cell_type), (cond.batch, dropped.batch)):
        zero = after == 0
        assert torch.equal(after[~zero], before[~zero])  # the rest untouched
        assert abs(zero.float().mean().item() - 0.3) < 0.015  # binomial sd ~0.003
    both = ((dropped.cell_type == 0) & (dropped.batch == 0)).float().mean().item()
    assert abs(both - 0.09) < 0.01  # independent draws for cell type and batch
    assert torch.equal(cond.cell_type, batch.cond.cell_type)  # the input batch is not modified
    assert drop_context(batch, 0.0, torch.Generator()).cond.cell_type.min() >= 1


# ----------------------------------------------------------------------------- a run folder


def test_training_writes_the_run_folder(screen_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(screen_path), run, progress=False)
    log = trainer.fit()
    for name in ("config.yaml", "split.json", "data_state.json", "train_log.csv", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert not [p for p in run.rglob("*.tmp")], "a temporary file was left behind"
    assert list(log.columns) == list(LOG_COLUMNS)
    assert log.step.tolist() == [2, 4, 6, 8]
    assert log.val_mmd.notna().tolist() == [False, True, False, True]
    written = pd.read_csv(run / "train_log.csv")
    pd.testing.assert_frame_equal(written, log, check_dtype=False)
    losses = [r["loss"] for r in trainer.history]
    assert len(losses) == 8 and np.isfinite(losses).all()
    np.testing.assert_allclose(log.loss, [np.mean(losses[i:i + 2]) for i in range(0, 8, 2)], rtol=1e-12)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint.step == 8 and checkpoint.complete
    assert checkpoint.split.test == ["A+B|t1", "A+B|t2"]
    assert checkpoint.data_state["genes"] == trainer.data.genes
    assert checkpoint.run_config == trainer.config


def test_validation_mmd_is_the_mmd_of_sampled_to_real_validation_sets(screen_path: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(screen_path), tmp_path / "run", progress=False)
    trainer.fit(stop_at=4)
    model, generator = trainer.model, torch.Generator().manual_seed(trainer.config.seed)
    expected = []
    for batch in trainer.val_loader:
        sampled = model.sample(batch.cond, steps=4, generator=generator)
        expected.append(mmd2(sampled, batch.target, kernel="energy", estimator="unbiased"))
    assert trainer.validation[4] == pytest.approx(torch.cat(expected).mean().item(), rel=1e-5)


def test_training_lowers_the_loss(screen_path: Path, tmp_path: Path) -> None:
    # origin=set: with per-cell origins the target is a difference of two unpaired cells, mostly noise to a 40-step model
    config = tiny_config(screen_path, "train.steps=40", "train.log_every=10", "train.val_every=0", "train.lr=0.01",
                         "model.origin=set")
    log = Trainer(config, tmp_path / "run", progress=False).fit()
    assert log.loss.iloc[-1] < 0.7 * log.loss.iloc[0]


def test_fresh_training_refuses_a_trained_folder(screen_path: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(screen_path), tmp_path / "run", progress=False).fit(stop_at=1)
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config(screen_path), tmp_path / "run", progress=False)


def test_a_device_this_torch_lacks_is_a_config_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"train.device = 'cuda', but this torch is a CPU-only build; use train.device=auto"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"--device = 'cuda:1', but this torch"):
        resolve_device("cuda:1", option="--device")
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


def test_a_non_finite_loss_stops_with_a_clear_error(screen_path: Path, tmp_path: Path, monkeypatch) -> None:
    trainer = Trainer(tiny_config(screen_path), tmp_path / "run", progress=False)
    monkeypatch.setattr(trainer.model, "loss", lambda batch, generator: {"loss": torch.tensor(math.nan)})
    with pytest.raises(PerturbDiffError, match="train.lr"):
        trainer.fit()


def test_a_diverging_run_is_blamed_on_the_learning_rate_not_on_the_data(screen_path: Path, tmp_path: Path) -> None:
    """At lr 1e30 the weights blow up after one step and the model predicts NaN or Inf: the estimator's
    check of its input must not surface as "x contains NaN ... remove or impute them"."""
    trainer = Trainer(tiny_config(screen_path, "train.lr=1e30", "train.val_every=0"), tmp_path / "run", progress=False)
    with pytest.raises(PerturbDiffError) as err:
        trainer.fit()
    message = str(err.value)
    assert "The training loss became nan" in message and "lower train.lr (now 1e+30)" in message
    assert "impute" not in message


def test_validation_samples_that_overflow_are_a_diverged_model(screen_path: Path, tmp_path: Path, monkeypatch) -> None:
    trainer = Trainer(tiny_config(screen_path), tmp_path / "run", progress=False)
    monkeypatch.setattr(trainer.model, "sample", lambda cond, **kw: torch.full_like(cond.control, math.inf))
    with pytest.raises(PerturbDiffError, match="validation samples became NaN or Inf.*diverged.*train.lr"):
        trainer.validate()


# ----------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def uninterrupted(screen_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(screen_path), tmp_path_factory.mktemp("straight") / "run", progress=False)
    trainer.fit()
    return trainer


def assert_same_run(a: Trainer, b: Trainer) -> None:
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert a.history == b.history and a.validation == b.validation
    assert states_equal(a.model.state_dict(), b.model.state_dict())  # weights and EMA
    assert states_equal(a.optimizer.state_dict(), b.optimizer.state_dict())
    pd.testing.assert_frame_equal(a.log(), b.log())


@pytest.mark.parametrize("stop_at", [3, 4])
def test_resume_equals_uninterrupted_training(uninterrupted: Trainer, screen_path: Path, tmp_path: Path, stop_at: int) -> None:
    config = tiny_config(screen_path)
    first = Trainer(config, tmp_path / "run", progress=False)
    first.fit(stop_at=stop_at)
    assert load_checkpoint(checkpoint_path(tmp_path / "run")).step == stop_at
    resumed = Trainer(config, tmp_path / "run", resume=True, progress=False)
    assert resumed.step == stop_at
    resumed.fit()
    assert_same_run(uninterrupted, resumed)


def test_workers_train_the_same_run(uninterrupted: Trainer, screen_path: Path, tmp_path: Path) -> None:
    assert resolve_workers(uninterrupted.config.train.num_workers, uninterrupted.device) == 0  # auto on a CPU
    with_workers = Trainer(tiny_config(screen_path, "train.num_workers=2"), tmp_path / "run", progress=False)
    with_workers.fit()
    assert_same_run(uninterrupted, with_workers)


def test_auto_workers_are_none_on_a_cpu_and_a_few_per_gpu_process(monkeypatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_workers("auto", cpu) == 0 and resolve_workers(3, cpu) == 3 and resolve_workers(3, gpu) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert resolve_workers("auto", gpu) == MAX_AUTO_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes share the 16 cores
    assert resolve_workers("auto", gpu) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_workers("auto", gpu) == 0  # one core: the training process builds the batches


def test_training_loader_pins_batches_for_a_gpu(uninterrupted: Trainer) -> None:
    train = TrainConfig(batch_size=3, num_workers=0)
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        loader = training_loader(uninterrupted.train_sets, train, seed=0, start=0, stop=2, device=device)
        assert loader.pin_memory is pinned and loader.num_workers == 0 and len(loader) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory, asynchronous copies)")
def test_pinned_batches_reach_the_gpu_unchanged(uninterrupted: Trainer) -> None:
    train = TrainConfig(batch_size=3, num_workers=1)
    batch = next(iter(training_loader(uninterrupted.train_sets, train, seed=0, start=0, stop=1, device=torch.device("cuda"))))
    tensors = [batch.target, batch.cond.control, batch.cond.perturbation, batch.cond.cell_type, batch.cond.batch]
    assert all(t.is_pinned() for t in tensors)
    moved = batch.to("cuda", non_blocking=True)
    moved_tensors = [moved.target, moved.cond.control, moved.cond.perturbation, moved.cond.cell_type, moved.cond.batch]
    assert all(t.is_cuda and torch.equal(t.cpu(), s) for t, s in zip(moved_tensors, tensors))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_gpu_with_auto_workers(screen_path: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(screen_path, "train.device=cuda"), tmp_path / "run", progress=False)
    assert trainer.device.type == "cuda" and trainer.config.train.num_workers == "auto"
    trainer.fit()
    assert len(trainer.history) == 8 and all(math.isfinite(r["loss"]) for r in trainer.history)
    assert load_checkpoint(checkpoint_path(tmp_path / "run")).step == 8


def test_ctrl_c_saves_the_last_step_and_resumes_exactly(uninterrupted: Trainer, screen_path: Path, tmp_path: Path) -> None:
    config = tiny_config(screen_path)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    step = trainer._train_step

    def interrupted_step(batch):
        if trainer.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the step still completes
        return step(batch)

    trainer._train_step = interrupted_step
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run as a background job
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit()
    assert stop.value.step == 6 and load_checkpoint(stop.value.path).step == 6
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = Trainer(config, tmp_path / "run", resume=True, progress=False)
    resumed.fit()
    assert_same_run(uninterrupted, resumed)


def test_sigterm_saves_the_last_step_like_ctrl_c(uninterrupted: Trainer, screen_path: Path, tmp_path: Path) -> None:
    config = tiny_config(screen_path)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    step = trainer._train_step

    def terminated_step(batch):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(batch)

    trainer._train_step = terminated_step
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="terminated at step 3") as stop:
        trainer.fit()
    assert stop.value.signum == signal.SIGTERM and stop.value.status == 143
    assert load_checkpoint(stop.value.path).step == 3
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = Trainer(config, tmp_path / "run", resume=True, progress=False)
    resumed.fit()
    assert_same_run(uninterrupted, resumed)


def test_resume_refuses_a_changed_training_stream_but_allows_more_steps(screen_path: Path, tmp_path: Path) -> None:
    Trainer(tiny_config(screen_path), tmp_path / "run", progress=False).fit(stop_at=2)
    with pytest.raises(ConfigError, match="model.mmd_weight"):
        Trainer(tiny_config(screen_path, "model.mmd_weight=0.5"), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ConfigError, match="seed"):
        Trainer(tiny_config(screen_path, "seed=6"), tmp_path / "run", resume=True, progress=False)
    longer = Trainer(tiny_config(screen_path, "train.steps=10", "train.num_workers=0"), tmp_path / "run", resume=True, progress=False)
    longer.fit()
    assert longer.step == 10


def test_auto_context_dropout_trains_the_unknown_context_only_when_the_test_needs_it(
    screen_path: Path, tmp_path: Path
) -> None:
    held_type = tiny_config(screen_path, "split.kind=holdout_cell_type", "split.holdout=[t2]", "train.context_drop_prob=auto")
    trainer = Trainer(held_type, tmp_path / "type", progress=False)
    assert trainer.data.unseen_contexts(trainer.split.test) == ["t2"]
    assert trainer.context_drop_prob == AUTO_CONTEXT_DROP_PROB
    assert load_config(tmp_path / "type" / "config.yaml").train.context_drop_prob == "auto"  # the rule, as asked
    assert "context dropout 0.2 (unseen in training: t2)" in "\n".join(run_summary(trainer))
    trainer.fit(stop_at=2)
    resumed = Trainer(held_type, tmp_path / "type", resume=True, progress=False)  # "auto" again: the same run
    assert resumed.context_drop_prob == AUTO_CONTEXT_DROP_PROB and resumed.step == 2

    combination = Trainer(tiny_config(screen_path, "train.context_drop_prob=auto"), tmp_path / "combo", progress=False)
    assert combination.data.unseen_contexts(combination.split.test) == []  # A+B in t1 and t2, both trained
    assert combination.context_drop_prob == 0.0
    assert "context dropout" not in "\n".join(run_summary(combination))
    assert resolve_context_drop(0.3, combination.data, combination.split.test) == 0.3  # a number is kept


def test_unseen_contexts_follow_the_fitted_vocabularies(screen_path: Path) -> None:
    data = PerturbationData(ad.read_h5ad(screen_path), DataConfig(perturbation_key="perturbation", cell_type_key="cell_type"))
    data.fit(["A|t1", "B|t1"])
    assert data.unseen_contexts(["A|t1", "A|t2", "C|t2"]) == ["t2"]
    untyped = PerturbationData(ad.read_h5ad(screen_path), DataConfig(perturbation_key="perturbation"))
    untyped.fit(["A"])
    assert untyped.unseen_contexts(["B"]) == []  # no cell type key: every set is <unknown> in training too


# ----------------------------------------------------------------------------- checkpoint errors


def test_checkpoint_errors_are_clear(screen_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    trainer = Trainer(tiny_config(screen_path), tmp_path / "run", progress=False)
    trainer.fit(stop_at=1)
    good = checkpoint_path(tmp_path / "run").read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "text.pt"
    text.write_text("hello")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "obj": Path("x")}, pickled)  # arbitrary objects are refused
    for path in (truncated, text, pickled):
        with pytest.raises(CheckpointError, match="corrupt"):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a perturbdiff checkpoint"):
        load_checkpoint(foreign)

    payload = torch.load(checkpoint_path(tmp_path / "run"), weights_only=True)
    future = tmp_path / "future.pt"
    torch.save({**payload, "format": "perturbdiff.checkpoint/99", "version": "9.0.0"}, future)
    with pytest.raises(CheckpointError, match=r"9\.0\.0"):
        load_checkpoint(future)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in payload.items() if k != "optimizer_state"}, partial)
    with pytest.raises(CheckpointError, match="optimizer_state"):
        load_checkpoint(partial)


def test_the_previous_checkpoint_is_kept_and_used_when_the_last_is_damaged(
    uninterrupted: Trainer, screen_path: Path, tmp_path: Path
) -> None:
    """A truncated or zero-byte last.pt (a disk error, a copy cut short) must not be the end of a run."""
    run = tmp_path / "run"
    Trainer(tiny_config(screen_path), run, progress=False).fit(stop_at=6)  # checkpoints at steps 4 and 6
    assert load_checkpoint(checkpoint_path(run)).step == 6 and load_checkpoint(previous_path(run)).step == 4
    for damage in (lambda b: b[: len(b) // 2], lambda b: b""):
        good = checkpoint_path(run).read_bytes()
        checkpoint_path(run).write_bytes(damage(good))
        with pytest.raises(CheckpointError, match="corrupt, truncated"):  # the strict reader: one line, no IndexError
            load_checkpoint(checkpoint_path(run))
        with pytest.warns(PerturbDiffNote, match=r"last.pt cannot be used .*previous.pt \(step 4\)"):
            assert load_run_checkpoint(run).step == 4
        with pytest.warns(PerturbDiffNote):
            assert load_init(run).step == 4  # --init-from a run folder falls back too
        checkpoint_path(run).write_bytes(good)
    checkpoint_path(run).write_bytes(b"")
    with pytest.warns(PerturbDiffNote):
        resumed = Trainer(tiny_config(screen_path), run, resume=True, progress=False)
    assert resumed.step == 4
    resumed.fit()
    assert_same_run(uninterrupted, resumed)  # nothing lost but the steps after the previous checkpoint
    assert load_checkpoint(previous_path(run)).step == 4  # the damaged file was not rotated over it
    with pytest.raises(ConfigError, match="--resume"):
        checkpoint_path(run).unlink()
        Trainer(tiny_config(screen_path), run, progress=False)  # previous.pt alone is a trained run too


def test_a_failed_checkpoint_write_keeps_both_checkpoints(screen_path: Path, tmp_path: Path, monkeypatch) -> None:
    """torch's writer reports a full disk as RuntimeError [enforce fail at inline_container.cc]: one line
    naming the file and "free space", and the checkpoints already on disk unchanged."""
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(screen_path), run, progress=False)
    trainer.fit(stop_at=6)
    before = {p.name: p.read_bytes() for p in (checkpoint_path(run), previous_path(run))}

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OutputError, match=rf"Cannot write {checkpoint_path(run)}: .*inline_container.*free space"):
        trainer.fit()
    assert {p.name: p.read_bytes() for p in (checkpoint_path(run), previous_path(run))} == before
    assert not list(run.rglob("*.tmp"))


def test_checkpoint_rebuilds_the_trained_model(screen_path: Path, tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(screen_path), tmp_path / "run", progress=False)
    trainer.fit(stop_at=3)
    model = load_checkpoint(checkpoint_path(tmp_path / "run")).build_model()
    assert model.config() == trainer.model.config()
    assert states_equal(model.state_dict(), trainer.model.state_dict())




def test_a_run_records_where_its_plugins_came_from(screen_path: Path, tmp_path: Path) -> None:
    """plugins.yaml beside config.yaml and the same records in the checkpoint; a checkpoint whose plug-ins
    differ from the installed ones (distribution or version) loads with one warning naming them."""
    import yaml

    from perturbdiff_core import __version__
    from perturbdiff_core.errors import PerturbDiffWarning
    from perturbdiff_core.runs.config import PLUGINS_FILE, config_from_dict

    run = tmp_path / "run"
    config = tiny_config(screen_path)
    Trainer(config, run, progress=False).fit(stop_at=1)
    records = yaml.safe_load((run / PLUGINS_FILE).read_text())
    builtin = {"distribution": "perturbdiff", "version": __version__}
    assert records["model.kernel"] == {"group": "perturbdiff.kernels", "name": "energy", **builtin}
    assert records["model.denoiser"] == {"group": "perturbdiff.denoisers", "name": "cross_dit", **builtin}
    assert records["data.encoder"]["name"] == "onehot"
    assert [r["name"] for r in records["evaluate.baselines"]] == config.evaluate.baselines
    assert "model.anchor" not in records  # none names no plug-in
    assert config_from_dict(yaml.safe_load((run / "config.yaml").read_text())) == config  # still a config, unchanged

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PerturbDiffWarning)
        checkpoint = load_checkpoint(checkpoint_path(run))
    assert checkpoint.plugins == records

    payload = torch.load(checkpoint_path(run), weights_only=True)
    payload["plugins"]["model.kernel"] = {**records["model.kernel"], "version": "0.0.1"}
    payload["plugins"]["model.schedule"] = {**records["model.schedule"], "distribution": "perturbdiff-schedules"}
    payload["plugins"]["model.estimator"] = {**records["model.estimator"], "name": "perturbdiff-gone:unbiased"}
    changed = tmp_path / "changed.pt"
    torch.save(payload, changed)
    with pytest.warns(PerturbDiffWarning) as caught:
        load_checkpoint(changed)
    (message,) = [str(w.message) for w in caught if issubclass(w.category, PerturbDiffWarning)]
    assert "\n" not in message and str(changed) in message
    assert f"model.kernel 'energy' came from perturbdiff 0.0.1, now from perturbdiff {__version__}" in message
    assert f"model.schedule 'cosine' came from perturbdiff-schedules {__version__}, now from perturbdiff" in message
    assert "model.estimator 'perturbdiff-gone:unbiased' came from perturbdiff" in message and "does not resolve now" in message

    old = tmp_path / "old.pt"  # written before plug-ins were recorded
    torch.save({k: v for k, v in payload.items() if k != "plugins"}, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerturbDiffWarning)
        assert load_checkpoint(old).plugins == {}


def test_model_control_levels_reaches_the_model(screen_path: Path, tmp_path: Path) -> None:
    """A named value reaches the model as it is; ``auto`` on held-out combinations (their contexts are
    trained) is ``centred``, with no line in the run summary."""
    from perturbdiff_core.runs.config import config_from_dict
    from perturbdiff_core.runs.training import PLACEHOLDER_SIZES, _model

    assert config_from_dict({}).model.control_levels == "auto"
    with pytest.raises(ConfigError, match="resolve it first"):
        _model(config_from_dict({}).model, PLACEHOLDER_SIZES)
    config = config_from_dict({"model": {"control_levels": "absolute"}})
    assert _model(config.model, PLACEHOLDER_SIZES).control_levels == "absolute"
    combination = Trainer(tiny_config(screen_path, "model.control_levels=auto"), tmp_path / "combo", progress=False)
    assert combination.model.control_levels == "centred"
    assert "control cells read" not in "\n".join(run_summary(combination))


@pytest.mark.parametrize("margin", [-0.01, 0.01])
def test_auto_control_levels_read_a_held_out_context_at_hull_levels_only_when_the_hull_explains_it(
    tmp_path: Path, monkeypatch, margin: float
) -> None:
    """``auto`` with a held-out cell type: the share of its control mean the training cell types' hull
    explains, computed from the training contexts' and its own controls, decides against the threshold."""
    from perturbdiff_core.diffusion.hull import explained_by_hull
    from perturbdiff_core.runs import levels

    path = tmp_path / "three.h5ad"
    synthetic_screen(600, 40, cell_types=("t1", "t2", "t3"), seed=4).write_h5ad(path)
    config = tiny_config(path, "split.kind=holdout_cell_type", "split.holdout=[t3]", "model.control_levels=auto")
    trainer = Trainer(config, tmp_path / "probe", progress=False)
    data = trainer.data
    means = {c.cell_type: torch.from_numpy(data.read(data.control_cells(c)).mean(0, dtype=np.float64)) for c in data.contexts}
    share = float(explained_by_hull(means["t3"][None], torch.stack([means["t1"], means["t2"]]))[0])
    assert 0 < share < 1
    monkeypatch.setattr(levels, "AUTO_HULL_MIN_EXPLAINED", share + margin)
    resolved = levels.resolve_control_levels("auto", data, trainer.split, seed=5)
    assert resolved.explained == pytest.approx({"t3": share})
    assert resolved.name == ("hull" if margin < 0 else "centred")
    if margin < 0:
        torch.testing.assert_close(resolved.vertices, torch.stack([means["t1"], means["t2"]]))
        trained = Trainer(config, tmp_path / "run", progress=False)
        assert trained.model.control_levels == "hull"
        expected = f"control cells read hull (auto: the training contexts' control means explain {share:.0%} of t3's; hull needs {share + margin:.0%})"
        assert expected in "\n".join(run_summary(trained))


def test_hull_context_levels_come_from_the_training_contexts_only(screen_path: Path, tmp_path: Path) -> None:
    """model.control_levels: hull fits one control mean per training context, so the held-out cell type's
    controls never shape the hull; the checkpoint carries the means and a resumed run keeps them."""
    config = tiny_config(screen_path, "split.kind=holdout_cell_type", "split.holdout=[t2]", "model.control_levels=hull")
    trainer = Trainer(config, tmp_path / "run", progress=False)
    data = trainer.data
    trained = {data.condition(c).context for c in trainer.split.train}
    assert [c.cell_type for c in trained] == ["t1"]
    expected = np.stack([data.read(data.control_cells(c)).mean(0, dtype=np.float64) for c in trained])
    torch.testing.assert_close(trainer.model.context_levels, torch.from_numpy(expected).float())
    held_out = data.read(data.control_cells(next(c for c in data.contexts if c.cell_type == "t2"))).mean(0)
    assert not np.allclose(trainer.model.context_levels[0].numpy(), held_out)
    trainer.fit(stop_at=2)
    rebuilt = load_checkpoint(checkpoint_path(tmp_path / "run")).build_model()
    torch.testing.assert_close(rebuilt.context_levels, trainer.model.context_levels)
    resumed = Trainer(config, tmp_path / "run", resume=True, progress=False)
    torch.testing.assert_close(resumed.model.context_levels, trainer.model.context_levels)
