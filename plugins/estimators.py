"""Built-in MMD^2 estimators, four statistics: ``biased`` (V), ``unbiased`` (U), ``linear`` and ``embedding``.

How a quadratic statistic's kernel sums are evaluated (dense, blocked, KeOps) is its ``backend``,
a ``perturbdiff.backends`` plug-in, not an estimator of its own; the old estimator names
``chunked`` and ``keops`` remain as deprecated aliases. The random-feature (``rff``, ``nystrom``)
statistic is the ``embedding`` estimator; ``biased`` and ``unbiased`` given ``embedding=``, an
older spelling of it, remain as deprecated aliases too.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import yaml
from torch import Tensor

from perturbdiff_core.errors import InputError, PerturbDiffDeprecationWarning, UnknownPluginError
from perturbdiff_core.mmd.embeddings import EmbeddingMap
from perturbdiff_core.mmd.estimators import MMDEstimator, QuadraticMMD, require_pairs
from perturbdiff_core.mmd.kernels import Kernel
from perturbdiff_core.mmd.reductions import KernelReduction, as_reduction
from perturbdiff_core.registry import is_registered, names, resolve


class _QuadraticStatistic(QuadraticMMD):
    """A V- or U-statistic evaluated exactly by a reduction or, given the deprecated ``embedding``,
    by the :class:`EmbeddingMMD` it stands for (the same statistic under the approximate kernel)."""

    #: U-statistic (True) or V-statistic (False): the one thing the two public classes set.
    unbiased_statistic: bool

    def __init__(
        self,
        backend: str | KernelReduction = "auto",
        embedding: str | None = None,
        *,
        backend_params: Mapping[str, Any] | None = None,
        **embedding_params: object,
    ) -> None:
        name, unbiased = type(self).__name__, self.unbiased_statistic
        if embedding is None and embedding_params:
            raise InputError(
                f"{name} got feature-map parameters {sorted(embedding_params)}; those belong to the "
                f"embedding estimator: use estimator='embedding' with embedding='rff' (or 'nystrom'), or drop them."
            )
        if embedding is not None and (not isinstance(backend, str) or backend != "auto" or backend_params):
            raise InputError(
                f"{name} got embedding={embedding!r} and a backend: a feature map sums no kernel matrices, "
                f"so no backend applies to it; use estimator='embedding' for the feature map, or drop the embedding."
            )
        super().__init__(as_reduction(backend, **dict(backend_params or {})), unbiased=unbiased)
        self.features = None if embedding is None else _embedding_alias(embedding, unbiased, embedding_params)

    def adapt_kernel(self, kernel: Kernel, x: Tensor, y: Tensor) -> Kernel:
        if self.features is not None:
            return self.features.adapt_kernel(kernel, x, y)
        return super().adapt_kernel(kernel, x, y)

    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        if self.features is not None:
            return self.features.estimate(x, y, kernel, wx, wy)
        return super().estimate(x, y, kernel, wx, wy)

    def __repr__(self) -> str:
        return repr(self.features) if self.features is not None else super().__repr__()


class BiasedMMD(_QuadraticStatistic):
    r"""Biased V-statistic :math:`w_x^\top K_{xx} w_x + w_y^\top K_{yy} w_y - 2 w_x^\top K_{xy} w_y`.

    Non-negative for positive-definite kernels (a squared RKHS distance between the weighted
    empirical measures); integer weights equal repeated cells. Exact: ``backend`` only chooses
    how its kernel sums run; the statistic under a random-feature approximation of the kernel is
    the ``embedding`` estimator (:class:`EmbeddingMMD`).

    Args:
        backend: how the kernel sums are evaluated, a ``perturbdiff.backends`` plug-in. ``"dense"``:
            whole kernel matrices, the fastest for small sets, memory ``O(N M)``. ``"chunked"``:
            blocks of ``block_size`` (1024) squared, memory bounded at any size, the backward
            recomputes each block (its time against dense: ``docs/performance.md``). ``"keops"``:
            streamed by KeOps, linear memory, fast on GPUs only.
            ``"auto"`` (default) picks per call among the registered backends by what each
            declares (:meth:`~perturbdiff_core.mmd.reductions.KernelReduction.applies`): dense up to
            :data:`~perturbdiff_plugins.reductions.DENSE_MAX_ENTRIES` kernel entries, above
            it keops for CUDA tensors when pykeops runs, else chunked; never keops on CPU.
            Or a :class:`~perturbdiff_core.mmd.reductions.KernelReduction`. All give the same
            statistic, up to rounding.
        backend_params: parameters of the named backend, e.g. ``{"block_size": 256}`` for chunked.
        embedding: deprecated (warns): the same statistic through a feature map is the
            ``embedding`` estimator, :class:`EmbeddingMMD`; this builds that estimator, with
            ``**embedding_params``, and returns its values.
    """

    unbiased_statistic = False


class UnbiasedMMD(_QuadraticStatistic):
    r"""Unbiased U-statistic (Gretton et al. 2012, Lemma 6): within-set sums skip :math:`i = j`.

    Can be negative; its expectation is the population MMD^2. Same ``backend`` and
    ``backend_params`` choices as :class:`BiasedMMD`; ``embedding`` is deprecated as there, for
    ``EmbeddingMMD(embedding, unbiased=True)``.
    """

    unbiased_statistic = True


def _in_config(params: Mapping[str, Any]) -> str:
    """``params`` as a YAML flow mapping, the way a run config spells them: ``{embedding: rff, unbiased: true}``."""
    return yaml.safe_dump(dict(params), default_flow_style=True, sort_keys=False, width=1_000_000).strip()


def _backend_alias(alias: str, backend: str, backend_params: dict[str, Any], unbiased: bool) -> QuadraticMMD:
    """The statistic that the deprecated estimator name ``alias`` stands for, with a warning naming it."""
    statistic = "unbiased" if unbiased else "biased"
    params: dict[str, Any] = {"backend": backend} | ({"backend_params": backend_params} if backend_params else {})
    in_code = ", ".join(f"{k}={v!r}" for k, v in params.items())
    warnings.warn(
        f"The estimator {alias!r} is deprecated: use the estimator {statistic!r} with {in_code} (in a config: "
        f"estimator: {statistic}, estimator_params: {_in_config(params)}); the alias is removed in a later release.",
        PerturbDiffDeprecationWarning,
        stacklevel=3,
    )
    statistic_class = UnbiasedMMD if unbiased else BiasedMMD
    return statistic_class(backend, backend_params=backend_params)


def _embedding_alias(embedding: str, unbiased: bool, embedding_params: dict[str, object]) -> EmbeddingMMD:
    """The ``embedding`` estimator that the deprecated ``biased``/``unbiased`` with ``embedding=`` stands for,
    with a warning naming it."""
    statistic = "unbiased" if unbiased else "biased"
    params: dict[str, Any] = {"embedding": embedding} | ({"unbiased": True} if unbiased else {}) | embedding_params
    in_code = ", ".join(f"{k}={v!r}" for k, v in params.items())
    warnings.warn(
        f"The estimator {statistic!r} given embedding={embedding!r} is deprecated: use the estimator 'embedding' "
        f"with {in_code} (in a config: estimator: embedding, estimator_params: {_in_config(params)}), the same "
        f"statistic; {statistic!r} takes no embedding in a later release.",
        PerturbDiffDeprecationWarning,
        stacklevel=4,
    )
    return EmbeddingMMD(embedding, unbiased=unbiased, **embedding_params)


def deprecated_chunked(block_size: int = 1024, unbiased: bool = True) -> QuadraticMMD:
    """Deprecated estimator name ``chunked``: ``unbiased`` (or ``biased``) with ``backend="chunked"``.

    Args:
        block_size: rows and columns of the largest kernel block held at once.
        unbiased: U-statistic (default) or V-statistic.
    """
    return _backend_alias("chunked", "chunked", {"block_size": block_size}, unbiased)


def deprecated_keops(unbiased: bool = True) -> QuadraticMMD:
    """Deprecated estimator name ``keops``: ``unbiased`` (or ``biased``) with ``backend="keops"``.

    Args:
        unbiased: U-statistic (default) or V-statistic.
    """
    return _backend_alias("keops", "keops", {}, unbiased)


def _pair_mean(k: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``sum_i u_i v_i k_i / sum_i u_i v_i``: the mean of ``k`` over pairs drawn with weights ``u v``."""
    p = u * v
    total = p.sum(-1)
    if bool((total <= 0).any()):
        raise InputError(
            "The linear estimator pairs cells (1, 2), (3, 4), ...; every pair has a zero-weight "
            "cell in some set, so no pair is left. Use estimator='unbiased' for such weights."
        )
    return (p * k).sum(-1) / total


