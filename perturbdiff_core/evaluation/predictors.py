"""Predictors: control cells + a condition -> predicted perturbed cells.

The diffusion model and every baseline implement :class:`Predictor`, so ``perturbdiff run`` and
``perturbdiff evaluate`` treat them alike. Prediction files follow cell-eval's layout: the
predicted cells of each condition plus the real control cells of their contexts, unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from ..data.config import DataConfig
from ..data.dataset import Condition, Context, PerturbationData
from ..errors import InputError
from ..names import POPULATION_KEY
from ..progress import progress_bar

#: Cells predicted to estimate a predictor's mean shift when it does not model the shift itself.
SHIFT_CELLS = 512


class Predictor(ABC):
    """Predicts the cells of a perturbed condition in its context."""

    #: Context fields (``cell_type``, ``batch``) the test holds out, set before :meth:`fit` where the predictor
    #: serves as ``model.anchor`` or ``sample.ensemble``: a training condition's shift is then best predicted
    #: without the contexts that share its values of them, as a test condition's is (the built-in shift
    #: baselines do, :func:`~perturbdiff_core.data.dataset.nearest_contexts`).
    held_out: tuple[str, ...] = ()

    def fit(self, data: PerturbationData, train: Sequence[str]) -> Predictor:
        """Learn from the training conditions of ``data`` (baselines: means, regressions)."""
        return self

    @abstractmethod
    def predict(self, data: PerturbationData, condition: Condition, n_cells: int, seed: int) -> np.ndarray:
        """``(n_cells, G)`` predicted log-normalised cells of ``condition`` over ``data.genes``.

        The predictor may use the control cells of ``condition.context`` and anything it
        learnt in :meth:`fit`, never the real cells of ``condition`` itself.
        """

    def predict_population(
        self, data: PerturbationData, condition: Condition, n_cells: int, seed: int, population: int
    ) -> np.ndarray:
        """Population ``population`` of several drawn for ``condition`` (``predict --populations``): by default
        :meth:`predict` with ``seed``; a predictor that knows its own uncertainty may let populations after the
        first (the point prediction) vary by it."""
        return self.predict(data, condition, n_cells, seed=seed)

    def shift_standard_error(self, data: PerturbationData, condition: Condition) -> np.ndarray | None:
        """``(G,)`` standard error of :meth:`shift` from the sampling noise of the cells it was fitted on, or ``None``
        where the predictor does not know it (the default): ``sample.anchor_shrinkage`` and
        ``sample.ensemble_shrinkage`` then leave the shift as it is. The built-in shift baselines know theirs."""
        return None

    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        """``(G,)`` predicted change of ``condition``'s mean expression from its context's control mean.

        What ``model.anchor`` adds to each control set's mean. By default the mean of
        :data:`SHIFT_CELLS` predicted cells minus the control mean; predictors that model the
        shift itself override this with it.
        """
        control = data.read(data.control_cells(condition.context)).mean(0, dtype=np.float64)
        return self.predict(data, condition, SHIFT_CELLS, seed=0).mean(0, dtype=np.float64) - control


def as_predictor(spec: Any, /, **params: Any) -> Predictor:
    """A :class:`Predictor` from a ``perturbdiff.predictors`` plug-in name or an instance."""
    from ..registry import resolve

    return resolve("perturbdiff.predictors", spec, **params)


def _obs_for(data: PerturbationData, perturbation: str, context: Context, dose: float | None, n: int) -> pd.DataFrame:
    """obs rows carrying the input's keys (perturbation, cell type, batch, covariates, dose)."""
    cfg = data.config
    columns: dict[str, Any] = {cfg.perturbation_key: [perturbation] * n}
    if cfg.cell_type_key is not None:
        columns[cfg.cell_type_key] = [context.cell_type] * n
    if cfg.batch_key is not None:
        columns[cfg.batch_key] = [context.batch] * n
    for key, value in zip(cfg.covariate_keys, context.covariates):
        columns[key] = [value] * n
    if cfg.dose_key is not None:
        columns[cfg.dose_key] = [np.nan if dose is None else dose] * n
    return pd.DataFrame(columns)


