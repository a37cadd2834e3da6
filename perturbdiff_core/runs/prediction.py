"""Predicting with a trained run: its data (or a new file read on its genes), the conditions named
by labels, the run's anchor fitted again, and the predicted AnnData.

Shared by ``perturbdiff predict`` and the notebook API (:mod:`perturbdiff`), so both sample the
same cells for the same arguments.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import anndata as ad
import torch

from ..data.anndata_io import NormalizationMismatch
from ..data.config import DataConfig
from ..data.dataset import LABEL_SEPARATOR, Condition, Context, PerturbationData
from ..data.encoders import perturbation_parts
from ..data.sources import data_available, obs_keys
from ..errors import DataError, InputError, PerturbDiffWarning
from ..evaluation.predictors import Predictor, predict_anndata
from ..threads import apply_threads, resolve_threads
from .anchor import NO_ANCHOR, fit_anchor
from .checkpoint import Checkpoint
from .config import SampleConfig
from .control_noise import ControlShrinkage
from .ensemble import NO_ENSEMBLE, Ensemble, fit_ensemble, resolve_ensemble
from .model_predictor import DiffusionPredictor
from .shrinkage import ShiftShrinkage
from .training import resolve_context_drop


def open_data(
    checkpoint: Checkpoint, data: str | ad.AnnData | None = None, run_data: ad.AnnData | None = None
) -> PerturbationData:
    """Cells to predict from, read with the run's genes: ``data`` (another file or AnnData, genes aligned
    by name; missing genes reported in one stderr line), else the run's own data (``run_data`` when the
    run was trained from an AnnData in memory, else its ``data.path``)."""
    config = checkpoint.run_config.data
    source: ad.AnnData | None = None
    if isinstance(data, ad.AnnData):
        source = data
    elif data is not None:
        config = replace(config, path=data, source="h5ad", obs_filter=None)  # another file, read as it is
    elif run_data is not None:
        source = run_data
    elif not data_available(config.path):
        raise DataError(f"The run's data file {config.path} is not available here; pass the file with --data.")
    if data is not None:
        _require_run_keys(config, data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*genes are missing from this data", category=UserWarning)
        try:
            opened = PerturbationData.from_state(checkpoint.data_state, source, config)
        except NormalizationMismatch as err:
            if data is None:
                raise
            raise _unlike_training(err, "The AnnData given" if source is not None else str(data)) from None
    if opened.missing_genes:
        shown = ", ".join(opened.missing_genes[:5]) + (", ..." if len(opened.missing_genes) > 5 else "")
        where = config.path if source is None else "the AnnData given"
        print(
            f"perturbdiff: note: {len(opened.missing_genes)} of the model's {opened.n_genes} genes are missing from "
            f"{where} and are read as zeros: {shown}; their predicted cells are 0 too, marked by var['measured'] False",
            file=sys.stderr,
        )
    return opened


def _unlike_training(err: NormalizationMismatch, where: str) -> DataError:
    """The error for cells to predict from whose values are not in the form the run was trained on: the run's
    data.normalize is fixed, so the advice is to give the file in that form."""
    if err.counts:
        return DataError(
            f"{where} holds raw counts, but the run was trained on log-normalised values (data.normalize: false). "
            f"Give log-normalised values in X, normalised as the training data were (e.g. sc.pp.normalize_total "
            f"with the same target sum, then sc.pp.log1p)."
        )
    return DataError(
        f"{where} is not raw counts, but the run was trained on raw counts it normalised itself (data.normalize: "
        f"true). Give the raw counts in X (e.g. from adata.layers['counts'] or adata.raw)."
    )


def _require_run_keys(config: DataConfig, data: str | ad.AnnData) -> None:
    """DataError unless another file (or AnnData) to predict from has the obs columns the run was trained with."""
    if isinstance(data, ad.AnnData):
        obs = data.obs
    else:
        backed = ad.read_h5ad(data, backed="r")  # obs only; X stays on disk
        obs = backed.obs
        backed.file.close()
    missing = [(column, key) for column, key in obs_keys(config).items() if column not in obs.columns]
    if missing:
        where = "The AnnData given" if isinstance(data, ad.AnnData) else str(data)
        named = ", ".join(f"{key!r} ({role})" for key, role in missing)
        raise DataError(
            f"{where} lacks the obs column(s) the run reads: {named}; its columns are: {', '.join(map(str, obs.columns))}. "
            f"Rename the columns of the file to the run's keys (its config.yaml, data:)."
        )


def _context_of(data: PerturbationData, parts: list[str], label: str) -> Context:
    """The context named by the parts of a label after the perturbation, in the data config's order."""
    cfg = data.config
    expected = ["cell_type"] * (cfg.cell_type_key is not None) + ["batch"] * (cfg.batch_key is not None) + cfg.covariate_keys
    if len(parts) != len(expected):
        form = LABEL_SEPARATOR.join(["perturbation", *expected])
        raise InputError(f"Condition label {label!r} has {len(parts)} context part(s); this run's labels read {form!r}.")
    values = dict(zip(expected, parts))
    context = Context(values.get("cell_type"), values.get("batch"), tuple(parts[len(parts) - len(cfg.covariate_keys):]))
    data.control_cells(context)  # DataError listing the contexts with controls when there are none
    return context


