"""What users write under ``data:`` and ``split:`` in a config, as small typed dataclasses.

Constructors only store values; :meth:`DataConfig.from_dict` / :meth:`SplitConfig.from_dict`
check keys and types (ConfigError), and the data itself is checked where it arrives
(:class:`~perturbdiff_core.data.dataset.PerturbationData`, :func:`~perturbdiff_core.data.splits.make_split`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal, get_args

from ..configuration import from_mapping
from ..constraints import HalfOpenUnit, NonNegative, OpenUnit, Positive, Range, UnitInterval

SplitKind = Literal[
    "holdout_cell_type", "holdout_batch", "holdout_perturbation", "holdout_combination", "few_shot", "random"
]

#: The split kinds users type in ``split.kind``.
SPLIT_KINDS: tuple[str, ...] = get_args(SplitKind)

#: Control pairings: ``random`` (the paper's) and ``ot`` (see :mod:`perturbdiff_core.data.pairing`).
PairingName = Literal["random", "ot"]

#: Where ``data.path`` points: ``.h5ad`` files, or a TileDB-SOMA experiment (see :mod:`perturbdiff_core.data.sources`).
SourceName = Literal["h5ad", "soma"]


@dataclass
class DataConfig:
    """How to read a perturbation screen from AnnData (``data.*`` in a config).

    Attributes:
        path: the ``.h5ad`` file; or a collection of shards: a list of files, a glob
            (``plates/*.h5ad``) or a folder of ``.h5ad`` files; or with ``source: soma`` the URI of a
            TileDB-SOMA experiment (unused when an AnnData object is given directly).
        perturbation_key: obs column naming each cell's perturbation; ``null``: every cell is
            unperturbed (only for ``train.objective: marginal``).
        control_label: value of that column for unperturbed (control) cells.
        cell_type_key: obs column of the cell type (or cell line); ``null`` when the data has one.
        batch_key: obs column of the batch (or donor, plate, ...); ``null`` when the data has one.
        dose_key: obs column of the dose; ``log1p(dose)`` becomes one extra perturbation feature.
        covariate_keys: further categorical obs columns that split conditions and contexts
            (controls are matched on them too), e.g. a time point.
        combination_separator: separator of combined perturbations, ``A+B``.
        n_genes: keep this many highly variable genes (scanpy); ``None`` keeps all genes.
        gene_list: an explicit gene list, or the path of a text file with one gene per line.
        layer: read the expression from this entry of the file's (or AnnData's) ``layers`` instead of
            X, e.g. ``log1p`` beside raw counts in X, or ``counts`` with ``normalize: true``
            (``null``: X; one file or AnnData: a SOMA experiment's is ``soma_layer``).
        normalize: normalise raw counts (``normalize_total`` to 1e4, then ``log1p``) instead of
            refusing them.
        backed: read the file in backed mode: rows are read on demand, memory stays flat
            (collections and SOMA experiments are always read so).
        source: ``h5ad`` (files) or ``soma`` (a TileDB-SOMA experiment, e.g. the CELLxGENE Census;
            needs ``pip install 'perturbdiff[soma]'``).
        genes: how a collection's genes are aligned by name: ``intersect`` (the genes every shard
            has), ``union`` (any shard's genes, read as 0 where a shard lacks one) or the path of a
            text file with one gene per line.
        obs_filter: keep only the cells this obs expression selects, e.g. ``cell_type == 'B'``
            (``and``, ``or``, ``in [...]``); TileDB evaluates it for SOMA, pandas for files.
        soma_measurement: the SOMA measurement to read.
        soma_layer: its X layer (``null``: ``data``, else ``raw``, else the only one).
        soma_var_column: the var column of gene names (``null``: ``feature_name``, else ``var_id``).
        soma_context: TileDB configuration of the SOMA context (e.g. ``vfs.s3.region``).
        set_size: cells per set ``S``.
        control_pairing: ``random`` or ``ot`` (training only; prediction always draws at random).
        encoder: ``perturbdiff.encoders`` plug-in name (``onehot``, or ``lookup`` for vectors read from a table).
        encoder_params: the encoder's keyword arguments.
        max_missing_genes: largest fraction of the model's genes a new file may lack at
            prediction time (missing genes are read as zeros).
        min_cells_per_condition: a condition of the training data with fewer cells is left out,
            with a warning naming it; a context with fewer control cells is left out with its
            conditions. A set drawn from one or two cells is no population: it would train the
            model on a point and evaluate it against one. 1 keeps everything.
    """

    path: str | list[str] | None = None
    perturbation_key: str | None = "perturbation"
    control_label: str = "control"
    cell_type_key: str | None = None
    batch_key: str | None = None
    dose_key: str | None = None
    covariate_keys: list[str] = field(default_factory=list)
    combination_separator: str = "+"
    n_genes: Annotated[int | None, Positive] = None
    gene_list: list[str] | str | None = None
    layer: str | None = None
    normalize: bool = False
    backed: bool = False
    source: SourceName = "h5ad"
    genes: str = "intersect"
    obs_filter: str | None = None
    soma_measurement: str = "RNA"
    soma_layer: str | None = None
    soma_var_column: str | None = None
    soma_context: dict[str, Any] = field(default_factory=dict)
    set_size: Annotated[int, Positive] = 256
    control_pairing: PairingName = "random"
    encoder: str = "onehot"
    encoder_params: dict[str, Any] = field(default_factory=dict)
    max_missing_genes: Annotated[float, UnitInterval] = 0.1
    min_cells_per_condition: Annotated[int, Positive] = 5

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """Build from a ``data:`` mapping; unknown keys and wrong types raise ConfigError."""
        return from_mapping(cls, values, prefix="data.")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML / JSON ready) that :meth:`from_dict` turns back into this config."""
        return asdict(self)


@dataclass
class SplitConfig:
    """Which conditions are trained on and which are held out (``split.*`` in a config).

    Attributes:
        kind: what is held out: cell types, batches, perturbations, combinations, a few-shot share of
            contexts, or a random share of conditions (examples in ``docs/own_data.md``).
        holdout: the held-out values: cell types, batches, perturbations, combinations, or (for
            ``few_shot``) the held-out cell types or batches (see ``few_shot_on``).
        few_shot_fraction: share of a held-out context's conditions moved into training.
        few_shot_on: ``cell_type`` or ``batch``: what the few-shot held-out values name.
        test_fraction: share of conditions held out by ``random``.
        val_fraction: share of training conditions also used for periodic validation.
        train_fraction: share of each training condition's cells kept, in (0, 1] (at least one
            cell each, a seeded draw): fine-tuning on a fraction of the perturbation data.
        seed: seed of every random choice of the split.
        file: a ``split.json`` written by an earlier run; when given it is reloaded (to repeat a
            run exactly) instead of being made.
    """

    kind: SplitKind = "random"
    holdout: list[str] = field(default_factory=list)
    few_shot_fraction: Annotated[float, OpenUnit] = 0.2
    few_shot_on: Literal["cell_type", "batch"] = "cell_type"
    test_fraction: Annotated[float, OpenUnit] = 0.2
    val_fraction: Annotated[float, HalfOpenUnit] = 0.1
    train_fraction: Annotated[float, Range(0, 1, closed_left=False)] = 1.0
    seed: Annotated[int, NonNegative] = 0
    file: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SplitConfig:
        """Build from a ``split:`` mapping; unknown keys and wrong types raise ConfigError."""
        return from_mapping(cls, values, prefix="split.")

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML / JSON ready) that :meth:`from_dict` turns back into this config."""
        return asdict(self)
