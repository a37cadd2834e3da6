"""A collection of ``.h5ad`` shards read as one screen: ``data.path`` as a list, a glob or a folder.

The shards' cells follow one another in collection order (the list's order; file names sorted
for a glob or a folder). Their genes are aligned by name (``data.genes``): ``intersect`` keeps the
genes every shard measures, ``union`` every gene of any shard (read as 0 in a shard that lacks
it), and a file name keeps the genes listed in it (one per line). Their obs columns are
reconciled as text categories, so a perturbation, cell type or batch is the same value in every
shard, a condition may span shards and control cells of a context are drawn from every shard.
Start-up reads each shard's index (:mod:`~perturbdiff_core.data.shard_index`, cached beside the
shards) instead of its cells; the cells are read on demand (:class:`~perturbdiff_core.data.sharded.ShardedMatrix`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from ..progress import progress_bar
from .anndata_io import ValueSummary, normalize_rows, require_unique_genes, require_valid_values
from .genes import read_gene_list
from .shard_index import ShardIndex, build_index, cached_index
from .sharded import ShardedMatrix

#: ``data.genes`` values other than a file name.
GENE_MODES = ("intersect", "union")

_GLOB_CHARS = set("*?[")


def _shown(values: Sequence[str], limit: int = 5) -> str:
    text = ", ".join(map(str, list(values)[:limit]))
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def collection_paths(path: str | os.PathLike[str] | Sequence[str]) -> list[Path] | None:
    """The shards ``data.path`` names: a list of files (or globs), a glob, or a folder of ``.h5ad``
    files; ``None`` for the path of one file, which is read as a single screen."""
    if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if Path(text).is_dir():
            found = sorted(Path(text).glob("*.h5ad"))
            if not found:
                raise DataError(
                    f"The folder {text} holds no .h5ad file; give a folder of .h5ad shards, a glob or a list "
                    f"(for a TileDB-SOMA experiment, set data.source: soma)."
                )
            return found
        if not _GLOB_CHARS & set(text):
            return None
        items = [text]
    else:
        items = [os.fspath(p) for p in path]
        if not items:
            raise DataError("data.path is an empty list; list the .h5ad shards of the collection.")
    paths: list[Path] = []
    for item in items:
        if _GLOB_CHARS & set(item):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item)))
            if not found:
                raise DataError(f"No file matches {item}; check the pattern (e.g. data/plate*.h5ad).")
            paths += found
        else:
            paths.append(Path(item).expanduser())
    for p in paths:
        if not p.is_file():
            raise DataError(f"No such shard: {p}. Every entry of data.path must be an .h5ad file.")
    seen = pd.Index([str(p.resolve()) for p in paths])
    if seen.has_duplicates:
        raise DataError(f"data.path names a shard twice: {_shown(seen[seen.duplicated()].tolist())}; list each shard once.")
    return paths


@dataclass
class Collection:
    """The shards as one screen: obs (text categoricals), the aligned genes, the rows, a value summary
    and a one-line report of what was kept."""

    shards: list[ShardIndex]
    obs: pd.DataFrame
    genes: pd.Index
    matrix: ShardedMatrix
    summary: ValueSummary
    report: str


def index_shards(paths: Sequence[Path], keys: Sequence[str]) -> list[ShardIndex]:
    """Each shard's index with the obs columns ``keys``: cached ones read, the others built (with progress)."""
    indexes = [cached_index(p, keys) for p in paths]
    missing = [i for i, index in enumerate(indexes) if index is None]
    if missing:
        with progress_bar(total=len(missing), desc="indexing shards", unit="shards") as bar:
            for i in missing:
                indexes[i] = build_index(paths[i], keys)
                bar.update(1)
    return indexes


def _require_columns(shards: Sequence[ShardIndex], roles: dict[str, str]) -> None:
    """Every shard has every configured obs column; DataError naming the column, its role and the shard."""
    for shard in shards:
        for key, what in roles.items():
            if key not in shard.columns:
                raise DataError(
                    f"Shard {shard.path} has no obs column {key!r} (the {what}); its columns are: "
                    f"{', '.join(shard.obs_columns) or 'none'}. Every shard needs the configured columns."
                )


