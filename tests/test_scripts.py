"""The shell scripts: ``scripts/quickstart.sh`` runs twice (a finished run is moved aside and it says
so, an interrupted one is resumed), and ``scripts/setup.sh`` installs the torch ``PERTURBDIFF_TORCH`` names.

Each script runs in a copy of the repository layout whose other programs are stubs that record
their arguments (and, for ``perturbdiff``, write what a finished or interrupted run leaves), so
only the scripts' own decisions are tested, in a second.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = "runs/kang18_holdout_celltype"

#: Stands in for .venv/bin/perturbdiff: logs its arguments, then leaves a checkpoint, and metrics.csv unless told not to.
STUB = """#!/usr/bin/env bash
echo "$@" >> calls.log
out="$4"
mkdir -p "$out/checkpoints"
touch "$out/checkpoints/last.pt"
[ -n "${STUB_INTERRUPT:-}" ] || echo "metric,value" > "$out/metrics.csv"
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "quickstart.sh", tmp_path / "scripts" / "quickstart.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\ntrue\n")
    stub = tmp_path / ".venv" / "bin" / "perturbdiff"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def _quickstart(repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/quickstart.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
        env={**os.environ, **env}, check=True,
    )


def test_a_second_run_moves_the_first_aside_and_says_so(repo: Path) -> None:
    first = _quickstart(repo)
    assert "quickstart:" not in first.stderr
    second = _quickstart(repo)
    moved = sorted(p for p in (repo / "runs").iterdir() if p.name != "kang18_holdout_celltype")
    assert len(moved) == 1 and (moved[0] / "metrics.csv").is_file()  # the first run, whole
    assert f"{OUT} held a finished run; moved it to runs/{moved[0].name}" in second.stderr
    assert (repo / OUT / "metrics.csv").is_file()
    calls = (repo / "calls.log").read_text().splitlines()
    assert calls == [f"run examples/kang18_holdout_celltype.yaml --out {OUT}"] * 2
    _quickstart(repo)  # a third, within the same second: a second folder aside, never one inside the other
    moved = sorted(p for p in (repo / "runs").iterdir() if p.name != "kang18_holdout_celltype")
    assert len(moved) == 2 and all(sorted(q.name for q in m.iterdir()) == ["checkpoints", "metrics.csv"] for m in moved)


def test_an_interrupted_run_is_resumed(repo: Path) -> None:
    _quickstart(repo, STUB_INTERRUPT="1")
    again = _quickstart(repo)
    assert f"{OUT} holds an interrupted run; resuming it." in again.stderr
    assert (repo / "calls.log").read_text().splitlines()[-1].endswith(f"--out {OUT} --resume")
    assert sorted(p.name for p in (repo / "runs").iterdir()) == ["kang18_holdout_celltype"]


def test_quickstart_keeps_numba_to_one_thread_unless_told(repo: Path) -> None:
    stub = repo / ".venv" / "bin" / "perturbdiff"
    stub.write_text(STUB.replace('echo "$@" >> calls.log', 'echo "$NUMBA_NUM_THREADS" >> numba.log'))
    _quickstart(repo)
    _quickstart(repo, NUMBA_NUM_THREADS="4")
    assert (repo / "numba.log").read_text().split() == ["1", "4"]


#: Stands in for .venv/bin/python: records the arguments of every call.
PYTHON_STUB = """#!/usr/bin/env bash
echo "$@" >> "$(dirname "$0")/../../pip.log"
"""


@pytest.fixture
def setup_repo(tmp_path: Path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(PYTHON_STUB)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def _torch_install(repo: Path, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "PERTURBDIFF_TORCH"} | env
    subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env=environment, check=True, capture_output=True, timeout=60)
    calls = (repo / "pip.log").read_text().splitlines()
    (repo / "pip.log").unlink()
    assert calls[0] == "-m pip install --quiet --upgrade pip" and calls[-1].endswith("-e examples/custom_kernel_plugin")
    return calls[1]


def test_setup_pins_torch_and_takes_an_index_or_a_wheel_from_the_environment(setup_repo: Path) -> None:
    assert _torch_install(setup_repo) == "-m pip install --quiet torch==2.13.0"
    index = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert _torch_install(setup_repo, PERTURBDIFF_TORCH=index) == f"-m pip install --quiet {index}"
    wheel = "/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"
    assert _torch_install(setup_repo, PERTURBDIFF_TORCH=wheel) == f"-m pip install --quiet {wheel}"
