"""How much of a fold-change or delta metric is the control cells' sampling noise, from the data alone.

``spearman_lfc`` and ``pearson_delta`` compare the predicted and the real change, and both changes are
taken against the same control cells. Where the real change is weak next to those cells' sampling
noise (kang18's many barely detected genes; the glioma lines' knock-downs), the noise of that shared
reference can carry the correlation by itself. Each held-out context's control cells are split in
random halves A and B (``--repeats`` times); the real perturbed cells' change against A is compared
with:

- ``no change``: half B's cells as the prediction (against A): predicts nothing, shares no noise;
- ``elsewhere, shared``: the perturbation's cells in the other contexts (what ``random_train`` draws on
  kang18; the same knock-down in the other lines on norman19), against A, as the real change is;
- ``elsewhere, apart``: the same cells against B.

kang18: spearman_lfc of each held-out cell type over the 1,000 genes its configs score. norman19:
pearson_delta of each glioma line, the mean over its knock-downs, over the file's 500 genes.

Run from the repository root (about a minute):
    python scripts/shared_control_noise.py [--repeats 5] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from perturbdiff_core.data.anndata_io import shared_data_dir
from perturbdiff_core.data.genes import highly_variable_genes
from perturbdiff_core.evaluation.pseudobulk import correlation, log2_fold_change

CELL_TYPE, CONTROL = "cell_type", "control"
#: The bundled kang18 configs' ``data.n_genes``: the genes the suite scores.
KANG18_GENES = 1000
#: norman19's K562 cells: not a glioma line.
K562 = "k562"

#: A change of ``mean`` against the control mean ``control``, as the metric takes it.
Change = Callable[[np.ndarray, np.ndarray], np.ndarray]


def dense(adata: ad.AnnData) -> np.ndarray:
    """float64 cells x genes."""
    return (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(np.float64)


def split_scores(
    real: np.ndarray, elsewhere: np.ndarray, control: np.ndarray, kind: str, change: Change, rng: np.random.Generator
) -> list[float]:
    """The three correlations of the module docstring for one random split of ``control`` ``(cells, genes)``."""
    order = rng.permutation(len(control))
    a, b = control[order[: len(order) // 2]].mean(0), control[order[len(order) // 2 :]].mean(0)
    truth = change(real, a)
    return [
        correlation(kind, change(b, a), truth),
        correlation(kind, change(elsewhere, a), truth),
        correlation(kind, change(elsewhere, b), truth),
    ]


def kang18_rows(data_dir: Path, repeats: int, rng: np.random.Generator) -> list[str]:
    """spearman_lfc per held-out kang18 cell type."""
    cells = ad.read_h5ad(data_dir / "kang18_pbmc_ifnb.h5ad")
    cells = cells[:, highly_variable_genes(cells.var_names, KANG18_GENES, cells.n_obs, lambda rows: cells.X[rows])]
    stimulated = (cells.obs["condition"] == "stimulated").values
    rows = []
    for cell_type in sorted(cells.obs[CELL_TYPE].unique()):
        here = (cells.obs[CELL_TYPE] == cell_type).values
        control = dense(cells[here & ~stimulated])
        real, elsewhere = dense(cells[here & stimulated]).mean(0), dense(cells[~here & stimulated]).mean(0)
        scores = [split_scores(real, elsewhere, control, "spearman", log2_fold_change, rng) for _ in range(repeats)]
        rows.append(f"| kang18 {cell_type} | spearman_lfc | {len(control)} | " + " | ".join(f"{v:.3f}" for v in np.mean(scores, 0)) + " |")
    return rows


def glioma_rows(data_dir: Path, repeats: int, rng: np.random.Generator) -> list[str]:
    """pearson_delta per held-out glioma line, the mean over its knock-downs."""
    cells = ad.read_h5ad(data_dir / "norman19_mcfaline23.h5ad")
    lines = sorted(set(cells.obs[CELL_TYPE]) - {K562})
    rows = []
    for line in lines:
        here = cells[(cells.obs[CELL_TYPE] == line).values]
        others = cells[(~cells.obs[CELL_TYPE].isin([line, K562])).values]
        control = dense(here[(here.obs["perturbation"] == CONTROL).values])
        scores = []
        for perturbation in sorted(set(here.obs["perturbation"]) - {CONTROL}):
            elsewhere = others[(others.obs["perturbation"] == perturbation).values]
            if elsewhere.n_obs == 0:
                continue
            real = dense(here[(here.obs["perturbation"] == perturbation).values]).mean(0)
            scores += [
                split_scores(real, dense(elsewhere).mean(0), control, "pearson", np.subtract, rng) for _ in range(repeats)
            ]
        rows.append(f"| norman19 {line} | pearson_delta | {len(control)} | " + " | ".join(f"{v:.3f}" for v in np.nanmean(scores, 0)) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, data_dir = np.random.default_rng(args.seed), shared_data_dir()
    print("| held out | metric | control cells | no change | elsewhere, shared | elsewhere, apart |")
    print("|---|---|---|---|---|---|")
    for row in kang18_rows(data_dir, args.repeats, rng) + glioma_rows(data_dir, args.repeats, rng):
        print(row)


if __name__ == "__main__":
    main()
