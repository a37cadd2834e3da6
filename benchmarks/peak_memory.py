"""Peak memory and time of one benchmark case, measured in a fresh child process.

Each case runs alone in a child that reports its own peak resident set size. On Linux that is
``VmHWM`` of ``/proc/self/status``, reset after the warm-up by writing 5 to
``/proc/self/clear_refs``: ``ru_maxrss`` would not do, as Linux carries the parent's peak over
``fork`` and ``exec`` into the child (elsewhere it is the fallback, an upper bound). The child builds
the inputs, warms up on 64 cells (lazy imports, random features, KeOps compilation), records the
resident size as its baseline, then times the full call: repeated while under ``MIN_SECONDS`` in
total, at most ``MAX_ROUNDS`` times.

    python benchmarks/peak_memory.py '{"role": "ours", "estimator": "chunked", "kernel": "rbf", "mode": "fwdbwd", "batch": 1, "cells": 16384}'
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")

MIN_SECONDS = 2.0
MAX_ROUNDS = 5
TIMEOUT_SECONDS = 1800


def _status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB, or None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    """Restart the peak (``VmHWM``) from the current resident size, where Linux allows it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass


def _rss_mib() -> float:
    """Resident set size now, MiB."""
    now = _status_mib("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_mib() -> float:
    """Peak resident set size since the last :func:`_reset_peak`, MiB (``ru_maxrss`` is KiB on Linux)."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loss(spec: dict[str, Any]):
    import cases

    if spec["role"] == "floor":
        return cases.gemm_floor
    return cases.ours(spec["estimator"], spec["kernel"])


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Time and peak memory of ``spec`` in this process (call it in a fresh one)."""
    import cases
    import torch

    shape = cases.Shape(spec["batch"], spec["cells"])
    x, y = cases.cell_sets(shape)
    loss = _loss(spec)
    cases.step(loss, x[:, :64], y[:, :64], spec["mode"])()  # warm-up on a slice
    baseline = _rss_mib()
    _reset_peak()
    if cases.DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = cases.step(loss, x, y, spec["mode"])
    times: list[float] = []
    while not times or (sum(times) < MIN_SECONDS and len(times) < MAX_ROUNDS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result = {
        "seconds": statistics.median(times),
        "rounds": len(times),
        "baseline_rss_mib": baseline,
        "peak_rss_mib": _peak_mib(),
    }
    if cases.DEVICE.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a child Python process and return what it measured."""
    script = Path(__file__).resolve()
    done = subprocess.run(
        [sys.executable, str(script), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        cwd=script.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child for {spec} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the script's folder is sys.path[0], so ``import cases`` works
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