def _new_condition(data: PerturbationData, perturbation: str, context: Context) -> Condition:
    """A condition without cells in ``data`` (predicted from its context's controls)."""
    if perturbation == data.config.control_label:
        raise InputError(f"{perturbation!r} is the control label; name perturbed conditions.")
    label = LABEL_SEPARATOR.join([perturbation, context.label]) if context.label else perturbation
    return Condition(label, perturbation, context, None, 0, False)


def _cell_types(data: PerturbationData) -> set[str]:
    return {c.cell_type for c in data.contexts if c.cell_type is not None}


def _in_cell_type(data: PerturbationData, perturbation: str, cell_type: str) -> list[Condition]:
    """``perturbation`` in every context of ``cell_type`` where it has cells, or in every context of
    that cell type when it has none."""
    seen = [c for c in data.perturbed_conditions if c.perturbation == perturbation and c.cell_type == cell_type]
    contexts = [context for context in data.contexts if context.cell_type == cell_type]
    return seen or [_new_condition(data, perturbation, context) for context in contexts]


def _slash_label(data: PerturbationData, item: str) -> tuple[str, str] | None:
    """``(cell_type, perturbation)`` of ``cell_type/perturbation``, the label ``metrics.csv`` and the
    report wrote before they took the data's ``perturbation|cell_type``, when ``item`` starts with one
    of the data's cell types and a slash; else ``None``. The longest cell type wins, so a cell type
    may itself hold ``/`` or ``+`` (``CD14+Mono/stimulated``)."""
    matches = [t for t in _cell_types(data) if item.startswith(f"{t}/") and len(item) > len(t) + 1]
    if not matches:
        return None
    cell_type = max(matches, key=len)
    return cell_type, item[len(cell_type) + 1 :]


def resolve_conditions(data: PerturbationData, requested: Sequence[str]) -> list[Condition]:
    """The conditions named by perturbation names or labels.

    - ``perturbation``: every context where it has cells, or every context with control cells
      when it has none;
    - ``perturbation|cell_type|batch`` (the parts the data config has): that condition;
    - ``perturbation|cell_type`` when the data also has a batch key or covariates (``metrics.csv``'s
      label before it kept the batches apart): the perturbation in every context of that cell type;
    - ``cell_type/perturbation``, the label of ``metrics.csv`` files written by earlier versions:
      the same.
    """
    by_label = {c.label: c for c in data.perturbed_conditions}
    known = {c.perturbation for c in data.perturbed_conditions}
    by_cell_type = data.config.cell_type_key is not None and (data.config.batch_key is not None or bool(data.config.covariate_keys))
    chosen: list[Condition] = []
    for item in requested:
        item = _known_order(item, known, data.config)
        if item in by_label:
            chosen.append(by_label[item])
        elif LABEL_SEPARATOR in item:
            perturbation, *parts = item.split(LABEL_SEPARATOR)
            if by_cell_type and len(parts) == 1 and parts[0] in _cell_types(data):
                chosen += _in_cell_type(data, perturbation, parts[0])
            else:
                chosen.append(_new_condition(data, perturbation, _context_of(data, parts, item)))
        elif item not in known and (pair := _slash_label(data, item)) is not None:
            cell_type, perturbation = pair
            chosen += _in_cell_type(data, perturbation, cell_type)
        else:
            seen = [c for c in data.perturbed_conditions if c.perturbation == item]
            chosen += seen or [_new_condition(data, item, context) for context in data.contexts]
    chosen = list({c.label: c for c in chosen}.values())  # a condition named twice is predicted once
    data.encoder.encode([c.perturbation for c in chosen])  # an unencodable perturbation fails before sampling
    return chosen


def _known_order(item: str, known: set[str], config: DataConfig) -> str:
    """``item`` with its perturbation spelt as the data spells the same combination (``B+A`` as ``A+B``), if it does."""
    perturbation, *rest = item.split(LABEL_SEPARATOR)
    if perturbation in known or config.combination_separator not in perturbation:
        return item
    parts = sorted(perturbation_parts(perturbation, config.combination_separator, config.control_label))
    same = [p for p in known if sorted(perturbation_parts(p, config.combination_separator, config.control_label)) == parts]
    return LABEL_SEPARATOR.join([same[0], *rest]) if len(same) == 1 else item


