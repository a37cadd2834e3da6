"""A run folder: the files it holds (:class:`RunDir`), one process at a time holding it
(:class:`RunFolder`), and a finished run read back for evaluation (:class:`SavedRun`).

:class:`RunDir` is the one place that joins a run folder with its file names (``config.yaml``,
``checkpoints/last.pt``, ``metrics.csv``, ...; the names themselves live in
:mod:`perturbdiff_core.names`, so the command line's help can show them without importing this).
The data and evaluation layers below, which write into a folder they are given, use those names
directly: ``split.json`` and ``data_state.json`` (:mod:`perturbdiff_core.data.prepare`) and
``report.html`` (:mod:`perturbdiff_core.evaluation.report`).

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
from typing import TYPE_CHECKING

from ..configuration import read_yaml
from ..errors import InputError, PerturbDiffError, PerturbDiffNote
from ..io import TMP_SUFFIX, check_output_folder, output_error
from ..names import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    LOCK_FILE,
    LOG_FILE,
    METRICS_FILE,
    PLUGINS_FILE,
    PREDICTIONS_FILE,
    PREVIOUS_CHECKPOINT,
    REPORT_FILE,
    SPLIT_FILE,
    STATE_FILE,
    TRANSFER_FILE,
)

if TYPE_CHECKING:  # the data stack is imported when a saved run is read, not for --help
    import anndata as ad
    import pandas as pd

    from ..data import PerturbationData, Split


@dataclass(frozen=True)
class RunDir:
    """The paths of a run folder's files (``docs/run_folder.md`` says what each holds).

    Example:
        >>> RunDir("runs/kang").last_checkpoint
        PosixPath('runs/kang/checkpoints/last.pt')
    """

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        """``config.yaml``: the resolved configuration; the run repeats from it alone."""
        return self.path / CONFIG_FILE

    @property
    def plugins(self) -> Path:
        """``plugins.yaml``: the distribution and version of every plug-in the config names."""
        return self.path / PLUGINS_FILE

    @property
    def split(self) -> Path:
        """``split.json``: training, validation and test conditions."""
        return self.path / SPLIT_FILE

    @property
    def data_state(self) -> Path:
        """``data_state.json``: what the data preparation learnt (genes, vocabularies, encoder)."""
        return self.path / STATE_FILE

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``: the folder of the checkpoints."""
        return self.path / CHECKPOINT_DIR

    @property
    def last_checkpoint(self) -> Path:
        """``checkpoints/last.pt``: the latest checkpoint."""
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def previous_checkpoint(self) -> Path:
        """``checkpoints/previous.pt``: the checkpoint before ``last.pt``, its fallback."""
        return self.checkpoints / PREVIOUS_CHECKPOINT

    @property
    def lock(self) -> Path:
        """``.perturbdiff.lock``: the lock of the process holding the folder (:class:`RunFolder`)."""
        return self.path / LOCK_FILE

    @property
    def train_log(self) -> Path:
        """``train_log.csv``: mean losses per ``train.log_every`` steps, validation MMD."""
        return self.path / LOG_FILE

    @property
    def transfer(self) -> Path:
        """``transfer.json``: what ``train.init_from`` loaded."""
        return self.path / TRANSFER_FILE

    @property
    def predictions(self) -> Path:
        """``predictions.h5ad``: the predicted cells of the test conditions."""
        return self.path / PREDICTIONS_FILE

    @property
    def metrics(self) -> Path:
        """``metrics.csv``: the metrics of the model and the baselines, long format."""
        return self.path / METRICS_FILE

    @property
    def report(self) -> Path:
        """``report.html``: the self-contained report."""
        return self.path / REPORT_FILE

    def results(self) -> tuple[Path, ...]:
        """The files a run writes that ``perturbdiff predict`` never replaces."""
        return (
            self.predictions, self.metrics, self.report, self.config, self.plugins, self.train_log, self.split,
            self.data_state,
        )


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
            self._fd = _acquire(RunDir(self.path).lock)
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
            RunDir(self.path).lock.unlink(missing_ok=True)  # still held: no one can take it in between
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
    orphans = [p for where in (folder, RunDir(folder).checkpoints) for p in where.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    if orphans:
        names = ", ".join(p.name for p in orphans[:3]) + (", ..." if len(orphans) > 3 else "")
        warnings.warn(
            f"removed {len(orphans)} temporary file(s) an interrupted run left in {folder}: {names}.",
            PerturbDiffNote,
            stacklevel=3,
        )


@dataclass
class SavedRun:
    """What baselines need from a run folder: its data (the model's genes) and split."""

    path: Path
    data: PerturbationData
    split: Split

    @classmethod
    def load(cls, path: str | Path) -> SavedRun:
        """Read ``config.yaml``, ``split.json`` and (when present) ``data_state.json`` of a run folder."""
        from ..data import DataConfig, PerturbationData, Split, load_prepared
        from .config import resolve_data_path

        path = Path(path)
        files = RunDir(path)
        config_file = files.config
        if not config_file.exists():
            raise InputError(
                f"{path} is not a run folder: it has no {config_file.name}. Give the folder of a perturbdiff run."
            )
        config = DataConfig.from_dict(read_yaml(config_file).get("data", {}))
        config.path = resolve_data_path(config.path)
        if files.data_state.exists():
            return cls(path, *load_prepared(path, config))  # baselines see the training cells the model saw
        split = Split.load(files.split)  # a run folder without its data state: fit on its training conditions
        data = PerturbationData(None, config).fit(split.train)
        split.apply(data)
        return cls(path, data, split)

    def predict(self, name: str, *, seed: int) -> ad.AnnData:
        """Predictions of baseline ``name`` fitted on the training conditions, for the test conditions."""
        from ..evaluation.predictors import as_predictor, predict_anndata

        predictor = as_predictor(name).fit(self.data, self.split.train)
        return predict_anndata(predictor, self.data, self.split.test, seed=seed)

    def real(self) -> ad.AnnData:
        """The real cells of the test conditions and their contexts' control cells."""
        from ..evaluation.predictors import real_anndata

        return real_anndata(self.data, self.split.test)

    def facts(self) -> dict[str, str]:
        """What the run was (:func:`~perturbdiff_core.runs.provenance.run_facts`), for the report's header."""
        from .config import config_from_dict
        from .provenance import run_facts

        config = config_from_dict(read_yaml(RunDir(self.path).config))
        return run_facts(config, test=self.split.test) | {"run folder": str(self.path)}

    def loss_history(self) -> pd.DataFrame | None:
        """The run's ``train_log.csv``, or ``None`` when it has none."""
        import pandas as pd

        log = RunDir(self.path).train_log
        return pd.read_csv(log) if log.exists() else None
