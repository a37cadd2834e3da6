"""Shared fixtures: the real example data (skipped with the reason when absent), synthetic screens and fake
third-party plug-in distributions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anndata as ad
import pytest
import torch

from perturbdiff_core import registry
from perturbdiff_core.data.anndata_io import DATA_ENV, shared_data_dir
from perturbdiff_core.data.synthetic import synthetic_screen

NORMAN19 = "norman19_mcfaline23.h5ad"
KANG18 = "kang18_pbmc_ifnb.h5ad"


def _shared_file(name: str) -> Path:
    path = shared_data_dir() / name
    if not path.exists():
        pytest.skip(f"real data file {path} is absent; set {DATA_ENV} to the folder holding {name}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of the real example data (``$PERTURBDIFF_DATA`` or ``../shared/data``); skips when absent."""
    folder = shared_data_dir()
    if not folder.is_dir():
        pytest.skip(
            f"real data folder {folder} is absent; set {DATA_ENV} to the folder holding {NORMAN19} and {KANG18}"
        )
    return folder


@pytest.fixture(scope="session")
def norman19_path() -> Path:
    """Path of the norman19 / mcfaline23 CRISPR screen; skips when absent."""
    return _shared_file(NORMAN19)


@pytest.fixture(scope="session")
def kang18_path() -> Path:
    """Path of the kang18 IFN-beta PBMC data; skips when absent."""
    return _shared_file(KANG18)


@pytest.fixture
def make_adata() -> Callable[..., ad.AnnData]:
    """Factory of small synthetic screens: :func:`perturbdiff_core.data.synthetic.synthetic_screen`."""
    return synthetic_screen


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny models run fastest on one torch thread, and the test machine's 2 cores are shared
    (``OMP_NUM_THREADS=1`` makes ``train.threads: auto`` pick one too)."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def install_fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Install a fake distribution declaring ``entries`` in ``group``, plus optional module files."""

    def install(distribution: str, entries: dict[str, str], *, group: str = "perturbdiff.kernels", modules: dict[str, str] | None = None) -> None:
        info = tmp_path / f"{distribution.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.0.1\n")
        lines = [f"[{group}]", *(f"{name} = {target}" for name, target in entries.items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (modules or {}).items():
            (tmp_path / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        registry.refresh()

    yield install
    registry.refresh()  # monkeypatch then removes tmp_path from sys.path
