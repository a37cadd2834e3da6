"""File output: atomic writes (a reader never sees a half-written file, an error leaves no file),
new files that never replace another, fail-fast checks of output paths, and one-line errors for
writes the file system refuses (full disk, read-only, a file in the way)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, first_line

#: What to do when a write fails with an ``errno``; anything else gets :data:`_GENERIC_FIX`.
_FIXES = {
    errno.ENOSPC: "free space on that disk (or write elsewhere) and run again",
    errno.EDQUOT: "free space within your disk quota (or write elsewhere) and run again",
    errno.EROFS: "the file system is read-only; write to a writable folder",
    errno.EACCES: "you may not write there; choose a folder you can write to",
    errno.EPERM: "you may not write there; choose a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file name",
    errno.EEXIST: "a file is in the way of a folder of that name; choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}
_GENERIC_FIX = "check the path, its permissions and the free space, or write elsewhere"


def output_error(
    path: str | os.PathLike[str], err: BaseException, *, reason: str | None = None, fix: str | None = None
) -> OutputError:
    """One line for a failed write of ``path``: the system's reason (or ``reason``) and what to do
    (by ``errno``, or ``fix``)."""
    code = getattr(err, "errno", None)
    return OutputError(f"Cannot write {path}: {reason or _reason(err)}; {fix or _FIXES.get(code, _GENERIC_FIX)}.")


def os_error_line(err: OSError) -> str:
    """One line for a file system error that no command turned into a PerturbDiffError (the CLI's last resort)."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{_reason(err)}; {_FIXES.get(err.errno, _GENERIC_FIX)}."


def _reason(err: BaseException) -> str:
    """The system's reason for ``err``: its short errno text (h5py puts a page of diagnostics in strerror)."""
    code = getattr(err, "errno", None)
    if code in _FIXES:
        return os.strerror(code)
    return (err.strerror if isinstance(err, OSError) and err.strerror else None) or first_line(err)


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """A temporary file in ``target``'s folder (created with it), deleted on exit unless renamed away;
    OSErrors inside the block become :class:`OutputError` naming ``target``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as err:
        raise output_error(target, err) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
    except OSError as err:
        raise output_error(target, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the usual file mode (mkstemp creates 0600) and rename it onto ``target``."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    A write the file system refuses (no space, read-only, ...) raises :class:`OutputError` naming ``path``.

    Example:
        >>> with atomic_path("results.csv") as tmp:  # doctest: +SKIP
        ...     frame.to_csv(tmp)
    """
    target = Path(path)
    with _temporary_beside(target) as tmp:
        yield tmp
        _publish(tmp, target)


#: Suffix of the temporary files of :func:`atomic_path` (a killed process can leave them behind).
TMP_SUFFIX = ".tmp"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_new(folder: str | os.PathLike[str], stem: str, suffix: str, write: Callable[[Path], None]) -> Path:
    """Write a file with ``write(path)`` as ``folder/<stem>_<n><suffix>``, the first ``n >= 1`` free, and return its path.

    The file is written under a temporary name, then moved onto the first free name, claimed with
    ``O_EXCL``: an existing file is never replaced, even by a concurrent writer.
    """
    base = Path(folder) / f"{stem}{suffix}"
    with _temporary_beside(base) as tmp:
        write(tmp)
        for n in range(1, 1_000_000):
            target = Path(folder) / f"{stem}_{n}{suffix}"
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:
                continue
            _publish(tmp, target)
            return target
    raise OutputError(f"{folder} holds a million {stem}_<n>{suffix} files; clear some out.")


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """``path`` if a file can be written there; OutputError now, before slow work, when it is a folder,
    lies under a file, or its folder cannot be written (read-only, no permission)."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{target} is a folder; give the name of a file to write (e.g. {target / 'results.csv'}).")
    _check_writable(target.parent, target)
    return target


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is, or can become, a writable folder; OutputError when it is a file, lies under a
    file, or cannot be written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder; choose another output folder (--out).")
    _check_writable(folder, folder)
    return folder


def _check_writable(folder: Path, wanted: Path) -> None:
    """OutputError unless the nearest existing folder at or above ``folder`` is a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"Cannot write {wanted}: {existing} is a file, not a folder; choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        code = errno.EROFS if read_only else errno.EACCES
        raise output_error(wanted, OSError(code, os.strerror(code)))
