"""A perturbation screen, validated and indexed: genes, conditions, control cells per context.

A *condition* is one perturbation (with its dose, when a dose key is set) in one *context*
(cell type x batch x extra covariates); its cells are the targets, and the control cells of the
same context are the model's input. Every check runs here, where the data arrives, each with
one clear DataError; nothing is written before they pass.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from torch import Tensor

from .. import registry
from ..configuration import check_ranges
from ..errors import DataError, PerturbDiffWarning
from .anndata_io import (
    layer_names,
    normalize_rows,
    require_cells,
    require_complete,
    require_genes,
    require_label,
    require_obs_key,
    require_unique_genes,
    require_valid_values,
    summarize_values,
    text_codes,
    with_layers_hint,
)
from .config import DataConfig
from .encoders import PerturbationEncoder, perturbation_parts
from .genes import align_genes, select_genes
from .sources import PERTURBATION_ROLE, open_source, worker_start_method

#: Joins the parts of a condition label: ``perturbation|cell_type|batch|covariates...``.
LABEL_SEPARATOR = "|"

#: Vocabulary entry 0: a cell type / batch / covariate value not seen in training, or none.
UNKNOWN = "<unknown>"

#: Marks the version of :meth:`PerturbationData.to_state` output.
STATE_FORMAT = "perturbdiff.data/1"


class Context(NamedTuple):
    """Where cells live: cell type, batch and extra covariate values (``None`` when not configured)."""

    cell_type: str | None = None
    batch: str | None = None
    covariates: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``cell_type|batch|covariates...`` without the parts that are not configured."""
        parts = [p for p in (self.cell_type, self.batch) if p is not None] + list(self.covariates)
        return LABEL_SEPARATOR.join(parts)


def nearest_contexts(context: Context, others: Sequence[Context], held_out: Sequence[str] = ()) -> list[Context]:
    """The contexts of ``others`` whose response to a perturbation predicts ``context``'s.

    Those sharing ``context``'s value of a field in ``held_out`` (``cell_type``, ``batch``: what the test holds
    out, :meth:`PerturbationData.held_out_fields`) are left out, so a training context is predicted as a test
    context will be: with cell types held out, from other cell types only. Of the rest, those of ``context``'s
    cell type if there are any (a held-out donor or patient from the other donors' same cell type: a response
    depends on the cell type first), else all of them.
    """
    pool = [c for c in others if all(getattr(c, field) != getattr(context, field) for field in held_out)]
    return [c for c in pool if c.cell_type == context.cell_type] or pool


def _annotations(var: pd.DataFrame | None, genes: Sequence[str]) -> pd.DataFrame | None:
    """The source's gene annotations of ``genes`` in their order (None without any); a gene the source lacks gets
    empty text or NaN, so the frame still writes to ``.h5ad``."""
    if var is None or var.shape[1] == 0:
        return None
    chosen = var.reindex(pd.Index(genes))
    for column in chosen.columns:
        if chosen[column].dtype == object:
            chosen[column] = chosen[column].fillna("")
    chosen.index.name = None
    return chosen


@dataclass(frozen=True)
class Condition:
    """One perturbation (at one dose) in one context, and how many cells it has."""

    label: str
    perturbation: str
    context: Context
    dose: float | None
    n_cells: int
    is_control: bool

    @property
    def cell_type(self) -> str | None:
        """The cell type of the context (``None`` without a cell type key)."""
        return self.context.cell_type

    @property
    def batch(self) -> str | None:
        """The batch of the context (``None`` without a batch key)."""
        return self.context.batch


def _shown(values: Iterable[Any], limit: int = 10) -> str:
    values = list(values)
    text = ", ".join(map(str, values[:limit]))
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "")


