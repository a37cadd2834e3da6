"""A run folder held by one process at a time.

:class:`RunFolder` claims the folder of a ``train``, ``run`` or ablation cell before anything slow
happens: it checks the path (a writable folder, not a file, nothing but folders above it),
creates the folder, takes an exclusive lock on it and removes the temporary files a killed run
left behind. A second run into the same folder is refused with one line naming the first. A run
refused before it wrote any result (a config, plug-in or data error) leaves no folder behind.

The lock is ``flock`` on :data:`LOCK_FILE` inside the folder, which holds the owner's pid, host
and start time. The kernel releases ``flock`` when its process dies however it dies, so a lock
file whose lock is free was left by a killed run: on the same host it is taken over with a note.
One written on another host is refused (a network file system may not share locks between
hosts, so that run could still be alive); the message says how to take it over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from ..errors import PerturbDiffError, PerturbDiffNote
from ..io import TMP_SUFFIX, check_output_folder, output_error
from ..names import CHECKPOINT_DIR, LOCK_FILE


class RunFolderBusy(PerturbDiffError):
    """A run folder another perturbdiff process holds (or held, on another host)."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run folder: process id, host name and start time (UTC, ISO 8601)."""

    pid: int
    host: str
    since: str

    @classmethod
    def me(cls) -> LockOwner:
        """This process, now."""
        return cls(os.getpid(), socket.gethostname(), datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def describe(self) -> str:
        """``pid 123 on host node1, since 2026-01-01T10:00:00+00:00``."""
        return f"pid {self.pid} on host {self.host}, since {self.since}"

    def gone(self) -> bool:
        """Whether this owner's process has certainly ended: it ran on this host and no process has its pid
        (a pid in use may be a new process, but the free ``flock`` already says the owner let go)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # a process of another user has that pid now
            return True
        return self.pid != os.getpid()


class RunFolder:
    """Context manager holding ``path`` for one run (see the module docstring).

    Args:
        path: the run folder (created if missing).
        lock: claim the folder; ``False`` makes this a no-op, for the ranks of a data-parallel
            job other than rank 0 (which claims the folder for all of them and alone writes there).

    Call :meth:`keep` once the run holds results worth keeping (the trainer is set up): an error
    before it removes a folder this claim created.

    Example:
        >>> with RunFolder("runs/kang") as folder:  # doctest: +SKIP
        ...     trainer = Trainer(config, folder.path)
        ...     folder.keep()
        ...     trainer.fit()
    """

    def __init__(self, path: str | os.PathLike[str], *, lock: bool = True) -> None:
        self.path = Path(path)
        self.lock = lock
        self.created = False
        self.kept = False
        self._fd: int | None = None

    def __enter__(self) -> RunFolder:
        if not self.lock:
            return self
        check_output_folder(self.path)
        self.created = _make(self.path)
        try:
            self._fd = _acquire(self.path / LOCK_FILE)
        except BaseException:
            if self.created:  # empty unless a concurrent run took it first: then it is that run's
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
        _remove_orphans(self.path)
        return self

    def keep(self) -> None:
        """Mark the folder as holding this run's results: it stays whatever happens next."""
        self.kept = True

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if kind is not None and not self.kept:
            self._discard()
        if self._fd is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)  # still held: no one can take it in between
            os.close(self._fd)
            self._fd = None

    def _discard(self) -> None:
        """Remove the folder if this claim created it (held: nobody else can have written there)."""
        if self.created and self._fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)


def _make(path: Path) -> bool:
    """Create the folder ``path`` (and its parents); whether this call created it (of two processes
    starting at once, exactly one did)."""
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as err:
        raise output_error(path, err) from None
    return True


def _acquire(path: Path) -> int:
    """An open descriptor of the lock file ``path`` holding an exclusive ``flock``, with this process
    written in; RunFolderBusy when another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise output_error(path.parent, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = _read_owner(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderBusy(_busy(path.parent, owner)) from None
            raise output_error(path.parent, err, fix="its file system cannot lock files; use a local folder for --out") from None
        if _same_file(fd, path):  # not a file its last owner unlinked after we opened it
            break
        os.close(fd)
    previous = _read_owner(fd)
    if previous is not None:
        _take_over(fd, path, previous)
    try:
        _write_owner(fd, LockOwner.me())
    except OSError as err:
        os.close(fd)
        raise output_error(path, err) from None
    return fd


def _busy(folder: Path, owner: LockOwner | None) -> str:
    who = owner.describe() if owner is not None else "a process that has not written its name yet"
    return (
        f"{folder} is in use by another perturbdiff run ({who}); wait for it to finish, stop it, or choose "
        f"another --out."
    )


def _take_over(fd: int, path: Path, previous: LockOwner) -> None:
    """Take over a lock file left by a killed run (a note says whose), or refuse one from another host."""
    if not previous.gone():
        os.close(fd)
        raise RunFolderBusy(
            f"{path.parent} was locked by a perturbdiff run on another host ({previous.describe()}), which this host "
            f"cannot check; if that run has ended, delete {path} and run again."
        )
    warnings.warn(
        f"took over the lock of {path.parent} from a run that ended without releasing it ({previous.describe()}).",
        PerturbDiffNote,
        stacklevel=3,
    )


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open descriptor ``fd`` is the file at ``path`` now."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _read_owner(fd: int) -> LockOwner | None:
    """The owner written in a lock file, or None (empty, or not written by this module)."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        return LockOwner(**json.loads(text)) if text.strip() else None
    except (OSError, ValueError, TypeError):
        return None


def _write_owner(fd: int, owner: LockOwner) -> None:
    """Replace the lock file's content with ``owner`` (flushed, so the next reader sees it)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(owner)).encode(), 0)
    os.fsync(fd)


def _remove_orphans(folder: Path) -> None:
    """Delete the temporary files of atomic writes a killed run left in ``folder`` and its checkpoint
    folder (only a lock holder may: nobody else writes there), with a note naming how many."""
    orphans = [p for where in (folder, folder / CHECKPOINT_DIR) for p in where.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    if orphans:
        names = ", ".join(p.name for p in orphans[:3]) + (", ..." if len(orphans) > 3 else "")
        warnings.warn(
            f"removed {len(orphans)} temporary file(s) an interrupted run left in {folder}: {names}.",
            PerturbDiffNote,
            stacklevel=3,
        )
