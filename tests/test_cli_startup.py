"""The command line starts fast: ``--help`` of every command in well under a second of CPU, because
torch, scanpy, AnnData, pandas and matplotlib are imported only when a command runs."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from perturbdiff_core.cli import build_parser

#: CPU seconds one ``--help`` may take (the target is 1 s; about 0.1 s measured on the 2-core CI machine).
HELP_CPU_S = 1.5

#: Modules a ``--help`` must not import (each costs from 0.5 to 3 s of CPU).
HEAVY = ("torch", "scanpy", "anndata", "matplotlib", "pandas", "numba", "sklearn")


def _commands() -> list[str]:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(subparsers.choices)


def _child_cpu(args: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """CPU seconds (user + system) of a child process running ``args``, and its result."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done


def test_every_command_is_discovered() -> None:
    assert {"ablate", "etest", "evaluate", "plugins", "predict", "run", "suite", "train"} <= set(_commands())


@pytest.mark.parametrize("command", [None, *_commands()])
def test_help_takes_under_a_second_of_cpu(command: str | None) -> None:
    args = [sys.executable, "-m", "perturbdiff_core", *([command] if command else []), "--help"]
    cpu, done = _child_cpu(args)
    assert done.returncode == 0, done.stderr
    assert "usage: perturbdiff" in done.stdout
    assert cpu < HELP_CPU_S, f"{' '.join(args[2:])} took {cpu:.2f} s of CPU"


def test_building_the_parser_imports_no_heavy_module() -> None:
    probe = (
        "import sys; from perturbdiff_core.cli import build_parser; build_parser(); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "", f"imported at start-up: {done.stdout.strip()}"


def test_the_package_imports_torch_only_when_a_name_needs_it() -> None:
    probe = (
        "import sys, perturbdiff_core; before = 'torch' in sys.modules; "
        "from perturbdiff_core import mmd2; print(before, 'torch' in sys.modules, callable(mmd2))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "True", "True"]
