"""How much of spearman_lfc is the control cells' sampling noise: kang18, each cell type, from the data alone.

spearman_lfc ranks every gene's fold change, and both the real and the predicted one divide by the
same control cells. Most of the 1,000 genes the kang18 configs score are detected in a few control cells, so the noise
of that shared denominator can carry the rank correlation by itself. Each cell type's control cells
are split in random halves A and B (``--repeats`` times); the real stimulated cells' fold change
against A is compared with:

- ``no change``: half B's cells as the prediction (against A): predicts nothing, shares no noise;
- ``other types, shared``: stimulated cells of the other cell types (what ``random_train`` draws),
  against A, the same control cells as the real fold change;
- ``other types, apart``: the same cells against B.

Run from the repository root (under a minute):
    python scripts/spearman_lfc_noise.py [--data PATH] [--repeats 5] [--seed 0]
"""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import scipy.sparse as sp

from perturbdiff_core.data.anndata_io import shared_data_dir
from perturbdiff_core.data.genes import highly_variable_genes
from perturbdiff_core.evaluation.pseudobulk import correlation, log2_fold_change

CELL_TYPE, CONDITION, CONTROL, STIMULATED = "cell_type", "condition", "control", "stimulated"
#: The bundled kang18 configs' ``data.n_genes``: the genes the suite scores.
N_GENES = 1000


def dense(adata: ad.AnnData) -> np.ndarray:
    """float64 cells x genes."""
    return (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(np.float64)


def scores(cells: ad.AnnData, cell_type: str, repeats: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean over ``repeats`` splits of the three correlations of the module docstring."""
    here, stimulated = cells.obs[CELL_TYPE] == cell_type, cells.obs[CONDITION] == STIMULATED
    real = dense(cells[(here & stimulated).values]).mean(0)
    control = dense(cells[(here & ~stimulated).values])
    others = dense(cells[(~here & stimulated).values]).mean(0)
    out = []
    for _ in range(repeats):
        order = rng.permutation(len(control))
        a, b = control[order[: len(order) // 2]].mean(0), control[order[len(order) // 2 :]].mean(0)
        truth = log2_fold_change(real, a)
        out.append(
            [
                correlation("spearman", log2_fold_change(b, a), truth),
                correlation("spearman", log2_fold_change(others, a), truth),
                correlation("spearman", log2_fold_change(others, b), truth),
            ]
        )
    return tuple(np.mean(out, axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="kang18 h5ad (default: the shared data folder's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cells = ad.read_h5ad(args.data or shared_data_dir() / "kang18_pbmc_ifnb.h5ad")
    cells = cells[:, highly_variable_genes(cells.var_names, N_GENES, cells.n_obs, lambda rows: cells.X[rows])]
    rng = np.random.default_rng(args.seed)
    print("| held out | control cells | no change | other types, shared | other types, apart |")
    print("|---|---|---|---|---|")
    for cell_type in sorted(cells.obs[CELL_TYPE].unique()):
        n = int(((cells.obs[CELL_TYPE] == cell_type) & (cells.obs[CONDITION] == CONTROL)).sum())
        no_change, shared, apart = scores(cells, cell_type, args.repeats, rng)
        print(f"| {cell_type} | {n} | {no_change:.3f} | {shared:.3f} | {apart:.3f} |")


if __name__ == "__main__":
    main()
