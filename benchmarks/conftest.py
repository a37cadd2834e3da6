"""Benchmark session set-up: collect ``bench_*.py``, print and record the machine and commit.

The header (CPU, cores, torch version and threads, device, date, git commit, the reproduce
command) is printed at the start of the session and stored in the ``--benchmark-json``
file's ``machine_info``, so a published table always says where its numbers came from.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench files import cases, timing

from cases import DEVICE, REPRODUCE  # noqa: E402


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)
    return done.stdout.strip() if done.returncode == 0 else ""


@cache
def machine() -> dict[str, Any]:
    """What the timings depend on: hardware, software, date and commit."""
    import cpuinfo  # py-cpuinfo, a pytest-benchmark dependency

    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    info = {
        "cpu_model": cpuinfo.get_cpu_info().get("brand_raw", "unknown"),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(DEVICE) + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "reproduce": REPRODUCE,
    }
    return info


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"benchmark {key}: {value}" for key, value in machine().items()]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    threads = os.environ.get("OMP_NUM_THREADS")
    invoked = " ".join(["pytest", *config.invocation_params.args])
    machine_info["perturbdiff"] = {
        **machine(),
        "invoked_as": (f"OMP_NUM_THREADS={threads} " if threads else "") + invoked,
        "load_average_1_5_15_min": [round(v, 2) for v in os.getloadavg()],
    }
