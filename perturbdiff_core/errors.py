"""Errors users see: each names the problem and the fix in one sentence."""

from __future__ import annotations

import difflib
import signal
from collections.abc import Iterable


class PerturbDiffError(ValueError):
    """Base class of every user-facing error; the command line prints it as one line."""


class UnknownPluginError(PerturbDiffError, LookupError):
    """A plug-in name that no installed distribution registers."""


class PluginLoadError(PerturbDiffError, ImportError):
    """A registered plug-in that fails to import or does not implement its interface."""


class InputError(PerturbDiffError):
    """Tensors or arrays that break a documented contract (shape, NaN, empty set)."""


class NonFiniteError(InputError):
    """Tensors holding NaN or Inf, or values whose squared distances overflow their dtype.

    A class of its own so a caller that knows its inputs were finite (the trainer, whose data were
    checked when read) can tell a diverging model from bad input.
    """


class DataError(PerturbDiffError):
    """An AnnData file or object that cannot be used as given (missing key, bad values)."""


class OutputError(PerturbDiffError):
    """A file or folder that cannot be written: read-only, full disk, no permission, a file in the way."""


class ConfigError(PerturbDiffError):
    """A configuration key that is unknown or of the wrong type."""


#: Signals that stop a command the way Ctrl-C does: a run saves a checkpoint and says how to resume.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C's SIGINT, or SIGTERM from ``kill``, a scheduler or a container stop).

    ``status`` is the exit status a shell reports for it, 128 + the signal number (130, 143).
    """

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def status(self) -> int:
        """128 + the signal number."""
        return 128 + self.signum


def stop_signal(stop: KeyboardInterrupt) -> int:
    """The signal number of a stop (SIGINT for a plain Ctrl-C), e.g. to pass it on to worker processes."""
    return stop.signum if isinstance(stop, Interrupted) else int(signal.SIGINT)


def exit_status(stop: KeyboardInterrupt) -> int:
    """The exit status of a stop: 128 + its signal number (130 for a plain Ctrl-C)."""
    return 128 + stop_signal(stop)


class PerturbDiffWarning(UserWarning):
    """Something users should know that does not stop the command (data left out, ...);
    the command line prints it as one line ``perturbdiff: warning: ...``."""


class PerturbDiffDeprecationWarning(PerturbDiffWarning, DeprecationWarning):
    """A name that still works but is deprecated; the message names its replacement. A
    :class:`DeprecationWarning` (hidden by default outside ``__main__`` and tests) that the command
    line prints as one line ``perturbdiff: warning: ...``, since configs are where old names live."""


class PerturbDiffNote(PerturbDiffWarning):
    """What perturbdiff did on the user's behalf (a stale lock taken over, a fallback used);
    printed as one line ``perturbdiff: note: ...``."""


def did_you_mean(word: str, choices: Iterable[str], *, prefix: str = "") -> str:
    """`` (did you mean 'train'?)`` when one of ``choices`` is close to a misspelt ``word``, else ``""``.

    Closeness is :func:`difflib.get_close_matches`'s (ratio >= 0.6): ``trian`` finds ``train``,
    ``ratqaud`` finds ``ratquad``; a word close to nothing gets no guess rather than a wrong one.
    ``prefix`` is shown before the guess (``train.`` for a key of the ``train`` section).
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters; ``(no message)`` when it
    has none (an empty message must not break the handler that reports it)."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else "(no message)"