def _reconciled(shards: Sequence[ShardIndex], key: str) -> pd.Categorical:
    """obs column ``key`` of every shard, concatenated, on the union of their categories (sorted)."""
    categories = pd.Index(sorted(set().union(*(s.columns[key][1].tolist() for s in shards))), dtype=object)
    parts = []
    for shard in shards:
        codes, own = shard.columns[key]
        mapped = categories.get_indexer(own) if len(own) else np.zeros(0, dtype=np.int64)
        parts.append(np.where(codes >= 0, mapped[np.maximum(codes, 0)] if len(own) else -1, -1))
    codes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return pd.Categorical.from_codes(codes, categories=categories)


def align_genes_of(shards: Sequence[ShardIndex], mode: str) -> tuple[pd.Index, list[np.ndarray | None], str]:
    """The collection's genes under ``data.genes`` = ``mode``, each shard's column of each gene
    (``None``: same genes in order), and a one-line report of what was kept and dropped."""
    for shard in shards:
        try:
            require_unique_genes(shard.genes)
        except DataError as err:
            raise DataError(f"Shard {shard.path}: {err}") from None
    seen = pd.Index(pd.unique(np.concatenate([np.asarray(s.genes, dtype=object) for s in shards])))
    if mode == "intersect":
        shared = set(shards[0].genes).intersection(*(set(s.genes) for s in shards[1:]))
        genes = pd.Index([g for g in shards[0].genes if g in shared], dtype=object)
        if not len(genes):
            raise DataError("The shards share no gene name; check their gene naming (symbols vs IDs), or set data.genes: union.")
    elif mode == "union":
        genes = seen
    else:
        genes = pd.Index(read_gene_list(mode), dtype=object)
        unseen = genes[~genes.isin(seen)].tolist()
        if unseen:
            raise DataError(
                f"{len(unseen)} of the {len(genes)} genes of data.genes ({mode}) are in no shard ({_shown(unseen)}); "
                f"fix the list or the gene naming (symbols vs IDs)."
            )
    take = []
    for shard in shards:
        position = shard.genes.get_indexer(genes)
        same = len(shard.genes) == len(genes) and bool(np.all(position == np.arange(len(genes))))
        take.append(None if same else position)
    dropped = seen[~seen.isin(genes)].tolist()
    partial = sum(bool(np.any(t < 0)) for t in take if t is not None)
    line = f"genes ({mode if mode in GENE_MODES else 'from ' + Path(mode).name}): {len(genes):,} kept"
    line += f", {len(dropped):,} dropped (e.g. {', '.join(map(str, dropped[:3]))})" if dropped else ", none dropped"
    if partial:
        line += f"; {partial} shard(s) lack some of them, read as 0 there"
    return genes, take, line


def _summary(shards: Sequence[ShardIndex], normalize: bool, n_genes: int) -> ValueSummary:
    """Each shard's values checked (naming the shard), and what they add up to."""
    filled = [s for s in shards if s.n_obs]
    for shard in filled:
        require_valid_values(shard.summary, normalize=normalize, where=f"X of shard {shard.path}")
    summaries = [s.summary for s in filled]
    return ValueSummary(
        finite=all(s.finite for s in summaries),
        minimum=min(s.minimum for s in summaries),
        maximum=max(s.maximum for s in summaries),
        integer=all(s.integer for s in summaries),
        genes=n_genes,
    )


def open_collection(paths: Sequence[Path], roles: dict[str, str], *, genes: str, normalize: bool) -> Collection:
    """The shards ``paths`` as one screen with the obs columns ``roles`` (column -> what it is, for errors)."""
    shards = index_shards(paths, list(roles))
    _require_columns(shards, roles)
    if not sum(s.n_obs for s in shards):
        raise DataError(f"The {len(shards)} shards of data.path hold no cells; give shards with cells.")
    gene_index, take, gene_line = align_genes_of(shards, genes)
    summary = _summary(shards, normalize, len(gene_index))
    obs = pd.DataFrame({key: _reconciled(shards, key) for key in roles})
    matrix = ShardedMatrix(
        [s.path for s in shards], [s.n_obs for s in shards], take, len(gene_index),
        transform=normalize_rows if normalize else None,
    )
    report = f"collection of {len(shards)} shards, {len(obs):,} cells; {gene_line}"
    return Collection(shards, obs, gene_index, matrix, summary, report)
