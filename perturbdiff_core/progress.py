"""Progress of the long stages (training, prediction, baselines, evaluation) on stderr.

On a terminal (or in a Jupyter notebook) it is a tqdm bar, redrawn in place. Anywhere else (a log file, a pipe, a CI job)
a bar's carriage-return updates pile up into one huge line, so :class:`Lines` writes a plain line
at every tenth of the work instead (and at the end), with the elapsed time and the latest
postfix (the loss): ``train: 300/1000 steps (30%) 41 s loss=0.412``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

#: Plain lines per stage when stderr is not a terminal (one per tenth of the work).
LINES = 10


class Lines:
    """A tqdm look-alike (``update``, ``set_postfix``, iteration, ``with``) that prints plain lines.

    A line is written when the count reaches the next of :data:`LINES` equal steps towards
    ``total`` and once at the end; without a total, at the end only.
    """

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        total: int | None = None,
        initial: int = 0,
        desc: str = "",
        unit: str = "it",
        stream: TextIO | None = None,
        lines: int = LINES,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.stream, self.lines = stream, lines
        self.postfix = ""
        self.start = time.monotonic()
        self._shown = self._mark(initial)
        self._closed = False

    def _mark(self, n: int) -> int:
        """Index of the last line step reached at count ``n``."""
        return n * self.lines // self.total if self.total else 0

    def __iter__(self) -> Iterator[T]:
        assert self.iterable is not None, "Lines(...) without an iterable is not iterable"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, values: Mapping[str, Any] | None = None, refresh: bool = True, **more: Any) -> None:
        """Values shown after the count on the next line, as ``key=value``."""
        self.postfix = " ".join(f"{k}={v}" for k, v in {**(values or {}), **more}.items())

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; write a line when the count crosses the next step."""
        self.n += n
        mark = self._mark(self.n)
        if mark > self._shown and (self.total is None or self.n < self.total):
            self._shown = mark
            self._write()

    def close(self) -> None:
        """Write the final line (once)."""
        if not self._closed:
            self._closed = True
            if self.n > 0 or self.total == 0:
                self._write()

    def _write(self) -> None:
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n // self.total}%)" if self.total else ""
        line = f"{self.desc}: {count} {self.unit}{share} {time.monotonic() - self.start:.0f} s"
        print(f"{line} {self.postfix}".rstrip(), file=self.stream or sys.stderr, flush=True)


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal."""
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel, where tqdm draws a widget that updates in place."""
    return "ipykernel" in sys.modules and type(sys.stderr).__module__.startswith("ipykernel")


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    initial: int = 0,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
) -> Any:
    """A progress bar over ``iterable`` (or counted with ``update``): tqdm on a terminal, plain lines
    elsewhere, nothing with ``disable`` (the iterable itself, or a counter that prints nothing)."""
    if disable:
        return _Silent(iterable)
    if is_terminal() or in_notebook():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return Lines(iterable, total=total, initial=initial, desc=desc, unit=unit)


class _Silent:
    """What ``progress_bar(..., disable=True)`` returns: the same interface, showing nothing."""

    def __init__(self, iterable: Iterable[T] | None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[T]:
        return iter(self.iterable or ())

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, values: Mapping[str, Any] | None = None, refresh: bool = True, **more: Any) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def stage(desc: str, *, disable: bool = False) -> Iterator[None]:
    """A stage without steps (reading and preparing the data): one line when it starts and one with
    its time when it ends, ``preparing data ...`` then ``preparing data: done in 3 s``."""
    if disable:
        yield
        return
    print(f"{desc} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    yield
    print(f"{desc}: done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
