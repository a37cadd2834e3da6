"""A synthetic atlas-scale screen written once to disk as a folder of ``.h5ad`` shards (plates).

    python benchmarks/atlas_collection.py --cells 2000000 --shards 16 [--out /tmp/perturbdiff_atlas]

Each shard is a plate of ``cells / shards`` cells over ``genes`` genes, sparse (CSR float32, about
90% zeros) and log1p-normalised on a count lattice: ``x = log1p(k * 1e4 / library size)`` with ``k``
a whole count, as after ``normalize_total`` + ``log1p``. Every plate holds control cells of every
cell type and a few of the perturbations, each perturbation on two plates, so conditions span
shards and each plate's ``perturbation`` column has its own categories. A perturbation scales the
expression of its own 20 target genes up or down. Generation is vectorised per (cell type,
perturbation) group: non-zero genes are drawn by inverse CDF, counts as 1 + Poisson, duplicates
summed by scipy. A ``manifest.json`` written last marks a finished collection, which is reused
as it is; a changed request replaces it (one copy on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbdiff_core.io import atomic_path, atomic_write_text

#: Where collections go unless ``--out`` says otherwise.
DEFAULT_ROOT = Path(os.environ.get("PERTURBDIFF_ATLAS_DIR", "/tmp/perturbdiff_atlas"))
MANIFEST = "manifest.json"

#: Mean non-zero genes per cell (10% of 2,000 genes), the share of control cells, targets per perturbation.
NONZERO_PER_CELL = 200
CONTROL_FRACTION = 0.1
TARGETS = 20
PLATES_PER_PERTURBATION = 2


def plan(cells: int, shards: int, genes: int, perturbations: int, cell_types: int, seed: int) -> dict:
    """The parameters a collection is generated from (its manifest)."""
    return {"cells": cells, "shards": shards, "genes": genes, "perturbations": perturbations,
            "cell_types": cell_types, "seed": seed, "format": "perturbdiff.atlas-bench/1"}


def _model(spec: dict) -> dict:
    """Gene weights per cell type, count means per gene, and each perturbation's targets and fold changes."""
    rng = np.random.default_rng([spec["seed"], 0])
    genes, types = spec["genes"], spec["cell_types"]
    base = rng.normal(0.0, 1.0, genes)
    weights = np.exp(base[None, :] + rng.normal(0.0, 0.5, (types, genes)))
    extra = np.minimum(0.3 * np.exp(base + rng.normal(0.0, 0.5, genes)), 5.0)  # highly expressed genes count higher
    targets = np.stack([rng.choice(genes, TARGETS, replace=False) for _ in range(spec["perturbations"])])
    folds = np.exp(rng.choice([-1.5, 1.5], (spec["perturbations"], TARGETS)))
    return {"weights": weights, "extra": extra, "targets": targets, "folds": folds}


def plates_of(perturbation: int, shards: int) -> list[int]:
    """The plates a perturbation is measured on."""
    return sorted({(perturbation + k * (shards // PLATES_PER_PERTURBATION)) % shards for k in range(PLATES_PER_PERTURBATION)})


def _group_counts(rng: np.random.Generator, weights: np.ndarray, extra: np.ndarray, n: int) -> sp.csr_matrix:
    """``n`` cells of one group as a CSR of whole counts: non-zero genes drawn by inverse CDF of ``weights``."""
    per_cell = rng.poisson(NONZERO_PER_CELL * rng.lognormal(0.0, 0.25, n))
    rows = np.repeat(np.arange(n, dtype=np.int32), per_cell)
    cdf = np.cumsum(weights / weights.sum())
    cols = np.minimum(np.searchsorted(cdf, rng.random(len(rows))), len(weights) - 1).astype(np.int32)
    counts = (1 + rng.poisson(extra[cols])).astype(np.float32)
    out = sp.csr_matrix((counts, (rows, cols)), shape=(n, len(weights)))  # repeated genes are summed
    out.sum_duplicates()
    return out


def shard(spec: dict, model: dict, index: int) -> ad.AnnData:
    """Plate ``index``: controls of every cell type and its perturbations, rows shuffled."""
    rng = np.random.default_rng([spec["seed"], 1, index])
    n = spec["cells"] // spec["shards"] + (index < spec["cells"] % spec["shards"])
    here = [p for p in range(spec["perturbations"]) if index in plates_of(p, spec["shards"])]
    per_type = np.diff(np.linspace(0, n, spec["cell_types"] + 1).round().astype(int))
    blocks, labels, types = [], [], []
    for t, m in enumerate(per_type):
        n_control = max(1, round(CONTROL_FRACTION * m))
        sizes = np.diff(np.linspace(0, m - n_control, len(here) + 1).round().astype(int))
        for name, size, p in [("control", n_control, None)] + [(f"P{p:03d}", s, p) for p, s in zip(here, sizes)]:
            weights = model["weights"][t].copy()
            if p is not None:
                weights[model["targets"][p]] *= model["folds"][p]
            blocks.append(_group_counts(rng, weights, model["extra"], size))
            labels += [name] * size
            types += [f"line{t}"] * size
    counts = sp.vstack(blocks, format="csr")
    size_factor = 1e4 / np.maximum(np.asarray(counts.sum(1)).ravel(), 1.0)
    counts.data = np.log1p(counts.data * np.repeat(size_factor, np.diff(counts.indptr))).astype(np.float32)
    order = rng.permutation(n)
    obs = pd.DataFrame(
        {"perturbation": pd.Categorical(np.asarray(labels)[order]), "cell_type": pd.Categorical(np.asarray(types)[order]),
         "plate": pd.Categorical([f"plate{index:02d}"] * n)},
        index=[f"plate{index:02d}_{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"G{g:04d}" for g in range(spec["genes"])])
    return ad.AnnData(counts[order], obs=obs, var=var)


def ensure(root: Path, spec: dict, *, log=print) -> Path:
    """The collection folder of ``spec`` under ``root``, generated unless its manifest already matches."""
    folder = root / f"atlas_{spec['cells']}"
    manifest = folder / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) == spec:
        log(f"atlas: reusing {folder} ({spec['cells']:,} cells in {spec['shards']} shards)")
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # a partial or different collection: one copy on disk
    folder.mkdir(parents=True)
    model = _model(spec)
    start = time.perf_counter()
    for i in range(spec["shards"]):
        plate = shard(spec, model, i)
        with atomic_path(folder / f"plate{i:02d}.h5ad") as tmp:
            plate.write_h5ad(tmp)
        log(f"atlas: wrote plate {i + 1}/{spec['shards']} ({plate.n_obs:,} cells, "
            f"{plate.X.nnz / np.prod(plate.shape):.1%} non-zero) after {time.perf_counter() - start:.0f} s")
    atomic_write_text(manifest, json.dumps(spec, indent=1) + "\n")
    return folder


def disk_bytes(folder: Path) -> int:
    """Bytes of the shards of a collection."""
    return sum(p.stat().st_size for p in folder.glob("*.h5ad"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_ROOT, help="folder of the collections ($PERTURBDIFF_ATLAS_DIR)")
    parser.add_argument("--cells", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=100)
    parser.add_argument("--cell-types", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = plan(args.cells, args.shards, args.genes, args.perturbations, args.cell_types, args.seed)
    folder = ensure(args.out, spec, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"{folder} ({disk_bytes(folder) / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
