"""Loader throughput (sets/s) at the training shape B=8, S=256, G=2000, on a synthetic screen.

Run: ``pytest benchmarks/bench_loader.py --benchmark-only``. ``extra_info`` records sets/s, the
shape and the set-up. The set-up functions here are shared with ``bench_model.py``, whose script
mode puts the loader's sets/s next to the model's consumption rate (B / step time) in one table:
the loader must never be the bottleneck.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import product
from pathlib import Path

import anndata as ad
import pytest
from torch.utils.data import DataLoader

from perturbdiff_core.data import DataConfig, PerturbationData, make_loader
from perturbdiff_core.data.synthetic import synthetic_screen

B, S, G = 8, 256, 2000
CELLS = 20_000
#: Batches per timed round.
BATCHES = 8
#: Loader set-ups: (backed, pairing, workers).
CASES = tuple(product((False, True), ("random", "ot"), (0, 2)))


def make_screen(folder: Path) -> tuple[ad.AnnData, Path]:
    """A 20,000 x 2,000 sparse screen (16 perturbations x 4 cell types), in memory and written to ``folder``."""
    adata = synthetic_screen(
        CELLS, G, perturbations=[f"p{i}" for i in range(16)], cell_types=("t1", "t2", "t3", "t4"), mean_count=0.3
    )
    path = folder / "screen.h5ad"
    adata.write_h5ad(path)
    return adata, path


def screen_loader(adata: ad.AnnData, path: Path, *, backed: bool, pairing: str, workers: int) -> DataLoader:
    """The training DataLoader of every perturbed condition, read in memory (``adata``) or backed (``path``)."""
    config = DataConfig(cell_type_key="cell_type", backed=backed, set_size=S, control_pairing=pairing)
    data = PerturbationData(path if backed else adata, config).fit()
    return make_loader(data, [c.label for c in data.perturbed_conditions], batch_size=B, num_workers=workers)


def endless(loader: DataLoader) -> Iterator:
    """The loader's batches, epoch after epoch (persistent workers carry over)."""
    while True:
        yield from loader


def take(stream: Iterator, batches: int = BATCHES) -> None:
    """Draw ``batches`` batches of the training shape from ``stream``."""
    for _ in range(batches):
        assert next(stream).target.shape == (B, S, G)


def case_id(backed: bool, pairing: str, workers: int) -> str:
    """A short label of a loader set-up, e.g. ``backed, ot, 2 workers``."""
    return f"{'backed' if backed else 'in memory'}, {pairing}, {workers} worker{'s' * (workers != 1)}"


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return make_screen(tmp_path_factory.mktemp("bench"))


@pytest.mark.parametrize(("backed", "pairing", "workers"), CASES)
def test_loader_sets_per_second(benchmark, screen, backed, pairing, workers):
    stream = endless(screen_loader(*screen, backed=backed, pairing=pairing, workers=workers))
    benchmark.pedantic(take, args=(stream,), rounds=5, warmup_rounds=1)
    stream.close()
    if benchmark.stats is None:  # --benchmark-disable: run once, not timed
        return
    sets_per_s = B * BATCHES / benchmark.stats["mean"]
    benchmark.extra_info.update(
        sets_per_s=round(sets_per_s, 1),
        batches_per_s=round(sets_per_s / B, 2),
        shape=[B, S, G],
        cells=CELLS,
        backed=backed,
        pairing=pairing,
        workers=workers,
        cpus=os.cpu_count(),
    )
