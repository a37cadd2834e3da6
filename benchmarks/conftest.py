"""Benchmark session set-up: collect ``bench_*.py``, print and record the machine and commit.

The header (CPU, cores, torch version and threads, device, date, git commit, the reproduce
command) is printed at the start of the session and stored in the ``--benchmark-json``
file's ``machine_info``, so a published table always says where its numbers came from.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench files import cases, timing

from cases import REPRODUCE
from machine_record import env_prefix, machine


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def record() -> dict[str, Any]:
    """The machine record with the command that reproduces a pytest-benchmark run."""
    return {**machine(), "reproduce": REPRODUCE}


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"benchmark {key}: {value}" for key, value in record().items()]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    invoked = " ".join(["pytest", *config.invocation_params.args])
    machine_info["perturbdiff"] = {
        **record(),
        "invoked_as": env_prefix() + invoked,
        "load_average_1_5_15_min": [round(v, 2) for v in os.getloadavg()],
    }
