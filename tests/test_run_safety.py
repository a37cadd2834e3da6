"""Faults a run meets in the wild, each handled in one line or correctly, and never at the cost of an
earlier result: SIGTERM, SIGKILL, two runs into one folder, a full disk, a read-only file system.

The runs here are real ``perturbdiff`` processes (``python -m perturbdiff_core``) signalled from the
test; disk faults use a tiny tmpfs, which only root can mount (the tests skip with that reason otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from test_cli import assert_one_line_error
from test_training import TINY_NET

from perturbdiff_core.cli import DEBUG_ENV, main
from perturbdiff_core.data.synthetic import synthetic_screen
from perturbdiff_core.runs.checkpoint import checkpoint_path, load_checkpoint, previous_path
from perturbdiff_core.runs.folder import LOCK_FILE

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

#: Seconds a subprocess gets to start training (imports, data) and to stop.
TIMEOUT = 120


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that would train for hours: the tests stop it."""
    folder = tmp_path_factory.mktemp("safety")
    synthetic_screen(600, 40, seed=3).write_h5ad(folder / "screen.h5ad")
    config = {
        "seed": 2,
        "data": {"path": str(folder / "screen.h5ad"), "cell_type_key": "cell_type", "set_size": 12},
        "split": {"kind": "holdout_combination", "holdout": ["A+B"], "val_fraction": 0.3},
        "model": {"ema_decay": 0.9, "denoiser_params": yaml.safe_load(TINY_NET.partition("=")[2])},
        "train": {"steps": 1_000_000, "batch_size": 3, "lr": 0.003, "warmup_steps": 1, "log_every": 2, "val_every": 0,
                  "checkpoint_every": 2, "device": "cpu"},
        "sample": {"steps": 3},
        "evaluate": {"baselines": ["control"], "max_cells": 60},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(*args: str) -> subprocess.Popen[str]:
    """``perturbdiff ARGS`` in a new process (one thread, no debug tracebacks)."""
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "perturbdiff_core", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    """Poll ``condition`` until it holds; fail with the process's output if it ends or times out first."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{what} never happened (exit {proc.returncode}): {err[-2000:]}")
        time.sleep(0.1)


def checkpointed(run: Path) -> Callable[[], bool]:
    """A readable last.pt exists (the run has taken a few steps)."""
    return lambda: checkpoint_path(run).is_file() and load_step(run) >= 2


def load_step(run: Path) -> int:
    try:
        return load_checkpoint(checkpoint_path(run)).step
    except Exception:  # noqa: BLE001 - being replaced right now
        return 0


def stop(proc: subprocess.Popen[str], signum: int) -> tuple[int, str]:
    """Send ``signum`` and wait: the exit status and stderr."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


# ----------------------------------------------------------------------------------- signals


def test_sigterm_saves_a_checkpoint_exits_143_and_says_how_to_resume(config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start("train", str(config_file), "--out", str(run), "--quiet")
    wait_for(checkpointed(run), proc, "a first checkpoint")
    code, err = stop(proc, signal.SIGTERM)
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    step = load_checkpoint(checkpoint_path(run)).step
    assert last == (
        f"perturbdiff: terminated at step {step}; checkpoint saved to {checkpoint_path(run)}; resume with: "
        f"perturbdiff train {run / 'config.yaml'} --out {run} --resume"
    )
    assert not (run / LOCK_FILE).exists() and not list(run.rglob("*.tmp"))
    assert main(["train", str(run / "config.yaml"), "--out", str(run), "--resume", "--quiet", "--set", f"train.steps={step + 1}"]) == 0
    assert load_checkpoint(checkpoint_path(run)).step == step + 1


def test_a_killed_run_resumes_taking_over_its_lock_and_removing_its_temporary_files(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    proc = start("train", str(config_file), "--out", str(run), "--quiet")
    wait_for(checkpointed(run), proc, "a first checkpoint")
    code, _ = stop(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind by the kill
    orphan = run / "checkpoints" / ".last.pt.k1ll3d.tmp"  # what a kill during a checkpoint write leaves
    orphan.write_bytes(b"PK half a checkpoint")
    step = load_checkpoint(checkpoint_path(run)).step
    capsys.readouterr()
    assert main(["train", str(run / "config.yaml"), "--out", str(run), "--resume", "--quiet", "--set", f"train.steps={step + 1}"]) == 0
    err = capsys.readouterr().err
    assert f"perturbdiff: note: took over the lock of {run} from a run that ended without releasing it (pid {proc.pid}" in err
    # ours, and any the kill itself left mid-write (checkpoints come every 2 steps here)
    assert re.search(r"perturbdiff: note: removed [1-9]\d* temporary file\(s\) an interrupted run left", err)
    assert not orphan.exists() and not list(run.rglob("*.tmp")) and not (run / LOCK_FILE).exists()
    assert load_checkpoint(checkpoint_path(run)).step == step + 1


# ------------------------------------------------------------------------- two runs at once


@pytest.mark.parametrize("command", ["train", "run"])
def test_a_second_run_into_a_busy_folder_is_refused_naming_the_first(
    command: str, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    proc = start(command, str(config_file), "--out", str(run), "--quiet")
    wait_for(checkpointed(run), proc, "a first checkpoint")
    try:
        for extra in ([], ["--resume"]):
            code = main([command, str(config_file), "--out", str(run), "--quiet", *extra])
            assert_one_line_error(code, capsys.readouterr().err, f"{run} is in use by another perturbdiff run (pid {proc.pid} on host")
    finally:
        code, err = stop(proc, signal.SIGTERM)
    assert code == 143, err  # the first run was not disturbed: it stops cleanly and its checkpoint reads
    assert load_checkpoint(checkpoint_path(run)).step >= 2


# --------------------------------------------------------------------------------- disk faults


@contextlib.contextmanager
def tiny_fs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (skips where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill or make read-only needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill ``folder``'s file system, leaving about ``leave`` bytes free; returns the filler file."""
    reserve = folder / "reserve"
    reserve.write_bytes(bytes(leave))
    filler = folder / "filler"
    with filler.open("wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(bytes(1 << 16))
                f.flush()
    with contextlib.suppress(OSError):  # the last block may not fit in 64 KiB steps
        with filler.open("ab") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
    reserve.unlink()
    return filler


def test_a_full_disk_is_one_line_naming_the_file_and_loses_no_checkpoint(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tiny_fs(tmp_path / "disk", "16m") as disk:
        run = disk / "run"
        argv = ["train", str(config_file), "--out", str(run), "--quiet", "--set", "train.steps=4"]
        assert main(argv) == 0
        before = {p: p.read_bytes() for p in (checkpoint_path(run), previous_path(run))}
        filler = fill(disk, leave=48 * 1024)  # room for the lock, the config and the log, not a checkpoint
        capsys.readouterr()
        code = main([*argv[:-1], "train.steps=6", "--resume"])
        assert_one_line_error(code, capsys.readouterr().err, f"Cannot write {checkpoint_path(run)}", "free space")
        assert {p: p.read_bytes() for p in before} == before  # the checkpoints on disk are untouched
        assert load_checkpoint(checkpoint_path(run)).step == 4 and not list(run.rglob("*.tmp"))
        assert not (run / LOCK_FILE).exists()

        filler.unlink()
        fill(disk)  # nothing left at all
        code = main(["predict", "--run", str(run), "--device", "cpu", "--out", str(disk / "pred.h5ad")])
        assert_last_line_error(code, capsys.readouterr().err, f"Cannot write {disk / 'pred.h5ad'}: No space left on device; free space")
        code = main(["predict", "--run", str(run), "--device", "cpu"])
        assert_last_line_error(code, capsys.readouterr().err, "No space left on device; free space")
        code = main(["etest", str(config_file.parent / "screen.h5ad"), "--kernel", "energy", "--permutations", "9",
                     "--out", str(disk / "results.csv")])
        assert_last_line_error(code, capsys.readouterr().err, f"Cannot write {disk / 'results.csv'}: No space left on device; free space")
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "run"]  # no half-written file anywhere
        assert load_checkpoint(checkpoint_path(run)).step == 4


def test_a_read_only_file_system_is_one_line_and_leaves_nothing(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tiny_fs(tmp_path / "ro", "1m", "ro") as disk:
        for argv in (
            ["train", str(config_file), "--out", str(disk / "run"), "--quiet"],
            ["etest", str(config_file.parent / "screen.h5ad"), "--permutations", "9", "--out", str(disk / "r.csv")],
        ):
            code = main(argv)
            assert_one_line_error(code, capsys.readouterr().err, "Cannot write", "read-only", "writable folder")
        assert list(disk.iterdir()) == []


def assert_last_line_error(code: int, err: str, *fragments: str) -> None:
    """As ``assert_one_line_error`` for a command that showed a progress bar before the error line."""
    assert_one_line_error(code, err.strip().splitlines()[-1], *fragments)
    assert "Traceback" not in err


def test_a_write_error_is_told_in_the_systems_words() -> None:
    """h5py fills strerror with a page of diagnostics; the one line keeps the system's short reason."""
    from perturbdiff_core.io import output_error

    noisy = OSError(errno.ENOSPC, "Unable to synchronously create file (file write failed: time = ..., errno = 28, ...)")
    assert str(output_error("x.h5ad", noisy)) == "Cannot write x.h5ad: No space left on device; free space on that disk (or write elsewhere) and run again."
