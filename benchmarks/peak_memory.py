"""Peak memory and time of one benchmark case, measured in a fresh child process.

A process's peak resident set size (``ru_maxrss``) only grows, so each case runs alone in a
child that reports its own peak; ``RUSAGE_CHILDREN`` in the parent would report the largest
child so far instead. The child builds the inputs, warms up on 64 cells (lazy imports, random
features, KeOps compilation), records the resident size as its baseline, then times the full
call: repeated while under ``MIN_SECONDS`` in total, at most ``MAX_ROUNDS`` times.

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

MIN_SECONDS = 2.0
MAX_ROUNDS = 5
TIMEOUT_SECONDS = 1800


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        "peak_rss_mib": _rss_mib(),
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
