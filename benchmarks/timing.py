"""How a case is timed and labelled: one helper shared by the ``bench_*.py`` files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cases import DEVICE, TRAINING, Shape
from peak_memory import measure

from perturbdiff_core.errors import ConfigError

#: Rounds of the cases above the training shape (seconds per call): fixed, after one warm-up.
LARGE_ROUNDS = 3


def label(benchmark: Any, shape: Shape, role: str, **info: Any) -> None:
    """Group by shape and record what :mod:`report` needs to form ratios.

    ``role`` is ``floor`` (the GEMM floor), ``geomloss``, ``ours`` (an estimator) or ``kernel``
    (a dense kernel matrix).
    """
    benchmark.group = shape.id
    benchmark.extra_info.update(
        role=role, shape=shape.id, batch=shape.batch, cells=shape.cells, genes=shape.genes, device=DEVICE.type, **info
    )


def warm_up(run: Callable[[], None], what: str) -> None:
    """First call outside the timing (lazy set-up); an unsupported combination skips with its reason."""
    try:
        run()
    except ConfigError as err:
        pytest.skip(f"{what} is not supported: {err}")


def time_case(benchmark: Any, run: Callable[[], None], shape: Shape, what: str) -> None:
    """Warm up, then time ``run``: calibrated rounds at the training shape, ``LARGE_ROUNDS`` above it."""
    warm_up(run, what)
    if shape == TRAINING:
        benchmark(run)
    else:
        benchmark.pedantic(run, rounds=LARGE_ROUNDS, iterations=1)


def time_in_child(benchmark: Any, spec: dict[str, Any]) -> None:
    """Time ``spec`` once in a child process that also reports its peak memory (``peak_memory.py``).

    The benchmark's own statistics then include the child's start-up; ``extra_info["seconds"]``
    is the call alone, timed inside the child, and is what the report uses.
    """
    measured = benchmark.pedantic(measure, args=(spec,), rounds=1, iterations=1)
    benchmark.extra_info.update(measured)
