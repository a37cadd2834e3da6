r"""Kernel two-sample test: MMD^2 with a permutation p-value, and FDR correction over many tests.

.. math::
    p = \frac{1 + \#\{b : \widehat{\mathrm{MMD}}^2(\pi_b) \ge \widehat{\mathrm{MMD}}^2\}}{1 + B}

over ``B`` random relabellings :math:`\pi_b` of the pooled cells (Phipson & Smyth 2010: never
zero, exact level under the null). The kernel is adapted once (median heuristic) on the observed
sets and held fixed across permutations, so every permuted statistic uses the same kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import false_discovery_control
from torch import Tensor

from ..errors import InputError
from ..validation import at_least_float32, check_sets
from .estimators import MMDEstimator, QuadraticMMD, as_estimator
from .kernels import Kernel, as_kernel

#: Largest pooled set (cells) whose kernel matrix is formed once for the permutation fast
#: path: 4096 cells is 128 MiB in float64. Larger pools call the estimator per permutation.
DENSE_MAX_CELLS = 4096

#: Elements (permutations x pooled cells x genes, or permutations x pooled cells) per batch.
_BATCH_ELEMENTS = 1 << 22

#: Tie tolerance in units of machine epsilon times the statistic's scale (max |K|).
_TIE_ULPS = 64


def permutation_test(
    x: Tensor,
    y: Tensor,
    kernel: str | Kernel,
    estimator: str | MMDEstimator,
    permutations: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """``(MMD^2, p-value)`` of two cell sets ``(N, G)`` and ``(M, G)`` by a permutation test.

    The statistic is exactly ``estimator(x, y, kernel)``. With a quadratic estimator
    (``biased``/``unbiased``, any backend) and at most :data:`DENSE_MAX_CELLS` pooled cells,
    the pooled kernel matrix is formed once and each permutation costs one matrix-vector
    product (batched over permutations into matrix products); other estimators are called on
    batches of permuted sets. Permutations are drawn and counted in chunks of bounded size, so
    memory does not grow with ``permutations`` (a million run in the memory of a thousand).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64) + 1
        >>> stat, p = permutation_test(x, y, "energy", "unbiased", permutations=99)
        >>> p
        0.01
    """
    null = _null(x, y, kernel, estimator, permutations)
    at_least = sum(int((chunk >= null.observed - null.tie).sum()) for chunk in _null_chunks(null, permutations, seed))
    return null.statistic, (1 + at_least) / (1 + permutations)


def null_distribution(
    x: Tensor,
    y: Tensor,
    kernel: str | Kernel,
    estimator: str | MMDEstimator,
    permutations: int = 1000,
    seed: int = 0,
) -> Tensor:
    """The ``permutations`` permuted MMD^2 statistics ``(B,)`` that :func:`permutation_test` uses."""
    null = _null(x, y, kernel, estimator, permutations)
    return torch.cat(list(_null_chunks(null, permutations, seed)))


def fdr_bh(pvalues: Any) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``)."""
    p = np.asarray(pvalues, dtype=float)
    return p.copy() if p.size == 0 else false_discovery_control(p, method="bh")


@dataclass(frozen=True)
class _Null:
    """One test's null distribution, ready to be computed chunk by chunk.

    ``statistic`` is the estimator's; ``observed`` the same computed as the permuted ones are
    (compared with them); ``tie`` the tolerance within which a permuted statistic counts as
    ``>=`` (rounding must not turn a tie, e.g. two identical cells swapped, into a smaller
    p-value): :data:`_TIE_ULPS` machine epsilons of the largest ``|k|`` between pooled cells.
    ``of`` maps permutations ``(b, N + M)`` to their statistics ``(b,)``; ``chunk`` bounds ``b``.
    """

    statistic: float
    observed: Tensor
    tie: Tensor
    of: Callable[[Tensor], Tensor]
    chunk: int
    cells: int
    device: torch.device


