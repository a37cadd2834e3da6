"""Baselines with the model's :class:`~perturbdiff_core.evaluation.predictors.Predictor` interface.

Each one is fitted on the training conditions only and predicts a held-out condition from the
control cells of its context; none reads the real cells of the condition it predicts (a
training condition is left out of its own prediction too, so validation conditions are fair).
Shifts are differences of log1p means, ``shift(c) = mean(cells of c) - mean(controls of c's
context)``; a predicted shift is added to every sampled control cell and clipped at 0. Such a
prediction is the control cells moved by a constant, so a DE test against those controls finds
any non-zero shift significant, however small: on kang18 about 2,400 DE genes against 170 real
ones. The means can be right while the population is not; a generative model should do better.

- ``control``: the control cells themselves (no change).
- ``context_mean``: the perturbation's mean shift in the other contexts.
- ``context_mixture``: the perturbation's shifts in the other contexts, weighted by the mixture of
  their control means nearest the condition's own (a held-out T cell takes mostly T cells' shifts).
- ``context_fold``: the perturbation's log fold change in the other contexts, pooled by random effects
  (a fold measured where the gene is expressed counts more), applied to the condition's own control level
  (a gene a context barely expresses barely moves).
- ``linear``: ridge regression from the perturbation encoding and the context to the shift.
- ``random_train``: random training cells of the same perturbation.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import Ridge

from perturbdiff_core.data.dataset import Condition, Context, PerturbationData, nearest_contexts
from perturbdiff_core.data.encoders import perturbation_parts
from perturbdiff_core.diffusion.hull import hull_weights
from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.evaluation.predictors import Predictor


def sample_rows(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``rows`` at random: without replacement when there are enough, else with."""
    if len(rows) == 0:
        raise InputError("No cells to sample from; every context needs control cells.")
    return rng.choice(rows, size=n, replace=n > len(rows))


def _training_conditions(data: PerturbationData, train: Sequence[str | Condition]) -> list[Condition]:
    """The perturbed conditions of ``train``; InputError for none or a control condition."""
    chosen = [data.condition(c) for c in train]
    controls = [c.label for c in chosen if c.is_control]
    if controls:
        raise InputError(
            f"Training conditions must be perturbed; {', '.join(controls[:5])} hold control cells. "
            f"Pass split.train (perturbed conditions only)."
        )
    if not chosen:
        raise InputError("No training conditions to fit the baseline on; check the split.")
    return chosen


def _same_context_first(conditions: list[Condition], context: Context) -> list[Condition]:
    """The conditions of ``context`` if there are any, else all of them."""
    return [c for c in conditions if c.context == context] or conditions


def _same_perturbation(conditions: list[Condition], condition: Condition) -> list[Condition]:
    """The conditions with ``condition``'s perturbation and dose."""
    return [c for c in conditions if (c.perturbation, c.dose) == (condition.perturbation, condition.dose)]


def _nearest(conditions: list[Condition], condition: Condition, held_out: Sequence[str]) -> list[Condition]:
    """The conditions in the contexts nearest ``condition``'s (:func:`~perturbdiff_core.data.dataset.nearest_contexts`:
    none sharing its ``held_out`` fields; of the rest its cell type's when there are any, else all)."""
    nearest = set(nearest_contexts(condition.context, [c.context for c in conditions], held_out))
    return [c for c in conditions if c.context in nearest]


