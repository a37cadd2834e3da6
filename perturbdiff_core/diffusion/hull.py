"""The nearest point of a convex hull: what ``control_levels: hull`` shows the denoiser of a set's levels.

A held-out cell type's or cell line's mean expression is moved to the nearest mixture of the
training contexts' means, so the denoiser only reads levels that lie within what training covered.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: At most this many accelerated projected-gradient iterations in :func:`hull_weights`; its tests check
#: they reach a float64 constrained least-squares solver on hulls of up to 32 vertices.
HULL_ITERATIONS = 500

#: :func:`hull_weights` stops once no weight moved by more than this in an iteration.
HULL_TOLERANCE = 1e-10


def project_to_simplex(w: Tensor) -> Tensor:
    """Euclidean projection of each row of ``w`` ``(..., K)`` onto the probability simplex
    (Held et al. 1974; the sort-based form of Duchi et al. 2008)."""
    u, _ = torch.sort(w, dim=-1, descending=True)
    cumulative = u.cumsum(-1) - 1
    ranks = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    support = (u - cumulative / ranks > 0).sum(-1, keepdim=True)  # >= 1: the largest entry always qualifies
    theta = cumulative.gather(-1, support - 1) / support.to(w.dtype)
    return (w - theta).clamp_min(0)


def hull_weights(points: Tensor, vertices: Tensor, iterations: int = HULL_ITERATIONS) -> Tensor:
    """Mixture weights ``(..., K)`` (non-negative, summing to 1) of ``vertices`` ``(K, G)`` whose mixture
    is nearest each of ``points`` ``(..., G)`` in Euclidean distance (FISTA on the
    ``K x K`` Gram matrix of the vertices centred on their mean, in float64 where the device has it)."""
    dtype = points.dtype if points.device.type == "mps" else torch.float64
    centre = vertices.mean(0)
    v = (vertices - centre).to(dtype)
    gram = v @ v.T
    linear = (points.to(dtype) - centre.to(dtype)) @ v.T  # (..., K)
    lipschitz = torch.linalg.eigvalsh(gram)[-1].clamp_min(torch.finfo(dtype).tiny)
    k = vertices.shape[0]
    w = torch.full((*points.shape[:-1], k), 1.0 / k, dtype=dtype, device=points.device)
    y, momentum = w, 1.0
    for i in range(iterations):
        step = project_to_simplex(y - (y @ gram - linear) / lipschitz)
        next_momentum = (1 + (1 + 4 * momentum**2) ** 0.5) / 2
        y = step + (momentum - 1) / next_momentum * (step - w)
        moved = step - w
        w, momentum = step, next_momentum
        if i % 10 == 9 and moved.abs().max() <= HULL_TOLERANCE:
            break
    return w.to(points.dtype)


def nearest_in_hull(points: Tensor, vertices: Tensor, iterations: int = HULL_ITERATIONS) -> Tensor:
    """The point of the convex hull of ``vertices`` ``(K, G)`` nearest each of ``points`` ``(..., G)``."""
    return hull_weights(points, vertices, iterations) @ vertices.to(points.dtype)


def explained_by_hull(points: Tensor, vertices: Tensor) -> Tensor:
    r"""How much of each point's offset from the vertices' average the hull accounts for:
    :math:`1 - \|p - h(p)\|^2 / \|p - \bar v\|^2` with :math:`h(p)` the nearest point of the hull, 1
    for a point of the hull and 0 for one whose offset is orthogonal to every direction the hull
    spans (``(...,)``; float64 on the CPU)."""
    nearest = nearest_in_hull(points, vertices)
    offset = (points - vertices.to(points.dtype).mean(0)).pow(2).sum(-1)
    return 1 - (points - nearest).pow(2).sum(-1) / offset.clamp_min(torch.finfo(points.dtype).tiny)
