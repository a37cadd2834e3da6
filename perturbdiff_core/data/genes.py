"""Which genes the model sees: highly variable genes (scanpy), a given list, or a saved list aligned by name."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ConfigError, DataError

#: Most cells scanpy sees when it ranks highly variable genes; larger data is subsampled (seeded),
#: so gene selection needs bounded memory whatever the number of cells.
HVG_MAX_CELLS = 10_000

#: Seed of that subsample, fixed so the same file always gives the same genes.
HVG_SEED = 0


def _shown(names: Sequence[str], limit: int = 5) -> str:
    text = ", ".join(map(str, list(names)[:limit]))
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def read_gene_list(gene_list: Sequence[str] | str) -> list[str]:
    """The genes of a list, or of a text file with one gene per line; repeats are refused."""
    if isinstance(gene_list, str):
        path = Path(gene_list)
        if not path.exists():
            raise DataError(f"No such gene list file: {path}. Give a text file with one gene per line, or a list.")
        genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        genes = [str(g) for g in gene_list]
    if not genes:
        raise DataError("data.gene_list is empty; give at least one gene or leave it unset.")
    repeated = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(repeated):
        raise DataError(f"data.gene_list names genes twice: {_shown(repeated)}; list each gene once.")
    return genes


def select_genes(
    genes: pd.Index,
    *,
    n_genes: int | None,
    gene_list: Sequence[str] | str | None,
    n_cells: int,
    read_rows: Callable[[np.ndarray], np.ndarray | sp.spmatrix],
) -> list[str]:
    """The model's genes, in data order for HVGs and in list order for a given list.

    ``read_rows(rows)`` returns those cells over all genes (normalised), for scanpy's HVG ranking.
    """
    if n_genes is not None and gene_list is not None:
        raise ConfigError("Give either data.n_genes (highly variable genes) or data.gene_list, not both.")
    if gene_list is not None:
        wanted = read_gene_list(gene_list)
        missing = [g for g in wanted if g not in genes]
        if missing:
            raise DataError(
                f"Fewer genes than requested: {len(missing)} of the {len(wanted)} genes of data.gene_list "
                f"are not in the data ({_shown(missing)}). Fix the list or the gene naming (symbols vs IDs)."
            )
        return wanted
    if n_genes is None:
        return genes.astype(str).tolist()
    if n_genes > len(genes):
        raise DataError(
            f"Fewer genes than requested: data.n_genes is {n_genes} but the data has only "
            f"{len(genes)} genes. Lower data.n_genes, or leave it unset to use all genes."
        )
    if n_genes == len(genes):
        return genes.astype(str).tolist()
    return highly_variable_genes(genes, n_genes, n_cells, read_rows)


def highly_variable_genes(
    genes: pd.Index, n_genes: int, n_cells: int, read_rows: Callable[[np.ndarray], np.ndarray | sp.spmatrix]
) -> list[str]:
    """The ``n_genes`` top genes by scanpy's normalised dispersion (``flavor="seurat"``, log data).

    Exactly ``n_genes`` come back, in data order (scanpy's own cut can give more on ties); at most
    :data:`HVG_MAX_CELLS` cells (a seeded subsample) are used.
    """
    import scanpy as sc  # slow import, only needed here

    rows = np.arange(n_cells)
    if n_cells > HVG_MAX_CELLS:
        rows = np.sort(np.random.default_rng(HVG_SEED).choice(n_cells, HVG_MAX_CELLS, replace=False))
    cells = ad.AnnData(read_rows(rows), var=pd.DataFrame(index=genes.astype(str)))
    stats = sc.pp.highly_variable_genes(cells, flavor="seurat", inplace=False)
    score = np.nan_to_num(stats["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)
    keep = np.sort(np.argsort(-score, kind="stable")[:n_genes])
    return genes.astype(str)[keep].tolist()


def align_genes(available: pd.Index, wanted: Sequence[str], max_missing: float) -> tuple[np.ndarray, list[str]]:
    """Column of each wanted gene in ``available`` (``-1`` when missing) and the missing genes.

    Refuses (DataError) when more than ``max_missing`` of the wanted genes are missing; warns otherwise.
    """
    position = pd.Index(available).get_indexer(list(wanted))
    missing = [g for g, p in zip(wanted, position) if p < 0]
    if len(missing) > max_missing * len(wanted):
        raise DataError(
            f"{len(missing)} of the model's {len(wanted)} genes ({len(missing) / len(wanted):.0%}) are "
            f"missing from this data ({_shown(missing)}); at most {max_missing:.0%} may be missing "
            f"(data.max_missing_genes). Check the gene naming (symbols vs IDs) or use data measured on the same genes."
        )
    if missing:
        warnings.warn(
            f"{len(missing)} of the model's {len(wanted)} genes are missing from this data and are read "
            f"as zeros: {_shown(missing)}.",
            UserWarning,
            stacklevel=3,
        )
    return position.astype(np.int64), missing
