"""Run folders side by side (``--jobs N``): a pool of spawned worker processes, each computing with its share of the CPUs.

Each worker starts a session of its own, so a terminal's Ctrl-C reaches only the command's process, which
passes the signal (Ctrl-C's SIGINT, or a scheduler's SIGTERM) on to every worker exactly once: a run in
training then saves a checkpoint before it stops (a second signal would stop it at once, without one).
Elsewhere in a run the signal stops it at once; an idle worker ignores it and waits to be shut down (one
killed while idle breaks the pool, and the shutdown then hangs on Python 3.11).
Workers take job after job, as one process would: ``max_tasks_per_child`` (a fresh process per job)
deadlocks on Python 3.11 (CPython gh-115634).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar

from ..errors import STOP_SIGNALS, Interrupted, stop_signal

Item = TypeVar("Item")
Result = TypeVar("Result")


def side_by_side(
    function: Callable[[Item], Result],
    items: Sequence[Item],
    processes: int,
    threads: int,
    *,
    stops: Callable[[Result], bool],
) -> Generator[tuple[int, Result], None, None]:
    """``(index, function(item))`` for each item as it finishes, ``processes`` at a time in spawned workers whose
    ``OMP_NUM_THREADS`` is ``threads``. ``function`` must be importable (a module-level function) and its results
    picklable. An item is handed to a worker only when one is free, so once a result ``stops`` the rest no other
    item starts; the running ones still finish and are yielded. Ctrl-C or SIGTERM here, or the caller closing the
    iterator early, stops the running items (a checkpoint first where they train), then waits for them.
    """
    pool = ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(threads,)
    )
    queue = iter(enumerate(items))
    running: dict[Future[Result], int] = {}

    def start_next() -> None:
        following = next(queue, None)
        if following is not None:
            running[pool.submit(_stoppable, function, following[1])] = following[0]

    try:
        for _ in range(processes):
            start_next()
        stopped = False
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index, result = running.pop(future), future.result()
                stopped = stopped or stops(result)
                if not stopped:
                    start_next()
                yield index, result
    except BaseException as stop:  # Ctrl-C or SIGTERM here, an error, or the caller closing this early
        signum = stop_signal(stop) if isinstance(stop, KeyboardInterrupt) else signal.SIGINT
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signum)
        raise
    finally:  # done, stopped, interrupted or abandoned: wait for the running items
        pool.shutdown(wait=True, cancel_futures=True)


def _stoppable(function: Callable[[Item], Result], item: Item) -> Result:
    """``function(item)`` in a worker, where a stop signal raises :class:`~perturbdiff_core.errors.Interrupted`
    (training defers it to a checkpoint first); before and after, the worker ignores stop signals."""

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        return function(item)
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def _start_worker(threads: int) -> None:
    """A worker's start: its own session (signals come from the command's process, once), stop signals ignored
    between jobs (:func:`_stoppable`), and its thread count."""
    if hasattr(os, "setsid"):  # POSIX; elsewhere the terminal's Ctrl-C reaches the workers directly
        os.setsid()
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