class _Fitted(Predictor):
    """A baseline that remembers its training conditions and refuses to predict before :meth:`fit`."""

    _train: list[Condition] | None = None

    def fit(self, data: PerturbationData, train: Sequence[str | Condition]) -> _Fitted:
        """Remember the training conditions (and let subclasses learn from them)."""
        self._train = _training_conditions(data, train)
        self._fit(data, self._train)
        return self

    def _fit(self, data: PerturbationData, train: list[Condition]) -> None:
        """Learn what the subclass needs from the training conditions."""

    @property
    def train(self) -> list[Condition]:
        """The training conditions; InputError before :meth:`fit`."""
        if self._train is None:
            raise InputError(f"{type(self).__name__} is not fitted; call fit(data, split.train) before predict.")
        return self._train

    def _pool(self, condition: Condition) -> list[Condition]:
        """The training conditions other than ``condition`` itself; InputError when none is left."""
        pool = [c for c in self.train if c.label != condition.label]
        if not pool:
            raise InputError(
                f"{type(self).__name__} has no training condition other than {condition.label!r} to learn from; "
                f"train on more conditions."
            )
        return pool

    def _same_elsewhere(self, condition: Condition, pool: list[Condition]) -> list[Condition]:
        """The conditions of ``pool`` with ``condition``'s perturbation and dose in the contexts nearest its own
        (:func:`_nearest`); empty when the perturbation was trained nowhere else."""
        return _nearest(_same_perturbation(pool, condition), condition, self.held_out)


class ControlBaseline(Predictor):
    """No change: ``n`` control cells of the condition's context (drawn with replacement when fewer)."""

    def predict(self, data: PerturbationData, condition: Condition, n_cells: int, seed: int) -> np.ndarray:
        """Control cells of ``condition.context``, unchanged."""
        rng = np.random.default_rng(seed)
        return data.read(sample_rows(data.control_cells(condition.context), n_cells, rng))

    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        """No change: zeros."""
        return np.zeros(data.n_genes)


def _control_mean(data: PerturbationData, context: Context) -> np.ndarray:
    """``(G,)`` float64 mean of the control cells of ``context``."""
    return data.read(data.control_cells(context)).mean(0, dtype=np.float64)


def squared_standard_errors(cells: np.ndarray) -> np.ndarray:
    """``(G,)`` squared standard error of each gene's mean over ``cells`` ``(n, G)``; at least that of one cell at
    the smallest positive value among them, since a gene no cell detects is not known to be exactly 0."""
    n = len(cells)
    smallest = float(np.min(cells, initial=np.inf, where=cells > 0))  # no copy of the positive values
    one = smallest if np.isfinite(smallest) else 1.0
    variance = cells.var(0, dtype=np.float64, ddof=1) if n > 1 else np.zeros(cells.shape[1])
    return np.maximum(variance, one**2 / n) / n


