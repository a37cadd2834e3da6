"""The ``perturbdiff`` command line: one subcommand per module of :mod:`perturbdiff_core.cli.commands`.

Subcommands are discovered, not listed: a module in that package exposing
``add_parser(subparsers)`` (which registers its parser and sets ``func=run``) is a command.
User errors (:class:`~perturbdiff_core.errors.PerturbDiffError`) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .. import __version__
from ..errors import STOP_SIGNALS, Interrupted, PerturbDiffError, PerturbDiffNote, PerturbDiffWarning, exit_status
from ..io import os_error_line
from . import commands

#: Set to 1 to get the full traceback of a user error instead of the one-line message.
DEBUG_ENV = "PERTURBDIFF_DEBUG"

_EPILOG = (
    f"Errors print as one line 'perturbdiff: error: ...' and exit with status 2 "
    f"(130 after Ctrl-C, 143 after SIGTERM). Set {DEBUG_ENV}=1 to see the full traceback instead."
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="perturbdiff",
        description="Kernel two-sample tests and set diffusion for single-cell perturbation data.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"perturbdiff {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{commands.__name__}.{info.name}")
            module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        args = build_parser().parse_args(positionals_before_overrides(sys.argv[1:] if argv is None else list(argv)))
        with one_line_warnings(), stop_signals_as_interrupt():
            return int(args.func(args) or 0)
    except SystemExit as stop:  # argparse: --help, --version, usage errors
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except PerturbDiffError as err:
        if debug:
            raise
        return _fail(str(err), 2)
    except OSError as err:  # a file system refusal no command turned into a PerturbDiffError
        if debug:
            raise
        return _fail(os_error_line(err), 2)
    except KeyboardInterrupt as stop:
        if debug:
            raise
        status = exit_status(stop)
        return _fail("terminated" if status == 128 + signal.SIGTERM else "interrupted", status)


def positionals_before_overrides(argv: list[str]) -> list[str]:
    """``argv`` with a YAML file named after ``--set`` pairs (``run --set train.steps=10 CONFIG.yaml``) moved before
    that ``--set``: its pairs take every word that follows, so the config would be read as one of them."""
    out: list[str] = []
    start = None  # where the current --set run begins in ``out``
    for word in argv:
        if word == "--set":
            start = len(out)
        elif start is not None and word.startswith("-"):
            start = None
        elif start is not None and "=" not in word and word.lower().endswith((".yaml", ".yml")):
            out.insert(start, word)
            start += 1
            continue
        out.append(word)
    return out


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (``kill``, a scheduler, a container stop) and SIGINT stop a command as Ctrl-C
    does: files being written are cleaned up, locks released, and a run saves a checkpoint first.

    SIGINT too, because a command started in the background of a script inherits SIGINT ignored: it would
    honour ``kill -INT`` while training (which installs its own handler) and silently finish otherwise."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within the block perturbdiff's own warnings print as ``perturbdiff: warning: ...`` (notes as
    ``perturbdiff: note: ...``), one line each, without the source line Python shows by default."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if not issubclass(category, PerturbDiffWarning):
                return shown(message, category, *args, **kwargs)
            kind = "note" if issubclass(category, PerturbDiffNote) else "warning"
            print(f"perturbdiff: {kind}: {' '.join(str(message).split())}", file=sys.stderr)

        warnings.showwarning = show
        warnings.simplefilter("always", PerturbDiffWarning)  # each one matters, even when repeated
        yield


def _fail(message: str, status: int) -> int:
    """Print ``message`` as one line on stderr and return ``status``."""
    print(f"perturbdiff: error: {' '.join(message.split())}", file=sys.stderr)
    return status
