"""RunFolder: one run per folder (flock), stale locks taken over, orphans removed, refused runs leave nothing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from perturbdiff_core.errors import OutputError, PerturbDiffNote
from perturbdiff_core.runs.folder import LOCK_FILE, LockOwner, RunFolder, RunFolderBusy


def test_a_held_folder_refuses_a_second_claim_naming_the_first(tmp_path: Path) -> None:
    with RunFolder(tmp_path / "run") as first:
        owner = json.loads((first.path / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunFolderBusy, match=rf"in use by another perturbdiff run \(pid {os.getpid()} on host .*, since 20"):
            RunFolder(tmp_path / "run").__enter__()  # a second open file description: flock refuses it
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released
    with RunFolder(tmp_path / "run"):  # and free again
        pass


def test_a_lock_held_by_another_process_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(folder / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match="a process that has not written its name yet"):
            RunFolder(folder).__enter__()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    stale = LockOwner(int(dead), socket.gethostname(), "2026-01-01T00:00:00+00:00")
    (folder / LOCK_FILE).write_text(json.dumps(stale.__dict__))
    with pytest.warns(PerturbDiffNote, match=rf"took over the lock of .* \(pid {int(dead)} on host"):
        with RunFolder(folder):
            assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_file_from_another_host_is_refused_with_the_way_out(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps(LockOwner(4242, "elsewhere", "2026-01-01T00:00:00+00:00").__dict__))
    with pytest.raises(RunFolderBusy, match=rf"another host \(pid 4242 on host elsewhere.*delete {folder / LOCK_FILE}"):
        RunFolder(folder).__enter__()


def test_temporary_files_of_a_killed_run_are_removed_under_the_lock(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    orphans = [folder / "checkpoints" / ".last.pt.abc123.tmp", folder / ".train_log.csv.xyz.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half")
    (folder / "checkpoints" / "last.pt").write_bytes(b"kept")
    with pytest.warns(PerturbDiffNote, match="removed 2 temporary file"):
        with RunFolder(folder):
            pass
    assert not any(o.exists() for o in orphans) and (folder / "checkpoints" / "last.pt").exists()


def test_a_run_refused_during_set_up_leaves_no_folder_but_an_existing_one_stays(tmp_path: Path) -> None:
    new, existing = tmp_path / "new" / "run", tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    for folder in (new, existing):
        with pytest.raises(ValueError), RunFolder(folder):
            (folder / "split.json").write_text("{}")
            raise ValueError("a config error")
    assert not new.exists()
    assert (existing / "notes.txt").read_text() == "mine"
    with RunFolder(new) as kept:  # once kept, a later error leaves the results alone
        kept.keep()
    with pytest.raises(ValueError), RunFolder(new) as kept:
        kept.keep()
        raise ValueError("after training started")
    assert new.is_dir()


def test_a_folder_that_cannot_be_a_run_folder_is_one_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        RunFolder(afile).__enter__()
    with pytest.raises(OutputError, match=f"{afile} is a file, not a folder"):
        RunFolder(afile / "run").__enter__()


def test_other_ranks_claim_nothing(tmp_path: Path) -> None:
    with RunFolder(tmp_path / "run", lock=False) as folder:
        folder.keep()
    assert not (tmp_path / "run").exists()


def test_a_claim_that_loses_the_race_for_a_new_folder_leaves_it_to_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs start into one new folder: the one that created it may still lose the lock, and must
    then not remove the folder the other now holds."""
    from perturbdiff_core.runs import folder as run_folder

    with RunFolder(tmp_path / "run") as winner:
        (winner.path / "split.json").write_text("{}")
        monkeypatch.setattr(run_folder, "_make", lambda path: True)  # as if this claim had created it
        with pytest.raises(RunFolderBusy):
            RunFolder(tmp_path / "run").__enter__()
        assert (winner.path / "split.json").exists() and (winner.path / LOCK_FILE).exists()


def test_run_dir_joins_every_file_name_of_a_run_folder(tmp_path: Path) -> None:
    from perturbdiff_core import names
    from perturbdiff_core.runs.folder import RunDir

    files = RunDir(tmp_path)
    assert files == RunDir(str(tmp_path)) and files.path == tmp_path
    joined = {
        files.config: names.CONFIG_FILE, files.plugins: names.PLUGINS_FILE, files.split: names.SPLIT_FILE,
        files.data_state: names.STATE_FILE, files.lock: names.LOCK_FILE, files.train_log: names.LOG_FILE,
        files.transfer: names.TRANSFER_FILE, files.predictions: names.PREDICTIONS_FILE,
        files.metrics: names.METRICS_FILE, files.report: names.REPORT_FILE,
    }
    assert all(path == tmp_path / name for path, name in joined.items())
    assert files.last_checkpoint == tmp_path / names.CHECKPOINT_DIR / names.LAST_CHECKPOINT
    assert files.previous_checkpoint == tmp_path / names.CHECKPOINT_DIR / names.PREVIOUS_CHECKPOINT
    assert set(files.results()) < set(joined)


def test_no_module_spells_a_run_folder_file_name() -> None:
    """The names live in perturbdiff_core.names, the paths in RunDir: no string literal repeats one."""
    import ast

    from perturbdiff_core import names

    repo = Path(__file__).resolve().parents[1]
    spelled = {
        names.CONFIG_FILE, names.PLUGINS_FILE, names.SPLIT_FILE, names.STATE_FILE, names.LAST_CHECKPOINT,
        names.PREVIOUS_CHECKPOINT, names.LOCK_FILE, names.LOG_FILE, names.PREDICTIONS_FILE, names.METRICS_FILE,
        names.REPORT_FILE, names.TRANSFER_FILE,
    }
    later = {repo / "perturbdiff_core" / "names.py"}
    found = []
    for path in sorted([*(repo / "perturbdiff_core").rglob("*.py"), *(repo / "perturbdiff").rglob("*.py")]):
        if path in later:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in spelled:
                found.append(f"{path.relative_to(repo)}:{node.lineno}: {node.value!r}")
    assert not found, "use perturbdiff_core.names (or RunDir) instead:\n" + "\n".join(found)
