"""The machine record every published benchmark table carries: hardware, software, device, date and commit."""

from __future__ import annotations

import datetime
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch
from cases import DEVICE


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
    return done.stdout.strip() if done.returncode == 0 else ""


@cache
def machine() -> dict[str, Any]:
    """What the timings depend on: hardware, software, device, date and commit (marked when tracked
    files have uncommitted changes)."""
    import cpuinfo  # py-cpuinfo, a pytest-benchmark dependency

    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {
        "cpu_model": cpuinfo.get_cpu_info().get("brand_raw", "unknown"),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(DEVICE) + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
    }


#: Environment variables that change what a benchmark measures, so its reproducing command names them.
COMMAND_ENV = ("OMP_NUM_THREADS", "PERTURBDIFF_BENCH_DEVICE")


def env_prefix() -> str:
    """The :data:`COMMAND_ENV` variables set now, as a command's prefix (``"OMP_NUM_THREADS=1 "``), or ``""``."""
    return "".join(f"{name}={os.environ[name]} " for name in COMMAND_ENV if name in os.environ)


def machine_line() -> str:
    """:func:`machine` as one line, ``key: value; ...``, for a table's caption."""
    return "; ".join(f"{key}: {value}" for key, value in machine().items())
