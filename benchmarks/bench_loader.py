"""Loader throughput (sets/s) at the training shape B=8, S=256, G=2000, on a synthetic screen.

Run: ``pytest benchmarks/bench_loader.py --benchmark-only``. ``extra_info`` records sets/s, the
shape and the set-up; compare ``sets_per_s / 8`` (batches/s) with the model's steps/s at the same
shape: the loader must never be the bottleneck (the model step comparison is added with the model).
"""

from __future__ import annotations

import os

import pytest

from perturbdiff_core.data import DataConfig, PerturbationData, make_loader
from perturbdiff_core.data.synthetic import synthetic_screen

B, S, G = 8, 256, 2000
CELLS = 20_000
BATCHES = 8


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """A 20,000 x 2,000 sparse screen (16 perturbations x 4 cell types), in memory and on disk."""
    adata = synthetic_screen(
        CELLS, G, perturbations=[f"p{i}" for i in range(16)], cell_types=("t1", "t2", "t3", "t4"), mean_count=0.3
    )
    path = tmp_path_factory.mktemp("bench") / "screen.h5ad"
    adata.write_h5ad(path)
    return adata, path


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("pairing", ["random", "ot"])
@pytest.mark.parametrize("backed", [False, True])
def test_loader_sets_per_second(benchmark, screen, backed, pairing, workers):
    adata, path = screen
    config = DataConfig(cell_type_key="cell_type", backed=backed, set_size=S, control_pairing=pairing)
    data = PerturbationData(path if backed else adata, config).fit()
    loader = make_loader(data, [c.label for c in data.perturbed_conditions], batch_size=B, num_workers=workers)
    stream = iter(())

    def next_batches():
        nonlocal stream
        for _ in range(BATCHES):
            batch = next(stream, None)
            if batch is None:  # a new epoch
                stream = iter(loader)
                batch = next(stream)
            assert batch.target.shape == (B, S, G)

    benchmark.pedantic(next_batches, rounds=5, warmup_rounds=1)
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
