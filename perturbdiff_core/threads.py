"""How many CPU threads torch computes with: ``train.threads`` resolved, applied and re-applied.

numba's OpenMP layer shares libgomp with torch, and the first parallel numba call in a process
(scanpy's highly-variable-gene selection and normalisation run some) sets libgomp's thread count
to the number of cores, whatever ``OMP_NUM_THREADS`` says. On a loaded machine the extra threads
spin at a barrier and a tiny training step can take a hundred times longer. So the count is
applied after the data are prepared, and checked again before every training step and before
prediction and evaluation (:func:`apply_threads` costs nothing when the count is right).
"""

from __future__ import annotations

import os

#: The ``train.threads`` value that picks a count from the machine.
AUTO = "auto"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_threads(setting: int | str) -> int:
    """``train.threads`` as a number. ``auto``: ``OMP_NUM_THREADS`` when set to a positive number,
    else the CPUs this process may use shared among torchrun's processes on this node."""
    if setting != AUTO:
        return int(setting)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cpus() // max(1, processes))


def apply_threads(threads: int) -> int:
    """Make torch compute with ``threads`` threads (again, if something reset the count); returns it."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def threads_line(threads: int) -> str:
    """``training with 2 threads`` (the line a run prints once)."""
    return f"training with {threads} thread{'s' if threads != 1 else ''}"