def condition_keys(config: DataConfig, replicate_key: str | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`~perturbdiff_core.evaluation.evaluate` that make its conditions the data's
    own (perturbation at a dose, in a full context), read from the obs columns :func:`predict_anndata` writes;
    ``replicate_key``, if one of the context keys, is left out of the context (its values become populations)."""
    context = [k for k in (config.batch_key, *config.covariate_keys) if k is not None and k != replicate_key]
    return {
        "perturbation_key": config.perturbation_key,
        "control_label": config.control_label,
        "cell_type_key": None if config.cell_type_key == replicate_key else config.cell_type_key,
        "context_keys": context,
        "dose_key": config.dose_key,
    }


def _assemble(data: PerturbationData, blocks: list[tuple[np.ndarray, pd.DataFrame]]) -> ad.AnnData:
    x = np.concatenate([b for b, _ in blocks]).astype(np.float32, copy=False)
    obs = pd.concat([o for _, o in blocks], ignore_index=True)
    obs.index = [f"cell{i}" for i in range(len(obs))]
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = obs[column].astype("category")
    var = pd.DataFrame(index=data.genes) if data.gene_annotations is None else data.gene_annotations.copy()
    var.index = pd.Index(data.genes, name="gene")
    return ad.AnnData(X=x, obs=obs, var=var)


def control_blocks(data: PerturbationData, conditions: Sequence[Condition]) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """The real control cells of every context in ``conditions`` with their obs rows."""
    contexts = sorted({c.context for c in conditions}, key=lambda c: c.label)
    blocks = []
    for context in contexts:
        rows = data.control_cells(context)
        blocks.append((data.read(rows), _obs_for(data, data.config.control_label, context, None, len(rows))))
    return blocks


def predict_anndata(
    predictor: Predictor,
    data: PerturbationData,
    conditions: Sequence[str | Condition],
    *,
    n_cells: int | None = None,
    seed: int = 0,
    populations: int = 1,
    population_conditions: int | None = None,
    progress: bool = True,
) -> ad.AnnData:
    """Predicted cells of ``conditions`` (as many as the real condition has, or ``n_cells``) and
    the real control cells of their contexts, ready for ``perturbdiff evaluate`` or cell-eval.

    ``populations > 1`` draws that many independent populations per condition, labelled ``0``,
    ``1``, ... in obs :data:`POPULATION_KEY`; population ``0`` is the single-population prediction.
    With ``population_conditions``, only that many conditions (drawn with ``seed``) get more than
    population ``0``.
    """
    if not isinstance(populations, int) or populations < 1:
        raise InputError(f"populations must be a positive integer, got {populations!r}.")
    chosen = [c if isinstance(c, Condition) else data.condition(c) for c in conditions]
    spread = set(range(len(chosen)))
    if population_conditions is not None and population_conditions < len(chosen):
        spread = set(np.random.default_rng(seed).choice(len(chosen), population_conditions, replace=False).tolist())
    blocks = []
    bar = progress_bar(chosen, desc=f"predict ({type(predictor).__name__})", unit="conditions", disable=not progress)
    for i, condition in enumerate(bar):
        n = condition.n_cells if n_cells is None else n_cells
        for k in range(populations if i in spread else 1):
            cells = predictor.predict_population(data, condition, n, population_seed(seed, i, k), k)
            obs = _obs_for(data, condition.perturbation, condition.context, condition.dose, n)
            blocks.append((cells, obs.assign(**{POPULATION_KEY: str(k)}) if populations > 1 else obs))
    controls = control_blocks(data, chosen)
    if populations > 1:  # control cells are real: one population, the first
        controls = [(x, obs.assign(**{POPULATION_KEY: "0"})) for x, obs in controls]
    return _assemble(data, blocks + controls)


def population_seed(seed: int, condition: int, population: int) -> int:
    """Sampling seed of population ``population`` of the ``condition``-th condition (``seed + condition`` for the first)."""
    if population == 0:
        return seed + condition
    return int(np.random.SeedSequence([seed, condition, population]).generate_state(1)[0])


def first_population(adata: ad.AnnData) -> ad.AnnData:
    """``adata`` without its :data:`POPULATION_KEY` column, keeping only population ``0`` (cell-eval's layout)."""
    if POPULATION_KEY not in adata.obs:
        return adata
    keep = (adata.obs[POPULATION_KEY].astype(str) == "0").to_numpy()
    first = adata[keep].copy()
    del first.obs[POPULATION_KEY]
    return first


def real_anndata(data: PerturbationData, conditions: Sequence[str | Condition]) -> ad.AnnData:
    """The real cells of ``conditions`` and their contexts' control cells, in the model's genes."""
    chosen = [data.condition(c) for c in conditions]
    blocks = [
        (data.read(data.cells(c)), _obs_for(data, c.perturbation, c.context, c.dose, c.n_cells)) for c in chosen
    ]
    return _assemble(data, blocks + control_blocks(data, chosen))