def training_data(
    checkpoint: Checkpoint, data: PerturbationData | None, run_data: ad.AnnData | None = None
) -> PerturbationData:
    """The run's own data with its split applied: ``data`` when given (the run's data, opened already),
    else ``run_data`` or the run's file (DataError naming it when it is not here: predicting cells of
    another file in a context the run lacked still fits the anchor and control means on it)."""
    path = checkpoint.run_config.data.path
    if data is None and run_data is None and not data_available(path):
        raise DataError(
            f"The run's anchor and the control means of its training contexts are fitted on its training data, "
            f"{path}, which is not available here; make it available (or set PERTURBDIFF_DATA to its folder)."
        )
    train_data = open_data(checkpoint, None, run_data) if data is None else data
    checkpoint.split.apply(train_data)
    return train_data


def run_anchor(checkpoint: Checkpoint, train_data: Callable[[], PerturbationData]) -> Predictor | None:
    """The run's ``model.anchor`` fitted again on its training conditions of ``train_data()`` (read only for
    a run with an anchor, see :func:`training_data`); ``None`` for a run without an anchor."""
    name = checkpoint.anchor_name
    if name == NO_ANCHOR:
        return None
    data = train_data()
    return fit_anchor(name, data, checkpoint.split.train, data.held_out_fields(checkpoint.split.test))


def run_control_shrinkage(
    checkpoint: Checkpoint, train_data: Callable[[], PerturbationData], conditions: Sequence[Condition], data: PerturbationData
) -> ControlShrinkage | None:
    """The run's ``sample.control_shrinkage`` with the control means of its training contexts in ``train_data()``;
    ``None`` (nothing read) when none of ``conditions`` of ``data`` is in a context training lacked."""
    config = checkpoint.run_config
    if not data.unseen_contexts(conditions):
        return None
    return ControlShrinkage.fit(config.sample.control_shrinkage, train_data(), checkpoint.split.train, config.seed)


def run_shrinkage(
    checkpoint: Checkpoint, train_data: Callable[[], PerturbationData], conditions: Sequence[Condition], data: PerturbationData
) -> ShiftShrinkage | None:
    """The run's ``sample.anchor_shrinkage`` and ``sample.ensemble_shrinkage`` resolved on its training conditions of
    ``train_data()``; ``None`` (nothing read) when none of ``conditions`` of ``data`` is in a context training lacked."""
    if not data.unseen_contexts(conditions):
        return None
    sample = checkpoint.run_config.sample
    return ShiftShrinkage.fit(sample.anchor_shrinkage, sample.ensemble_shrinkage, train_data(), checkpoint.split.train)


def run_ensemble(
    checkpoint: Checkpoint, train_data: Callable[[], PerturbationData], conditions: Sequence[Condition], data: PerturbationData
) -> Ensemble | None:
    """The run's ``sample.ensemble`` fitted on its training conditions of ``train_data()``; ``None`` without one or
    when no condition of ``conditions`` of ``data`` is an extrapolation it applies to (``train_data`` is read only
    when one may be: a condition in an unseen context or a combination)."""
    setting, anchor = checkpoint.run_config.sample.ensemble, checkpoint.anchor_name
    if resolve_ensemble(setting, anchor).name == NO_ENSEMBLE:
        return None
    cfg = data.config
    combinations = any(
        len(perturbation_parts(c.perturbation, cfg.combination_separator, cfg.control_label)) > 1 for c in conditions
    )
    if not (combinations or data.unseen_contexts(conditions)):
        return None
    config = checkpoint.run_config
    return fit_ensemble(
        setting, anchor, train_data(), checkpoint.split.train, conditions, config.seed, data, config.sample.response_fdr
    )


def warn_untrained_context(
    checkpoint: Checkpoint,
    data: PerturbationData,
    conditions: Sequence[Condition],
    run_data: Callable[[], PerturbationData],
) -> None:
    """Warn when ``conditions`` have a cell type or batch training lacked while the run never trained the
    ``<unknown>`` context they get (``train.context_drop_prob`` 0, or ``auto`` on a split that did not
    need it): that embedding is still random. ``run_data`` reads the run's own data, called only for
    ``auto`` (no warning when that data is not available)."""
    unseen = data.unseen_contexts(conditions)
    prob = checkpoint.run_config.train.context_drop_prob
    if not unseen or (prob != "auto" and float(prob) > 0):
        return
    if prob == "auto":
        try:
            trained_on = run_data()
        except DataError:
            return
        if resolve_context_drop(prob, trained_on, checkpoint.split.test) > 0:
            return
    warnings.warn(
        f"{', '.join(unseen[:5])} {'was' if len(unseen) == 1 else 'were'} not in this run's training data and get "
        f"the <unknown> context, which the run never trained (train.context_drop_prob was 0 for its split): these "
        f"predictions rest on a random embedding. Train with these contexts held out in the split "
        f"(train.context_drop_prob: auto), or with train.context_drop_prob above 0.",
        PerturbDiffWarning,
        stacklevel=2,
    )


