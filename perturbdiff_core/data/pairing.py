"""How the control set of a training point is chosen from the control cells of its context.

``random`` (the default, as in the PerturbDiff paper): ``S`` control cells of the same cell type
and batch, drawn uniformly (with replacement when there are fewer than ``S``).

``ot``: an optimal-transport coupling. Control cells are embedded by a PCA fitted on control
cells; each training point draws a pool of ``pool_factor * S`` (default 2S) controls of its context and
solves the assignment problem (exact OT between uniform measures of equal mass) from its
``S`` target cells to that pool, minimising the total squared distance in PCA space; control
``i`` is paired with target cell ``i``. The control set then mirrors the composition of the
target set (cell-cycle phase, sub-type, depth), which removes noise the model would otherwise
have to explain. The coupling looks at the target, so it exists only for training: at
prediction (and evaluation) time the perturbed cells are unknown and controls are always
drawn at random (:func:`draw`). The model then sees random controls at test time, so compare
both pairings on validation conditions before switching the default.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

from ..errors import ConfigError
from .dataset import Context, PerturbationData

#: Control cells read per block while embedding them (bounded memory).
EMBED_ROWS = 4096


def draw(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` of ``rows`` uniformly, with replacement only when there are fewer than ``size``."""
    return rng.choice(rows, size, replace=len(rows) < size)


class ControlPairing(ABC):
    """Chooses the control cells paired with a training set."""

    #: True when :meth:`pair` needs the target cells (read before the controls).
    uses_target: bool = False

    def fit(self, data: PerturbationData) -> ControlPairing:
        """Data-dependent set-up, once before sets are drawn."""
        return self

    @abstractmethod
    def pair(
        self, data: PerturbationData, context: Context, target: np.ndarray | None, size: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Row positions of ``size`` control cells of ``context`` (``target``: ``(S, G)`` cells or ``None``)."""


class RandomPairing(ControlPairing):
    """Controls drawn uniformly from the context, independent of the target (the paper's choice)."""

    def pair(
        self, data: PerturbationData, context: Context, target: np.ndarray | None, size: int, rng: np.random.Generator
    ) -> np.ndarray:
        return draw(data.control_cells(context), size, rng)


class OTPairing(ControlPairing):
    """Exact OT (assignment) from the target cells to a pool of controls, in a PCA of control cells.

    Args:
        n_components: PCA dimensions (capped by genes and cells).
        pool_factor: the pool holds ``pool_factor * S`` controls (all of them when fewer).
        max_fit_cells: control cells used to fit the PCA (a seeded subsample beyond).
        seed: seed of that subsample and of the PCA solver.
    """

    uses_target = True

    def __init__(
        self, n_components: int = 50, pool_factor: int = 2, max_fit_cells: int = 10_000, seed: int = 0
    ) -> None:
        self.n_components = n_components
        self.pool_factor = pool_factor
        self.max_fit_cells = max_fit_cells
        self.seed = seed

    def fit(self, data: PerturbationData) -> OTPairing:
        """PCA on (a subsample of) all control cells, then every control cell embedded."""
        from sklearn.decomposition import PCA

        if self.pool_factor < 1 or self.n_components < 1:
            raise ConfigError("OT pairing needs pool_factor >= 1 and n_components >= 1.")
        controls = np.concatenate([data.control_cells(c) for c in data.contexts])
        rng = np.random.default_rng(self.seed)
        fit_rows = (
            controls if len(controls) <= self.max_fit_cells else rng.choice(controls, self.max_fit_cells, replace=False)
        )
        fit_rows = np.sort(fit_rows)
        k = max(1, min(self.n_components, data.n_genes, len(fit_rows) - 1))
        self.pca = PCA(n_components=k, random_state=self.seed).fit(data.read(fit_rows))
        self.embedding = {context: self._embed(data, data.control_cells(context)) for context in data.contexts}
        return self

    def _embed(self, data: PerturbationData, rows: np.ndarray) -> np.ndarray:
        parts = [self.pca.transform(data.read(rows[i : i + EMBED_ROWS])) for i in range(0, len(rows), EMBED_ROWS)]
        return np.concatenate(parts).astype(np.float32)

    def pair(
        self, data: PerturbationData, context: Context, target: np.ndarray | None, size: int, rng: np.random.Generator
    ) -> np.ndarray:
        controls = data.control_cells(context)
        embedded = self.embedding[context]
        m = min(len(controls), self.pool_factor * size)
        pool = rng.choice(len(controls), m, replace=False) if len(controls) > m else np.arange(len(controls))
        with threadpool_limits(1, user_api="blas"):  # small products: threads only contend
            t = self.pca.transform(target)
            c = embedded[pool]
            cost = (t * t).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * t @ c.T
        copies = -(-size // m)  # each control usable this many times when the pool is smaller than the set
        _, cols = linear_sum_assignment(np.tile(cost, (1, copies)))
        return controls[pool[cols % m]]


#: Pairing names users type in ``data.control_pairing``.
PAIRINGS: dict[str, type[ControlPairing]] = {"random": RandomPairing, "ot": OTPairing}


def make_pairing(spec: str | ControlPairing) -> ControlPairing:
    """A pairing from its name (default parameters) or an instance."""
    if isinstance(spec, ControlPairing):
        return spec
    if spec not in PAIRINGS:
        raise ConfigError(f"data.control_pairing = {spec!r}; choose one of {', '.join(PAIRINGS)}.")
    return PAIRINGS[spec]()
