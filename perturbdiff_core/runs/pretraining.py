"""Marginal pre-training (``train.objective: marginal``): learn p(cell set | cell type, batch) from control cells.

Each training point is one context's control condition: the target is a set of its control
cells, the control set another draw from the same cells, and the perturbation encoding is
zeroed (Yuan et al. 2026 pre-train this way before fine-tuning on perturbations). The model
keeps a perturbation input of at least one column so its fine-tuned copy has the same layers.
:func:`concat_unperturbed` gathers the unperturbed cells of several AnnData (e.g. a reference
atlas and a screen's controls) on their shared genes into one AnnData in memory; atlases larger
than memory are pre-trained on from the command line instead, as a collection of ``.h5ad`` files
or a SOMA experiment with ``data.perturbation_key: null`` (every cell unperturbed; see
``docs/own_data.md``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..configuration import check_ranges
from ..data.batch import SetBatch
from ..data.config import DataConfig, SplitConfig
from ..data.dataset import PerturbationData
from ..data.prepare import save_prepared
from ..data.splits import Split
from ..errors import ConfigError, DataError

#: obs columns of :func:`concat_unperturbed`'s output (use them as data.perturbation_key,
#: data.cell_type_key and data.batch_key), and its perturbation value.
PERTURBATION, CELL_TYPE, SOURCE, CONTROL = "perturbation", "cell_type", "source", "control"


def marginal_split(data: PerturbationData, config: SplitConfig) -> Split:
    """Every context's control condition trains; ``val_fraction`` of them (seeded) also validate; no test."""
    check_ranges(config, "split.")
    if config.holdout or config.file is not None or config.train_fraction != 1.0:
        raise ConfigError(
            "train.objective marginal trains on the control cells of every context; leave split.holdout, "
            "split.file and split.train_fraction unset."
        )
    controls = sorted(c.label for c in data.conditions if c.is_control)
    n_val = max(1, round(config.val_fraction * len(controls))) if config.val_fraction > 0 else 0
    rng = np.random.default_rng([config.seed, 1])
    val = sorted(np.array(controls)[rng.choice(len(controls), n_val, replace=False)].tolist())
    return Split(config, controls, val, [])


def prepare_marginal(
    data_config: DataConfig,
    split_config: SplitConfig,
    source: ad.AnnData | str | os.PathLike[str] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
) -> tuple[PerturbationData, Split]:
    """:func:`~perturbdiff_core.data.prepare` for marginal pre-training: vocabularies fitted on every context."""
    data = PerturbationData(source, data_config)
    split = marginal_split(data, split_config)
    data.fit(split.train)
    if out_dir is not None:
        save_prepared(data, split, out_dir)
    return data, split


def marginal_batch(batch: SetBatch, perturbation_dim: int) -> SetBatch:
    """``batch`` with its perturbation encoding replaced by zeros ``(B, perturbation_dim)``."""
    zeros = batch.cond.perturbation.new_zeros(batch.target.shape[0], perturbation_dim)
    return replace(batch, cond=replace(batch.cond, perturbation=zeros))


@dataclass(frozen=True)
class UnperturbedSource:
    """Where the unperturbed cells of one AnnData are.

    Attributes:
        adata: the AnnData (or ``.h5ad`` path); ``use_raw`` reads ``adata.raw`` (e.g. when X is scaled).
        name: its label in the output's ``source`` column (the batch of pre-training).
        cell_type_key: obs column of the cell type.
        perturbation_key / control_label: keep only the cells whose perturbation is the control
            label (``None``: every cell is unperturbed).
    """

    adata: ad.AnnData | str | os.PathLike[str]
    name: str
    cell_type_key: str
    perturbation_key: str | None = None
    control_label: str = CONTROL
    use_raw: bool = False


def _cells_of(source: UnperturbedSource) -> ad.AnnData:
    adata = source.adata if isinstance(source.adata, ad.AnnData) else ad.read_h5ad(source.adata)
    for key in (source.cell_type_key, source.perturbation_key):
        if key is not None and key not in adata.obs:
            raise DataError(f"{source.name}: obs has no column {key!r}; the columns are {', '.join(adata.obs)}.")
    if source.use_raw and adata.raw is None:
        raise DataError(f"{source.name}: use_raw is set but the AnnData has no .raw; unset use_raw.")
    keep = np.ones(adata.n_obs, dtype=bool)
    if source.perturbation_key is not None:
        keep = adata.obs[source.perturbation_key].astype(str).to_numpy() == source.control_label
        if not keep.any():
            raise DataError(f"{source.name}: no cell has {source.perturbation_key} = {source.control_label!r}.")
    matrix = adata.raw.X if source.use_raw else adata.X
    var_names = adata.raw.var_names if source.use_raw else adata.var_names
    obs = pd.DataFrame(
        {
            PERTURBATION: CONTROL,
            CELL_TYPE: adata.obs[source.cell_type_key].astype(str).to_numpy()[keep],
            SOURCE: source.name,
        },
        index=[f"{source.name}:{i}" for i in adata.obs_names[keep]],
    )
    return ad.AnnData(sp.csr_matrix(matrix[np.flatnonzero(keep)], dtype=np.float32), obs=obs,
                      var=pd.DataFrame(index=var_names.astype(str)))


def concat_unperturbed(sources: Sequence[UnperturbedSource]) -> ad.AnnData:
    """The unperturbed cells of every source on the genes all of them measure (first source's order).

    obs: ``perturbation`` (always ``control``), ``cell_type`` and ``source``; ``uns["genes_dropped"]``
    counts the genes each source loses to the intersection. Values are copied, not rescaled: give
    sources normalised the same way (log1p of normalised counts).
    """
    if not sources:
        raise DataError("No sources to concatenate; give at least one UnperturbedSource.")
    parts = [_cells_of(s) for s in sources]
    shared = set.intersection(*(set(p.var_names) for p in parts))
    genes = [g for g in parts[0].var_names if g in shared]
    if not genes:
        raise DataError("The sources share no gene name; check the gene naming (symbols vs IDs).")
    out = ad.concat([p[:, genes] for p in parts], join="inner")
    out.obs = out.obs.astype("category")
    out.uns["genes_dropped"] = {s.name: int(p.n_vars - len(genes)) for s, p in zip(sources, parts)}
    return out