def random_effects(effects: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the DerSimonian-Laird random-effects mean of ``effects`` ``(K, G)`` whose sampling variances are
    ``variances`` ``(K, G)`` (positive), and that mean's variance: weights ``1 / (variance + tau^2)``, with the
    between-study variance ``tau^2 = max(0, (Q - (K - 1)) / (sum w - sum w^2 / sum w))`` from the fixed-effect weights
    ``w = 1 / variance`` and Cochran's ``Q``, and the mean's variance ``1 / sum weights``; one effect is returned as
    it is, with its own variance."""
    if effects.shape[0] == 1:
        return effects[0], variances[0]
    w = 1.0 / variances
    total = w.sum(0)
    fixed = (w * effects).sum(0) / total
    q = (w * (effects - fixed) ** 2).sum(0)
    tau2 = np.maximum(0.0, (q - (effects.shape[0] - 1)) / (total - (w**2).sum(0) / total))
    weights = 1.0 / (variances + tau2)
    return (weights * effects).sum(0) / weights.sum(0), 1.0 / weights.sum(0)


class _ShiftBaseline(_Fitted):
    """Sampled control cells of the context plus a predicted mean shift, clipped at 0 (log1p data).

    Fitting stores the training shifts ``mean(cells of c) - mean(controls of c's context)``, and the squared
    standard error of each of those means (:func:`squared_standard_errors`), read in the same pass.
    """

    shifts: dict[str, np.ndarray]
    control_means: dict[Context, np.ndarray]
    errors: dict[str, np.ndarray]
    control_errors: dict[Context, np.ndarray]

    def _fit(self, data: PerturbationData, train: list[Condition]) -> None:
        self.control_means, self.control_errors = {}, {}
        for context in {c.context for c in train}:
            cells = data.read(data.control_cells(context))
            self.control_means[context] = cells.mean(0, dtype=np.float64)
            self.control_errors[context] = squared_standard_errors(cells)
        self.shifts, self.errors = {}, {}
        for c in train:
            cells = data.read(data.cells(c))
            self.shifts[c.label] = cells.mean(0, dtype=np.float64) - self.control_means[c.context]
            self.errors[c.label] = squared_standard_errors(cells)
        self._n_genes = data.n_genes

    def _mean_shift(self, conditions: list[Condition]) -> np.ndarray:
        return np.mean([self.shifts[c.label] for c in conditions], axis=0)

    def _combined_variance(self, weighted: list[tuple[Condition, float]]) -> np.ndarray:
        """``(G,)`` sampling variance of ``sum a_c shift(c)`` over the training conditions and weights ``weighted``:
        each condition's cells count with ``a_c^2``, each context's control cells, shared by its conditions, with the
        square of their weights' sum (the squared standard errors of :func:`squared_standard_errors`)."""
        variance = np.zeros(self._n_genes)
        control_weights: dict[Context, float] = {}
        for condition, weight in weighted:
            variance += weight**2 * self.errors[condition.label]
            control_weights[condition.context] = control_weights.get(condition.context, 0.0) + weight
        for context, weight in control_weights.items():
            variance += weight**2 * self.control_errors[context]
        return variance

    @abstractmethod
    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        """``(G,)`` predicted mean shift of ``condition`` against its context's control cells."""

    def predict(self, data: PerturbationData, condition: Condition, n_cells: int, seed: int) -> np.ndarray:
        """``max(control cell + shift, 0)`` for ``n_cells`` sampled control cells of the context."""
        self._pool(condition)  # InputError before fit, or with nothing else to learn from
        if data.n_genes != self._n_genes:
            raise InputError(
                f"{type(self).__name__} was fitted on {self._n_genes} genes but the data has {data.n_genes}; "
                f"predict on the data it was fitted on."
            )
        shift = self.shift(data, condition).astype(np.float32)
        rng = np.random.default_rng(seed)
        controls = data.read(sample_rows(data.control_cells(condition.context), n_cells, rng))
        return np.maximum(controls + shift, 0.0)


class ContextMeanBaseline(_ShiftBaseline):
    """The perturbation's mean shift in the other contexts, added to the context's control cells.

    The shift of a condition is the first rule that applies:

    1. the mean shift of the training conditions with the same perturbation (and dose) in
       other contexts (a held-out cell type, batch or covariate value): those of the same cell
       type when there are any (a held-out donor or patient takes the other donors' response of
       its own cell type, not every cell type's), else all of them, leaving out those that share
       the condition's value of a field in :attr:`held_out` (a training condition predicted as the
       test's are, :func:`~perturbdiff_core.data.dataset.nearest_contexts`);
    2. a combination ``A+B`` never trained on whose every part is trained on alone: the sum of
       the parts' shifts, each the mean over the part's training conditions (any dose) in the
       same context, else in all contexts;
    3. a perturbation never trained on: the mean shift of all training conditions of the same
       context, else of all training conditions.
    """

    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        return np.sum([self._mean_shift(group) for group in self._summed_groups(data, condition)], axis=0)

    def shift_standard_error(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        """``(G,)``: the training cells' sampling noise in :meth:`shift` (a combination's parts share their context's
        control cells)."""
        groups = self._summed_groups(data, condition)
        return np.sqrt(self._combined_variance([(c, 1.0 / len(group)) for group in groups for c in group]))

    def _summed_groups(self, data: PerturbationData, condition: Condition) -> list[list[Condition]]:
        """The groups of training conditions whose mean shifts add up to ``condition``'s (the class's rules)."""
        pool = self._pool(condition)
        same = self._same_elsewhere(condition, pool)
        if same:
            return [same]
        cfg = data.config
        parts = perturbation_parts(condition.perturbation, cfg.combination_separator, cfg.control_label)
        by_part = [[c for c in pool if c.perturbation == p] for p in parts]
        if len(parts) > 1 and all(by_part):
            return [_same_context_first(c, condition.context) for c in by_part]
        return [_same_context_first(pool, condition.context)]

    def _fit(self, data: PerturbationData, train: list[Condition]) -> None:
        super()._fit(data, train)
        self._target_means: dict[Context, np.ndarray] = {}

    def _control_mean_of(self, data: PerturbationData, context: Context) -> np.ndarray:
        """The control mean of ``context``: stored for a training context, else read once."""
        if context in self.control_means:
            return self.control_means[context]
        if context not in self._target_means:
            self._target_means[context] = _control_mean(data, context)
        return self._target_means[context]


class ContextFoldBaseline(ContextMeanBaseline):
    r"""The perturbation's log fold change in the other contexts, pooled, applied to the condition's own control level.

    A context's fold of a gene is that of geometric means, pdex's (and cell-eval's) fold change on log1p data:
    :math:`f_k = (\mathrm{expm1}(s_k) + p) / (\mathrm{expm1}(m_k) + p)` with :math:`s_k, m_k` the log1p means of the
    perturbed and control cells of context :math:`k` and :math:`p` the ``pseudocount``. The log folds of the contexts
    ``context_mean`` would average (rule 1) are pooled (``pooling``) and applied to the condition's control mean
    :math:`m`: :math:`\mathrm{shift} = \log1p(\max(\bar f\,(\mathrm{expm1}(m) + p) - p, 0)) - m`. Cell types
    share a response's folds more than its sizes: where interferon doubles a gene that T cells express and
    monocytes barely do, the T cells' absolute rise moved to monocytes switches the gene on in cells that never
    had it, and their fold barely moves it (kang18, each cell type held out in turn: half the mean squared error
    of ``context_mean``'s shift, measured in docs/defaults.md).
    Everything else (combinations, unseen perturbations) is predicted as by ``context_mean``.

    Args:
        pseudocount: added to both geometric means, in the data's units (a log1p mean of 0.01 is a gene
            detected at one count in about 1% of cells of kang18): below it a gene counts as not expressed,
            so its fold stays near 1 rather than dividing noise by noise.
        pooling: ``random_effects`` (the default): the DerSimonian-Laird random-effects mean of the log folds
            (:func:`random_effects`), each weighed by its sampling variance (from the cells' spread, delta
            method) plus the contexts' disagreement on the gene: a fold measured where the gene is expressed
            counts more than one measured where a few cells detect it, and where the contexts disagree beyond
            their noise the weights even out. ``mean``: the plain mean of the log folds.
    """

    POOLINGS = ("random_effects", "mean")

    def __init__(self, pseudocount: float = 0.01, pooling: str = "random_effects") -> None:
        if not (isinstance(pseudocount, int | float) and pseudocount > 0):
            raise ConfigError(f"context_fold pseudocount must be a positive number, got {pseudocount!r}.")
        if pooling not in self.POOLINGS:
            raise ConfigError(f"context_fold pooling must be one of {', '.join(self.POOLINGS)}; got {pooling!r}.")
        self.pseudocount = pseudocount
        self.pooling = pooling

    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        pooled = self._pooled_log_fold(condition)
        if pooled is None:
            return super().shift(data, condition)
        level = self._control_mean_of(data, condition.context)
        return np.log1p(self._moved(pooled[0], level)) - level

    def shift_standard_error(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        """``(G,)``: the pooled log fold's standard error (random effects: its contexts' sampling noise and
        disagreement) carried to the shift by the delta method; a gene the fold takes to 0 has none."""
        pooled = self._pooled_log_fold(condition)
        if pooled is None:
            return super().shift_standard_error(data, condition)
        log_fold, variance = pooled
        level = self._control_mean_of(data, condition.context)
        moved = self._moved(log_fold, level)
        slope = np.where(moved > 0, (moved + self.pseudocount) / (1.0 + moved), 0.0)  # d shift / d log fold
        return slope * np.sqrt(variance)

    def _pooled_log_fold(self, condition: Condition) -> tuple[np.ndarray, np.ndarray] | None:
        """``(G,)`` pooled log fold of the contexts ``context_mean`` would average and its ``(G,)`` sampling variance;
        ``None`` where the perturbation has no other context (``context_mean``'s other rules apply)."""
        same = self._same_elsewhere(condition, self._pool(condition))
        if not same:
            return None
        log_folds = np.stack([self._log_fold(c) for c in same])
        variances = np.stack([self._log_fold_variance(c) for c in same])
        if self.pooling == "random_effects":
            return random_effects(log_folds, variances)
        return log_folds.mean(0), variances.sum(0) / len(same) ** 2

    def _moved(self, log_fold: np.ndarray, level: np.ndarray) -> np.ndarray:
        """``(G,)`` the control level ``level`` moved by ``log_fold`` in expression units, at least 0."""
        return np.maximum(np.exp(log_fold) * (np.expm1(level) + self.pseudocount) - self.pseudocount, 0.0)

    def _levels(self, condition: Condition) -> tuple[np.ndarray, np.ndarray]:
        """``(G,)`` log1p means of a training condition's cells and of its context's control cells."""
        control = self.control_means[condition.context]
        return control + self.shifts[condition.label], control

    def _log_fold(self, condition: Condition) -> np.ndarray:
        """``(G,)`` log of the fold of geometric means of a training condition against its context's controls."""
        perturbed, control = self._levels(condition)
        return np.log((np.expm1(perturbed) + self.pseudocount) / (np.expm1(control) + self.pseudocount))

    def _log_fold_variance(self, condition: Condition) -> np.ndarray:
        """``(G,)`` sampling variance of :meth:`_log_fold` by the delta method: each log1p mean's squared standard
        error times the squared slope of ``log(expm1(level) + p)`` there."""
        perturbed, control = self._levels(condition)

        def slope(level: np.ndarray) -> np.ndarray:
            return np.exp(level) / (np.expm1(level) + self.pseudocount)

        return (slope(perturbed) ** 2 * self.errors[condition.label]
                + slope(control) ** 2 * self.control_errors[condition.context])


class ContextMixtureBaseline(ContextMeanBaseline):
    """The perturbation's shifts in the other contexts, weighted by how alike their control cells are.

    Where the perturbation was trained in several other contexts, its shift is
    :math:`\\sum_k w_k\\,\\mathrm{shift}_k` with :math:`w` the mixture of those contexts' control means
    nearest the condition's own control mean (non-negative weights summing to 1,
    :func:`~perturbdiff_core.diffusion.hull.hull_weights`): a held-out CD8 T cell takes mostly the CD4 T
    and NK cells' responses, a held-out monocyte the other myeloid cells'. Cell types respond to
    one stimulus by different amounts (kang18: interferon moves monocytes twice as far as T
    cells), which the plain average of ``context_mean`` blurs. Where the perturbation was trained
    in the condition's own cell type (a held-out donor or patient), only those contexts are mixed,
    as ``context_mean`` takes them. Only the condition's own control
    cells and the training conditions are read. Everything else (one other context, combinations,
    unseen perturbations) is predicted as by ``context_mean``.
    """

    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        mixed = self._mixture(data, condition)
        if mixed is None:
            return super().shift(data, condition)
        weights, same = mixed
        return np.einsum("k,kg->g", weights, np.stack([self.shifts[c.label] for c in same]))

    def shift_standard_error(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        """``(G,)``: the mixed shifts' sampling noise, each weighed by its squared weight (the weights taken as fixed)."""
        mixed = self._mixture(data, condition)
        if mixed is None:
            return super().shift_standard_error(data, condition)
        weights, same = mixed
        return np.sqrt(self._combined_variance(list(zip(same, weights, strict=True))))

    def _mixture(self, data: PerturbationData, condition: Condition) -> tuple[np.ndarray, list[Condition]] | None:
        """The hull weights ``(K,)`` of the other contexts' training conditions and those conditions; ``None`` with
        fewer than two (``context_mean``'s rules apply)."""
        same = self._same_elsewhere(condition, self._pool(condition))
        if len(same) < 2:
            return None
        vertices = torch.from_numpy(np.stack([self.control_means[c.context] for c in same]))
        return hull_weights(torch.from_numpy(self._control_mean_of(data, condition.context)), vertices).numpy(), same


class LinearBaseline(_ShiftBaseline):
    """Ridge regression of the shift on ``[perturbation encoding, one-hot context]``, added to controls.

    .. math::  \\hat W = \\arg\\min_W \\|Y - X W - b\\|^2 + \\alpha \\|W\\|^2

    with ``X`` the encodings (``data.encode``; a combination is the sum of its parts, so the
    model is additive) joined to one-hot cell type, batch and covariate vocabulary indices, and
    ``Y`` the training shifts. A context never trained on gets the vocabulary's unknown column,
    so its prediction is the perturbation's effect without a context term. With one
    perturbation and a held-out cell type (kang18) that is exactly the mean training shift,
    the same as ``context_mean``: the centred one-hot coefficients sum to zero.

    Args:
        alpha: the ridge penalty (non-negative).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def _fit(self, data: PerturbationData, train: list[Condition]) -> None:
        if not (isinstance(self.alpha, int | float) and self.alpha >= 0):
            raise InputError(f"LinearBaseline alpha must be a non-negative number, got {self.alpha!r}.")
        super()._fit(data, train)
        self.ridge = self._ridge(data, train)

    def _ridge(self, data: PerturbationData, train: list[Condition]) -> Ridge:
        targets = np.stack([self.shifts[c.label] for c in train])
        return Ridge(alpha=self.alpha).fit(self.features(data, train), targets)

    @staticmethod
    def features(data: PerturbationData, conditions: Sequence[Condition]) -> np.ndarray:
        """``(n, P + V)``: perturbation encodings and one-hot vocabulary indices of each context."""
        encoding = data.encode(conditions).numpy().astype(np.float64)
        fields = ["cell_type", "batch", *data.config.covariate_keys]
        columns = zip(*[(c.cell_type, c.batch, *c.context.covariates) for c in conditions], strict=True)
        blocks = [encoding]
        for field, values in zip(fields, columns, strict=True):
            onehot = np.zeros((len(conditions), len(data.vocabularies[field])))
            onehot[np.arange(len(conditions)), [data.index(field, v) for v in values]] = 1.0
            blocks.append(onehot)
        return np.concatenate(blocks, axis=1)

    def shift(self, data: PerturbationData, condition: Condition) -> np.ndarray:
        """The ridge prediction; for a training condition, from a refit without it (leave one out)."""
        ridge = self._ridge(data, self._pool(condition)) if condition.label in self.shifts else self.ridge
        return ridge.predict(self.features(data, [condition]))[0]


class RandomTrainBaseline(_Fitted):
    """Random training cells of the same perturbation (and dose) from other contexts, of the same cell type
    when there are any.

    A perturbation never trained on (including a combination never trained on as such) gets
    random training perturbed cells of the same context, else of any context.
    """

    def predict(self, data: PerturbationData, condition: Condition, n_cells: int, seed: int) -> np.ndarray:
        """``n_cells`` cells drawn from the chosen training conditions (with replacement when fewer)."""
        pool = self._pool(condition)
        same = self._same_elsewhere(condition, pool)
        chosen = same or _same_context_first(pool, condition.context)
        rows = np.concatenate([data.cells(c) for c in chosen])
        return data.read(sample_rows(rows, n_cells, np.random.default_rng(seed)))
