"""Write norman19's K562 cells with a ``replicate`` column, for the held-out replicate task.

A CRISPR screen's replicate (or a drug screen's donor) held out is the commonest new context a
user meets, and the bundled data have none as a column. Norman et al. 2019 sequenced its K562
cells on eight 10x lanes, the number after the barcode's dash (``...-3``); consecutive lanes are
paired into four replicates ``r1``-``r4`` (about 850 cells each: 20-32 control cells and 16-39
cells of every perturbation). ``examples/norman19_holdout_replicate.yaml`` holds one out.

Run from the repository root (a second; the output is written atomically):
    python scripts/k562_replicates.py [--out runs/data/norman19_k562_replicates.h5ad]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np

from perturbdiff_core.data.anndata_io import DATA_ENV, shared_data_dir
from perturbdiff_core.io import atomic_path

SOURCE = "norman19_mcfaline23.h5ad"
OUT = Path("runs/data/norman19_k562_replicates.h5ad")
#: 10x lanes per replicate: lanes 1-2 are r1, 3-4 r2, 5-6 r3, 7-8 r4.
LANES_PER_REPLICATE = 2


def k562_replicates(adata: ad.AnnData) -> ad.AnnData:
    """The K562 cells of ``adata`` with ``obs["replicate"]`` from their barcodes' 10x lane."""
    k562 = adata[(adata.obs["cell_type"] == "k562").to_numpy()].copy()
    lanes = np.array([int(name.rsplit("-", 1)[1]) for name in k562.obs_names])
    k562.obs["replicate"] = [f"r{(lane - 1) // LANES_PER_REPLICATE + 1}" for lane in lanes]
    return k562


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the file to write (default {OUT})")
    args = parser.parse_args()
    source = shared_data_dir() / SOURCE
    if not source.is_file():
        parser.exit(1, f"k562_replicates: {source} is missing; set {DATA_ENV} to the folder holding {SOURCE}.\n")
    adata = k562_replicates(ad.read_h5ad(source))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        adata.write_h5ad(tmp)
    counts = adata.obs["replicate"].value_counts().sort_index()
    print(f"wrote {args.out}: {adata.n_obs} K562 cells, replicates " + ", ".join(f"{r} {n}" for r, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