class LinearMMD(MMDEstimator):
    r"""Linear-time MMD^2 of Gretton et al. (2012, JMLR, Lemma 14), over disjoint pairs of cells.

    .. math::
        \widehat{\mathrm{MMD}}_l^2 = \frac{1}{n/2} \sum_{i=1}^{n/2} h_i, \quad
        h_i = k(x_{2i-1}, x_{2i}) + k(y_{2i-1}, y_{2i}) - k(x_{2i-1}, y_{2i}) - k(x_{2i}, y_{2i-1})

    Unbiased, ``O(n)`` time and memory, higher variance than the quadratic estimators. Sets of
    unequal size use their first ``n = 2 floor(min(N, M) / 2)`` cells. With weights, each of
    the four terms becomes the weighted mean over its pairs, a pair weighing the product of its
    two cells' weights (the chance of drawing that pair from the weighted sets): a
    self-normalised estimator, consistent, and exactly the plain one for uniform weights. Not
    invariant to the order of cells (the pairing follows it).
    """

    unbiased = True
    permutation_invariant = False

    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        n = 2 * (min(x.shape[-2], y.shape[-2]) // 2)
        if n < 2:
            raise InputError(
                f"The linear estimator needs at least 2 cells per set, got {x.shape[-2]} and "
                f"{y.shape[-2]}; use estimator='biased' for single cells."
            )
        x1, x2, y1, y2 = x[..., 0:n:2, :], x[..., 1:n:2, :], y[..., 0:n:2, :], y[..., 1:n:2, :]
        wx1, wx2, wy1, wy2 = wx[..., 0:n:2], wx[..., 1:n:2], wy[..., 0:n:2], wy[..., 1:n:2]
        return (
            _pair_mean(kernel.forward(x1, x2, diag=True), wx1, wx2)
            + _pair_mean(kernel.forward(y1, y2, diag=True), wy1, wy2)
            - _pair_mean(kernel.forward(x1, y2, diag=True), wx1, wy2)
            - _pair_mean(kernel.forward(x2, y1, diag=True), wx2, wy1)
        )


class EmbeddingMMD(MMDEstimator):
    r""":math:`\|\sum_i w^x_i \phi(x_i) - \sum_j w^y_j \phi(y_j)\|^2` with a feature map :math:`\phi`.

    The random-feature statistic: the V- (default) or U-statistic of :class:`BiasedMMD` and
    :class:`UnbiasedMMD` under the approximate kernel :math:`\phi(x)^\top \phi(y)`, and the one
    estimator that gives it (``biased``/``unbiased`` with ``embedding=`` are deprecated aliases).
    The map is a ``perturbdiff.embeddings`` plug-in (``rff``, ``nystrom``, ``exact``) built
    from the kernel of the first call, fitted on that call's pooled cells (Nystrom landmarks; a
    ``"median"`` lengthscale is fixed there once, for all later calls, instead of per pair of
    sets) and cached per kernel object, so random features stay fixed across calls. Costs
    ``O((N + M) D)`` for ``D`` features instead of ``O(N M)``. By default the biased
    (non-negative) V-statistic under the approximate kernel; with ``exact`` and a fixed
    lengthscale it equals :class:`BiasedMMD`.

    Args:
        embedding: name of the ``perturbdiff.embeddings`` plug-in.
        unbiased: the U-statistic instead: the within-set terms drop the ``i = j`` pairs,
            :math:`\|\mu_x\|^2 - \sum_i w_i^2 \|\phi(x_i)\|^2`, and are divided by
            :math:`1 - \sum_i w_i^2`, as :class:`UnbiasedMMD` does; still ``O((N + M) D)``.
        **embedding_params: its parameters (checked against its signature on the first call).
    """

    def __init__(self, embedding: str = "rff", unbiased: bool = False, **embedding_params: object) -> None:
        if not is_registered("perturbdiff.embeddings", embedding):
            raise UnknownPluginError(
                f"Unknown embedding {embedding!r}; known: {', '.join(names('perturbdiff.embeddings'))}."
            )
        self.embedding = embedding
        self.unbiased = bool(unbiased)
        self.embedding_params = embedding_params
        self._maps: weakref.WeakKeyDictionary[Kernel, EmbeddingMap] = weakref.WeakKeyDictionary()

    def adapt_kernel(self, kernel: Kernel, x: Tensor, y: Tensor) -> Kernel:
        """The kernel as given: the feature map fixes data-dependent hyperparameters once, at fit."""
        return kernel

    def feature_map(self, kernel: Kernel, x: Tensor, y: Tensor) -> EmbeddingMap:
        """The cached map of ``kernel``, built (and fitted on ``x`` and ``y``) on first use."""
        emb = self._maps.get(kernel)
        if emb is None:
            emb = resolve("perturbdiff.embeddings", self.embedding, kernel=kernel, **self.embedding_params)
            emb.fit(_pooled(x, y).detach())
            self._maps[kernel] = emb
        return emb

    def estimate(self, x: Tensor, y: Tensor, kernel: Kernel, wx: Tensor, wy: Tensor) -> Tensor:
        emb = self.feature_map(kernel, x, y)
        if not self.unbiased:
            if not emb.explicit:  # implicit map: inner products through the kernel
                return emb.inner(x, x, wx, wx) + emb.inner(y, y, wy, wy) - 2 * emb.inner(x, y, wx, wy)
            diff = emb.mean_embedding(x, wx) - emb.mean_embedding(y, wy)
            return diff.square().sum(-1)
        require_pairs(x, y, fix="use unbiased=False for single cells")
        xx, mx = self._within(emb, x, wx)
        yy, my = self._within(emb, y, wy)
        cross = (mx * my).sum(-1) if emb.explicit else emb.inner(x, y, wx, wy)
        return xx + yy - 2 * cross

    @staticmethod
    def _within(emb: EmbeddingMap, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """The U-statistic within-set term and (for explicit maps) the mean embedding."""
        w2 = w.square()
        if emb.explicit:
            phi = emb.features(x)
            mean = (w.unsqueeze(-1) * phi).sum(-2)
            off_diagonal = mean.square().sum(-1) - (w2 * phi.square().sum(-1)).sum(-1)
        else:
            mean = None
            off_diagonal = emb.inner(x, x, w, w) - (w2 * emb.kernel.forward(x, x, diag=True)).sum(-1)  # the fitted kernel
        return off_diagonal / (1 - w2.sum(-1)), mean

    def __repr__(self) -> str:
        params = "".join(f", {k}={v!r}" for k, v in self.embedding_params.items())
        return f"EmbeddingMMD(embedding={self.embedding!r}, unbiased={self.unbiased}{params})"


def _pooled(x: Tensor, y: Tensor) -> Tensor:
    """Cells of ``x`` and ``y`` stacked per batch element, ``(..., N + M, G)``."""
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    return torch.cat([x.expand(*batch, *x.shape[-2:]), y.expand(*batch, *y.shape[-2:])], dim=-2)