class PerturbationData:
    """A validated perturbation screen: selected genes, indexed conditions and control cells.

    Args:
        source: an AnnData (in memory or backed), a path to ``.h5ad``, or ``None`` for ``config.path``.
        config: the keys, gene selection and reading options.
        state: :meth:`to_state` of a trained model: its genes are aligned by name on this data
            (missing genes read as zeros, up to ``config.max_missing_genes``), and its
            vocabularies and encoder are reused instead of being fitted.

    Raises:
        ConfigError: a ``config`` value out of its range (``data.set_size: 0``).
        DataError: naming the problem and the fix, for every check in the module docstring.

    Example:
        >>> data = PerturbationData("kang18.h5ad", DataConfig(perturbation_key="condition",
        ...                         cell_type_key="cell_type", n_genes=2000))  # doctest: +SKIP
        >>> data.fit(split.train)  # encoder and vocabularies from the training conditions  # doctest: +SKIP
    """

    def __init__(
        self,
        source: ad.AnnData | str | os.PathLike[str] | None,
        config: DataConfig,
        *,
        state: dict[str, Any] | None = None,
    ) -> None:
        check_ranges(config, "data.")  # a DataConfig built in Python has not been checked yet
        self.config = config
        opened = open_source(source, config)
        obs, genes, self.matrix = opened.obs, opened.genes, opened.matrix
        self.source_report = opened.report  # one line on a collection's shards and genes, or a SOMA experiment
        self.source_parts = opened.parts  # [name, cells] per shard (or of a SOMA experiment); None for one file
        self._normalize = config.normalize and not opened.normalized
        self._check_obs(obs, config)
        require_genes(genes)
        require_unique_genes(genes)
        summary = opened.summary if opened.summary is not None else summarize_values(self.matrix)
        read_from = "X" if config.layer is None else f"layers[{config.layer!r}]"
        try:
            require_valid_values(summary, normalize=config.normalize, where=read_from)
        except DataError as err:
            others = [name for name in layer_names(config.path if source is None else source) if name != config.layer]
            raise with_layers_hint(err, others) from None
        self.total_genes = len(genes)  # genes in the file, before selection
        self.missing_genes: list[str] = []
        if state is not None:
            self._check_state(state)
            self.genes = list(state["genes"])
            self._gene_pos, self.missing_genes = align_genes(genes, self.genes, config.max_missing_genes)
        else:
            self.genes = select_genes(
                genes,
                n_genes=config.n_genes,
                gene_list=config.gene_list,
                n_cells=self.matrix.shape[0],
                read_rows=lambda rows: self._raw_rows(rows),
            )
            self._gene_pos = genes.get_indexer(self.genes).astype(np.int64)
        self._identity = len(self.genes) == len(genes) and bool(np.all(self._gene_pos == np.arange(len(genes))))
        self.gene_annotations = _annotations(opened.var, self.genes)
        self._index_conditions(obs, config, drop_small=state is None)
        self.matrix.close()  # reopened lazily where rows are read (each DataLoader worker)
        self.vocabularies: dict[str, list[str]] = {}
        self._encoder: PerturbationEncoder | None = None
        if state is not None:
            self.vocabularies = {k: list(v) for k, v in state["vocabularies"].items()}
            self._encoder = self._build_encoder(state["encoder"]["name"], state["encoder"]["params"])
            self._encoder.load_state_dict(state["encoder"]["state"])

    # ----------------------------------------------------------------------------- reading

    def _raw_rows(self, rows: np.ndarray) -> np.ndarray | sp.spmatrix:
        """Rows over all genes of the source, normalised when ``config.normalize``."""
        block = self.matrix.rows(rows)
        return normalize_rows(block) if self._normalize else block

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Cells ``rows`` (positions, any order, repeats allowed) over the model's genes: ``(n, G)`` float32."""
        block = self._raw_rows(rows)
        if self._identity:
            selected = block
        elif self.missing_genes:
            present = self._gene_pos >= 0
            out = np.zeros((block.shape[0], len(self.genes)), dtype=np.float32)
            part = block[:, self._gene_pos[present]]
            out[:, present] = part.toarray() if sp.issparse(part) else np.asarray(part)
            return out
        else:
            selected = block[:, self._gene_pos]
        dense = selected.toarray() if sp.issparse(selected) else np.asarray(selected)
        return np.ascontiguousarray(dense, dtype=np.float32)

    @property
    def worker_start_method(self) -> str | None:
        """How DataLoader workers reading these cells must start: ``spawn`` for a SOMA experiment
        (TileDB is not fork-safe), ``None`` (the platform's default) otherwise."""
        return worker_start_method(self.matrix)

    @property
    def n_genes(self) -> int:
        """Number of model genes ``G``."""
        return len(self.genes)

    # --------------------------------------------------------------------------- checking

    @staticmethod
    def _check_obs(obs: pd.DataFrame, config: DataConfig) -> None:
        """Keys present and complete, the control label present (no perturbation key: every cell is a control)."""
        keys = [(k, w) for k, w in ((config.perturbation_key, PERTURBATION_ROLE),) if k is not None]
        keys += [
            (k, w)
            for k, w in (
                (config.cell_type_key, "cell type key"),
                (config.batch_key, "batch key"),
                (config.dose_key, "dose key"),
            )
            if k is not None
        ]
        keys += [(k, "covariate key") for k in config.covariate_keys]
        require_cells(obs)
        for key, what in keys:
            require_obs_key(obs, key, what)
        for key, what in keys:
            if key == config.perturbation_key:  # the role's aside on a missing column does not fit a missing value
                require_complete(obs, key, "perturbation key", allowed=config.control_label)
            elif key != config.dose_key:
                require_complete(obs, key, what)
        if config.perturbation_key is not None:
            require_label(obs, config.perturbation_key, config.control_label)

    @staticmethod
    def _check_state(state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(
                f"This is not a perturbdiff data state (format {STATE_FORMAT!r}); pass the output of "
                f"PerturbationData.to_state() saved with the model."
            )

    # --------------------------------------------------------------------------- indexing

    def _index_conditions(self, obs: pd.DataFrame, config: DataConfig, *, drop_small: bool) -> None:
        """Group cells into conditions; index control cells per context; check every context has controls.

        Vectorised over integer codes (no Python work per cell), so millions of cells index in
        seconds. With ``drop_small`` (data read to train on) conditions below
        ``config.min_cells_per_condition`` are left out first (:meth:`_drop_small`)."""
        self.left_out: list[Condition] = []  # by data.min_cells_per_condition (:meth:`_drop_small`)
        roles = {"perturbation": config.perturbation_key, "cell_type": config.cell_type_key, "batch": config.batch_key}
        roles.update({f"covariate:{k}": k for k in config.covariate_keys})
        roles = {role: key for role, key in roles.items() if key is not None}
        self.unused_categories: dict[str, list[str]] = {
            role: sorted(map(str, set(obs[key].cat.categories) - set(obs[key].unique())))
            for role, key in roles.items()
            if isinstance(obs[key].dtype, pd.CategoricalDtype)
        }
        n = len(obs)
        columns = {role: text_codes(obs[key]) for role, key in roles.items()}  # role -> (codes, text of each code)
        if "perturbation" not in columns:  # no perturbation key: every cell is unperturbed
            columns = {"perturbation": (np.zeros(n, dtype=np.int64), np.array([config.control_label], dtype=object)), **columns}
        codes, names = columns["perturbation"]
        sep, control_label = config.combination_separator, config.control_label
        control_name = np.array([not perturbation_parts(str(v), sep, control_label) for v in names], dtype=bool)
        is_control = control_name[codes]
        merged, distinct = pd.factorize(np.where(control_name, control_label, names.astype(object)))  # controls: one name
        columns["perturbation"] = (merged[codes].astype(np.int64), np.asarray(distinct, dtype=object))
        if config.dose_key is not None:
            doses = self._doses(obs[config.dose_key], is_control, config)
            dose_codes, dose_values = pd.factorize(doses)
            columns["dose"] = (dose_codes.astype(np.int64), np.asarray(dose_values, dtype=np.float64))
        group_keys = list(columns)  # perturbation, cell type, batch, covariates, dose: the order labels sort by
        key = np.zeros(n, dtype=np.int64)
        for role in group_keys:
            key = key * len(columns[role][1]) + columns[role][0]
        _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")  # cells by group, ascending rows within each
        bounds = np.concatenate([[0], np.cumsum(counts)])
        groups = []
        for g, row in enumerate(first):
            values = tuple(columns[role][1][columns[role][0][row]] for role in group_keys)
            groups.append((values, order[bounds[g]:bounds[g + 1]].astype(np.int64)))
        covariates = [r for r in group_keys if r.startswith("covariate:")]
        self.conditions: list[Condition] = []
        self._cells: dict[str, np.ndarray] = {}
        self._controls: dict[Context, np.ndarray] = {}
        for key_values, rows in sorted(groups, key=lambda item: item[0]):
            values = {role: (v if role == "dose" else str(v)) for role, v in zip(group_keys, key_values)}
            context = Context(values.get("cell_type"), values.get("batch"), tuple(values[c] for c in covariates))
            control = values["perturbation"] == config.control_label
            dose = None if config.dose_key is None or control else float(values["dose"])
            name = values["perturbation"] if dose is None else f"{values['perturbation']}@{dose:g}"
            label = LABEL_SEPARATOR.join([name, context.label]) if context.label else name
            self.conditions.append(Condition(label, values["perturbation"], context, dose, len(rows), control))
            self._cells[label] = rows
            if control:
                self._controls[context] = rows
        if drop_small:
            self._drop_small(config.min_cells_per_condition)
        self._by_label = {c.label: c for c in self.conditions}
        lacking = sorted({c.context.label for c in self.conditions if c.context not in self._controls})
        if lacking:
            raise DataError(
                f"No control cells ({config.control_label!r}) in context(s) {_shown(lacking, 5)}; every cell "
                f"type / batch needs its own control cells. Add them, or drop data.batch_key or the "
                f"covariate that separates them."
            )

    def _drop_small(self, minimum: int) -> None:
        """Leave out conditions with fewer than ``minimum`` cells, and every condition of a context whose
        control set is that small, with one warning naming them; DataError when nothing perturbed is left."""
        small = {c.context for c in self.conditions if c.is_control and c.n_cells < minimum}
        dropped = [c for c in self.conditions if c.n_cells < minimum or c.context in small]
        if not dropped:
            return
        for condition in dropped:
            del self._cells[condition.label]
            if condition.is_control:
                del self._controls[condition.context]
        self.conditions = [c for c in self.conditions if c.label in self._cells]
        self.left_out = dropped
        listed = _shown([f"{c.label} ({c.n_cells} cell{'s' * (c.n_cells != 1)})" for c in dropped if c.n_cells < minimum], 8)
        with_controls = f"; and with their too few controls, {_shown([c.label for c in dropped if c.n_cells >= minimum], 8)}" if small else ""
        if not self.perturbed_conditions:
            raise DataError(
                f"Every perturbed condition has fewer than data.min_cells_per_condition = {minimum} cells (or too "
                f"few controls): {listed}{with_controls}. Lower data.min_cells_per_condition to train on them."
            )
        warnings.warn(
            f"{len(dropped)} condition(s) with fewer than data.min_cells_per_condition = {minimum} cells are left out: "
            f"{listed}{with_controls}. Set data.min_cells_per_condition lower to keep them.",
            PerturbDiffWarning,
            stacklevel=2,
        )

    @staticmethod
    def _doses(column: pd.Series, is_control: np.ndarray, config: DataConfig) -> np.ndarray:
        """Dose per cell (0 for controls); ``a+b`` (a combination's doses) is their total."""
        codes, text = text_codes(column)
        parsed = np.full(len(text), np.nan)
        for i, value in enumerate(text):
            try:
                parsed[i] = sum(float(p) for p in str(value).split(config.combination_separator))
            except ValueError:
                pass
        doses = np.where(is_control, 0.0, parsed[codes])
        bad = ~(np.isfinite(doses) & (doses >= 0))
        if bad.any():
            raise DataError(
                f"obs[{config.dose_key!r}] has {int(bad.sum())} perturbed cells without a valid dose "
                f"(e.g. {text[codes[bad][0]]!r}); doses must be non-negative numbers (a combination's as "
                f"'1{config.combination_separator}0.5'). Fix the column or unset data.dose_key."
            )
        return doses

    # ------------------------------------------------------------------------- accessors

    @property
    def perturbed_conditions(self) -> list[Condition]:
        """Every condition whose cells are perturbed (the training and test points)."""
        return [c for c in self.conditions if not c.is_control]

    @property
    def contexts(self) -> list[Context]:
        """Every context with control cells, sorted."""
        return sorted(self._controls, key=lambda c: c.label)

    def condition(self, condition: str | Condition) -> Condition:
        """The condition of a label; DataError when the data has no cell of it."""
        label = condition.label if isinstance(condition, Condition) else str(condition)
        if label not in self._by_label:
            raise DataError(
                f"Condition {label!r} has zero cells in this data; conditions found: "
                f"{_shown(sorted(self._by_label), 8)}. Check the split file or the condition label."
            )
        return self._by_label[label]

    def cells(self, condition: str | Condition) -> np.ndarray:
        """Sorted row positions of a condition's cells."""
        return self._cells[self.condition(condition).label]

    def control_cells(self, context: Context) -> np.ndarray:
        """Sorted row positions of the control cells of ``context``; DataError when there are none."""
        if context not in self._controls:
            raise DataError(
                f"Context {context.label or 'all cells'!r} has zero control cells in this data; contexts "
                f"with controls: {_shown([c.label for c in self.contexts], 8)}."
            )
        return self._controls[context]

    def restrict(self, condition: str | Condition, rows: np.ndarray) -> None:
        """Keep only ``rows``, a non-empty subset of a perturbed condition's cells (e.g. to train on a fraction)."""
        chosen = self.condition(condition)
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if chosen.is_control or not len(rows) or not np.isin(rows, self._cells[chosen.label]).all():
            raise DataError(f"Cannot restrict {chosen.label!r} to those rows: give a non-empty subset of its perturbed cells.")
        self._cells[chosen.label] = rows
        smaller = replace(chosen, n_cells=len(rows))
        self.conditions[self.conditions.index(chosen)] = smaller
        self._by_label[chosen.label] = smaller

    # ---------------------------------------------------------------- conditioning (fitted)

    def fit(self, conditions: Sequence[str | Condition] | None = None) -> PerturbationData:
        """Fit the encoder and the cell type / batch / covariate vocabularies on training conditions.

        Only what training saw gets its own one-hot column or vocabulary index; a held-out
        cell type maps to index 0 (:data:`UNKNOWN`). ``None`` uses every perturbed condition.
        """
        chosen = self.perturbed_conditions if conditions is None else [self.condition(c) for c in conditions]
        if not chosen:
            raise DataError("No training conditions to fit the perturbation encoder on; check the split.")
        cfg = self.config
        self.vocabularies = {"cell_type": [UNKNOWN], "batch": [UNKNOWN]}
        if cfg.cell_type_key is not None:
            self.vocabularies["cell_type"] += sorted({c.cell_type for c in chosen})
        if cfg.batch_key is not None:
            self.vocabularies["batch"] += sorted({c.batch for c in chosen})
        for i, key in enumerate(cfg.covariate_keys):
            self.vocabularies[key] = [UNKNOWN, *sorted({c.context.covariates[i] for c in chosen})]
        encoder = self._build_encoder(cfg.encoder, cfg.encoder_params)
        encoder.fit(
            [c.perturbation for c in chosen],
            control_label=cfg.control_label,
            separator=cfg.combination_separator,
            use_dose=cfg.dose_key is not None,
        )
        self._encoder = encoder
        return self

    @staticmethod
    def _build_encoder(name: str, params: dict[str, Any]) -> PerturbationEncoder:
        return registry.load("perturbdiff.encoders", name, **params)

    def _require_fitted(self) -> PerturbationEncoder:
        if self._encoder is None:
            raise DataError(
                "The perturbation encoder is not fitted; call data.fit(split.train) (or use "
                "perturbdiff_core.data.prepare) before building loaders."
            )
        return self._encoder

    @property
    def encoder(self) -> PerturbationEncoder:
        """The fitted perturbation encoder."""
        return self._require_fitted()

    def index(self, field: str, value: str | None) -> int:
        """Vocabulary index of a cell type / batch / covariate value; 0 when unseen or ``None``."""
        self._require_fitted()
        vocab = self.vocabularies[field]
        return vocab.index(value) if value in vocab[1:] else 0

    def held_out_fields(self, conditions: Sequence[str | Condition]) -> tuple[str, ...]:
        """The context fields (``cell_type``, ``batch``) of which some of ``conditions`` has a value the fitted
        vocabularies lack: what a split of them as test holds out (:func:`nearest_contexts`)."""
        return tuple(field for field, values in self._unseen_values(conditions).items() if values)

    def unseen_contexts(self, conditions: Sequence[str | Condition]) -> list[str]:
        """The cell types and batches of ``conditions`` that the fitted vocabularies lack, sorted: they
        get :data:`UNKNOWN` (data without a cell type or batch key have none)."""
        return sorted(set().union(*self._unseen_values(conditions).values()))

    def _unseen_values(self, conditions: Sequence[str | Condition]) -> dict[str, set[str]]:
        """Per configured context field (``cell_type``, ``batch``), the values of ``conditions`` its vocabulary lacks."""
        keys = {"cell_type": self.config.cell_type_key, "batch": self.config.batch_key}
        chosen = [c if isinstance(c, Condition) else self.condition(c) for c in conditions]
        return {
            field: {str(getattr(c, field)) for c in chosen if self.index(field, getattr(c, field)) == 0}
            for field, key in keys.items() if key is not None
        }

    def encode(self, conditions: Sequence[str | Condition]) -> Tensor:
        """``(n, P)`` perturbation encodings of conditions (with their doses)."""
        chosen = [self.condition(c) for c in conditions]
        doses = [c.dose or 0.0 for c in chosen] if self.config.dose_key is not None else None
        return self.encoder.encode([c.perturbation for c in chosen], doses)

    def context_indices(self, context: Context) -> tuple[int, int]:
        """``(cell_type, batch)`` vocabulary indices of a context."""
        return self.index("cell_type", context.cell_type), self.index("batch", context.batch)

    # ----------------------------------------------------------------------- persistence

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable: genes, vocabularies, encoder (name, parameters, fitted state), and for a
        collection or a SOMA experiment its parts (``[name, cells]`` each, see :meth:`require_same_parts`)."""
        state = {
            "format": STATE_FORMAT,
            "genes": list(self.genes),
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
            "encoder": {
                "name": self.config.encoder,
                "params": dict(self.config.encoder_params),
                "state": self.encoder.state_dict(),
            },
        }
        if self.source_parts is not None:
            state["parts"] = self.source_parts
        return state

    def require_same_parts(self, state: dict[str, Any]) -> None:
        """DataError unless these cells come from the shards (names and cell counts) that ``state`` was
        saved from: a resumed run draws its sets by row position, so added, removed or changed shards
        would change the training stream."""
        before, now = state.get("parts"), self.source_parts
        if before is None or before == now:
            return
        was = {name: cells for name, cells in before}
        is_ = {name: cells for name, cells in now or []}
        changes = [f"{n} added" for n in is_ if n not in was] + [f"{n} removed" for n in was if n not in is_]
        changes += [f"{n} has {is_[n]} cells, had {was[n]}" for n in is_ if n in was and is_[n] != was[n]]
        changes = changes or ["the shards are in another order"]
        raise DataError(
            f"The data changed since the run was saved ({_shown(changes, 4)}); a run resumes exactly only on the "
            f"same shards. Point data.path at them, or start a new run (--init-from the saved one keeps its weights)."
        )

    @classmethod
    def from_state(
        cls, state: dict[str, Any], source: ad.AnnData | str | os.PathLike[str] | None, config: DataConfig
    ) -> PerturbationData:
        """New data read with a trained model's genes (aligned by name), vocabularies and encoder."""
        return cls(source, config, state=state)

    def __repr__(self) -> str:
        return (
            f"PerturbationData({self.matrix.shape[0]} cells, {len(self.genes)} genes, "
            f"{len(self.perturbed_conditions)} perturbed conditions, {len(self._controls)} contexts)"
        )