def checkpoint_predictor(
    checkpoint: Checkpoint,
    device: torch.device | str,
    train_data: Callable[[], PerturbationData],
    conditions: Sequence[Condition],
    data: PerturbationData,
    sample: SampleConfig | None = None,
) -> DiffusionPredictor:
    """The checkpoint's predictor of ``conditions`` of ``data`` with every rule the run resolved, fitted again on
    its training conditions of ``train_data()`` (anchor, control and shift shrinkage, ensemble; read only where
    needed), sampling as ``sample`` (default: the run's): what ``perturbdiff predict`` samples with."""
    return DiffusionPredictor.from_checkpoint(
        checkpoint, sample, device=device, anchor=run_anchor(checkpoint, train_data),
        control_shrinkage=run_control_shrinkage(checkpoint, train_data, conditions, data),
        ensemble=run_ensemble(checkpoint, train_data, conditions, data),
        shrinkage=run_shrinkage(checkpoint, train_data, conditions, data),
        ceiling=checkpoint.ceiling if checkpoint.run_config.sample.ceiling == "training" else None,
    )


def predict_run(
    checkpoint: Checkpoint,
    *,
    device: torch.device,
    data: str | ad.AnnData | None = None,
    run_data: ad.AnnData | None = None,
    conditions: Sequence[str] | None = None,
    n_cells: int | None = None,
    seed: int | None = None,
    populations: int = 1,
    progress: bool = True,
) -> ad.AnnData:
    """Predicted cells (and the real control cells of their contexts) from ``checkpoint``.

    Args:
        device: where to sample.
        data: another ``.h5ad`` path or AnnData whose control cells to use (genes aligned by name);
            default the run's own data: ``run_data`` (the AnnData it was trained from) or its file.
        conditions: perturbation names or condition labels (:func:`resolve_conditions`); default
            the run's test conditions, or with ``data`` every perturbed condition in it.
        n_cells: cells per condition; default ``sample.n_cells``, else as many as the real condition.
        seed: sampling seed; default the run's seed.
        populations: independent populations per condition (obs ``population``).
    """
    if seed is not None and seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed}.")
    opened = open_data(checkpoint, data, run_data)
    apply_threads(resolve_threads(checkpoint.run_config.train.threads))  # reading the data may have reset it
    if conditions:
        chosen = resolve_conditions(opened, conditions)
    elif data is None:
        chosen = [opened.condition(c) for c in checkpoint.split.test]
    else:
        chosen = opened.perturbed_conditions
        if not chosen:
            where = "The AnnData given" if isinstance(data, ad.AnnData) else data
            raise InputError(f"{where} has no perturbed cells; name what to predict with --conditions and --n-cells.")
    n_cells = n_cells if n_cells is not None else checkpoint.run_config.sample.n_cells
    if n_cells is not None and n_cells < 1:
        raise InputError(f"--n-cells must be a positive integer, got {n_cells}.")
    empty = [c.label for c in chosen if c.n_cells == 0]
    if empty and n_cells is None:
        raise InputError(
            f"Condition(s) {', '.join(empty[:5])}{f' and {len(empty) - 5} more' if len(empty) > 5 else ''} have no "
            f"cells in the data, so the number of cells to predict is "
            f"unknown; pass --n-cells N."
        )
    if populations < 1:
        raise InputError(f"--populations must be a positive integer, got {populations}.")
    own = opened if data is None else None
    warn_untrained_context(checkpoint, opened, chosen, lambda: own if own is not None else open_data(checkpoint, None, run_data))
    train_data = functools.cache(lambda: training_data(checkpoint, own, run_data))
    predictor = checkpoint_predictor(checkpoint, device, train_data, chosen, opened)
    seed = checkpoint.run_config.seed if seed is None else seed
    predicted = predict_anndata(
        predictor, opened, chosen, n_cells=n_cells, seed=seed, populations=populations, progress=progress
    )
    return unmeasured_as_zero(predicted, opened.missing_genes)


def unmeasured_as_zero(adata: ad.AnnData, missing: Sequence[str]) -> ad.AnnData:
    """``adata`` with the genes ``missing`` from the data predicted from set to 0 in every cell and marked in
    ``var['measured']``: their control cells were read as zeros, so anything the model predicts for them is made
    up, and a non-zero value would read as a rise in a DE test."""
    if not missing:
        return adata
    unmeasured = adata.var_names.isin(list(missing))
    adata.X[:, unmeasured] = 0.0
    adata.var["measured"] = ~unmeasured
    return adata