def _null(x: Tensor, y: Tensor, kernel: str | Kernel, estimator: str | MMDEstimator, permutations: int) -> _Null:
    """Check the input, fix the kernel on the observed sets and set up the permuted statistics."""
    x, y = at_least_float32(x), at_least_float32(y)
    check_sets(x, y)
    if x.dim() != 2 or y.dim() != 2:
        raise InputError(
            f"permutation_test takes one set each, shapes (N, G) and (M, G); got "
            f"{tuple(x.shape)} and {tuple(y.shape)}. Test each pair of sets separately."
        )
    if isinstance(permutations, bool) or not isinstance(permutations, int) or permutations < 1:
        raise InputError(f"permutations must be a positive integer, got {permutations!r}.")
    kernel, estimator = as_kernel(kernel), as_estimator(estimator)
    n, z = x.shape[0], torch.cat([x, y])
    with torch.no_grad():
        fitted = kernel.adapt(x, y)
        statistic = estimator(x, y, fitted)
        if isinstance(estimator, QuadraticMMD) and z.shape[0] <= DENSE_MAX_CELLS:
            gram = fitted.forward(z, z, same=True)
            identity = torch.arange(z.shape[0], device=z.device)[None]
            observed = _quadratic_statistics(gram, n, identity, unbiased=estimator.unbiased)[0]
            scale = gram.abs().max()
            of = functools.partial(_quadratic_statistics, gram, n, unbiased=estimator.unbiased)
            chunk = max(1, _BATCH_ELEMENTS // z.shape[0])
        else:
            observed, scale = statistic, _kernel_scale(fitted, z)
            of = functools.partial(_estimator_statistics, z, n, kernel=fitted, estimator=estimator)
            chunk = max(1, _BATCH_ELEMENTS // math.prod(z.shape))
    tie = _TIE_ULPS * torch.finfo(z.dtype).eps * scale
    return _Null(float(statistic), observed, tie, of, chunk, z.shape[0], z.device)


def _null_chunks(null: _Null, permutations: int, seed: int) -> Iterator[Tensor]:
    """The permuted statistics, ``null.chunk`` permutations at a time; the permutations are the rows
    of :func:`_random_permutations` ``(permutations, N + M)``, drawn from one generator in the same order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, permutations, null.chunk):
            count = min(null.chunk, permutations - start)
            perms = torch.rand(count, null.cells, generator=generator, dtype=torch.float64).argsort(dim=-1)
            yield null.of(perms.to(null.device))


def _kernel_scale(kernel: Kernel, z: Tensor, max_cells: int = 1024) -> Tensor:
    """The largest ``|k|`` between (at most ``max_cells`` evenly spaced) pooled cells: the size of the
    terms a statistic sums, and so of its rounding errors."""
    rows = torch.linspace(0, z.shape[0] - 1, min(max_cells, z.shape[0]), device=z.device).long()
    sample = z[rows]
    return kernel.forward(sample, sample, same=True).abs().max()


def _random_permutations(n: int, count: int, seed: int, device: torch.device) -> Tensor:
    """``count`` independent uniform permutations of ``range(n)``, shape ``(count, n)``, all at once
    (the reference the chunks of :func:`_null_chunks` follow)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, n, generator=generator, dtype=torch.float64).argsort(dim=-1).to(device)


def _quadratic_statistics(gram: Tensor, n: int, perms: Tensor, *, unbiased: bool) -> Tensor:
    r"""MMD^2 of every relabelling from the pooled kernel matrix ``K`` ``(N + M, N + M)``.

    With 0/1 indicators :math:`a` (first ``n`` of each permutation) and :math:`b` (the rest):
    :math:`a^\top K a / n^2 + b^\top K b / m^2 - 2 a^\top K b / (n m)`; the unbiased form
    drops the diagonal terms and rescales by :math:`n / (n - 1)`, as :class:`QuadraticMMD`.
    """
    total = gram.shape[0]
    m = total - n
    diag, row_sums = torch.diagonal(gram), gram.sum(-1)
    total_sum, diag_sum = row_sums.sum(), diag.sum()
    batch = max(1, _BATCH_ELEMENTS // total)
    out = []
    for chunk in perms.split(batch):
        a = torch.zeros(chunk.shape[0], total, dtype=gram.dtype, device=gram.device)
        a.scatter_(1, chunk[:, :n], 1.0)
        # One product per permutation: with b = 1 - a, a'Kb = a'K1 - a'Ka, b'Kb = 1'K1 - 2 a'K1 + a'Ka.
        a_k_a = (a * (a @ gram)).sum(-1)
        a_k_1 = a @ row_sums
        kxx, kxy, kyy = a_k_a / n**2, (a_k_1 - a_k_a) / (n * m), (total_sum - 2 * a_k_1 + a_k_a) / m**2
        if unbiased:
            a_diag = a @ diag
            kxx = (kxx - a_diag / n**2) * (n / (n - 1))
            kyy = (kyy - (diag_sum - a_diag) / m**2) * (m / (m - 1))
        out.append(kxx + kyy - 2 * kxy)
    return torch.cat(out)


def _estimator_statistics(z: Tensor, n: int, perms: Tensor, *, kernel: Kernel, estimator: MMDEstimator) -> Tensor:
    """MMD^2 of every relabelling by calling ``estimator`` on batches of permuted sets."""
    batch = max(1, _BATCH_ELEMENTS // math.prod(z.shape))
    out = [estimator(z[chunk[:, :n]], z[chunk[:, n:]], kernel) for chunk in perms.split(batch)]
    return torch.cat(out)
