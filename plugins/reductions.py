"""Dense and blocked kernel reductions ``sum_ij wx_i k(x_i, y_j) wy_j``.

Radial kernels ``k = f(s)``, ``s = ||x - y||^2 / l^2``, take a fast path: ``s`` comes from GEMMs
on centred cells, ``f`` is applied in place, and a hand-written backward turns
``d/dx_i sum_ij a_ij f(s_ij) = (2 / l^2) sum_j a_ij f'(s_ij) (x_i - y_j)`` into GEMMs again,
so autograd never records an ``N x M`` temporary (dense keeps ``s`` for the backward, chunked
recomputes it block by block). Within-set sums are symmetric: only blocks on and above the
diagonal are computed. Gradients reach the cells, the weights and a trainable lengthscale
(first derivatives only). Other kernels (GPyTorch, sums of kernels, radial kernels with other
trainable parameters) go through plain autograd over ``kernel.forward``, checkpointed per block
when chunked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from perturbdiff_core.errors import InputError
from perturbdiff_core.mmd.kernels import Kernel, RadialKernel
from perturbdiff_core.mmd.reductions import KernelReduction

#: A set's sum with itself is split into this many row spans, each multiplied only against the
#: columns from its own diagonal block on (10 of 16 blocks' work for 4), a symmetric GEMM, which
#: torch does not offer: dense plans sum those blocks directly (:func:`_staircase`; their backward
#: mirrors them into one matrix), a chunked plan's diagonal block is computed that way and
#: mirrored (:func:`_sq_dists`)...
SYMMETRIC_SPLIT = 4
#: ...for sets of at least this many cells, on a CPU. Below it, and on GPUs, the saving is smaller
#: than the cost of the extra small operations.
SYMMETRIC_SPLIT_MIN_ROWS = 256

#: ``backend="auto"`` gives the dense backend calls of up to this many kernel entries
#: (``batch * (N^2 + M^2 + N M)`` for an MMD; float32: 128 MiB per kernel matrix held).
DENSE_MAX_ENTRIES = 2**25

_TERMS = ("xx", "yy", "xy")
_CENTRE_CELLS = 64


def _launch_bound(device: torch.device) -> bool:
    """True on GPUs: there these sums' small GEMMs cost their kernel launches more than their
    arithmetic, and a host sync stalls the queue, so a call uses one GEMM per term (no
    :data:`SYMMETRIC_SPLIT`), always centres and keeps the lengthscale on the device."""
    return device.type != "cpu"


@dataclass(frozen=True)
class _Block:
    """Rows ``rows`` of the left set against rows ``cols`` of the right one, counted ``factor`` times."""

    rows: slice
    cols: slice
    factor: float
    diagonal: bool  # the block holds pairs (i, i) of one set


def _spans(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _blocks(symmetric: bool, same: bool, n_left: int, n_right: int, size: int) -> Iterator[_Block]:
    """Blocks covering an ``n_left x n_right`` sum; a symmetric sum uses the upper triangle twice."""
    left, right = _spans(n_left, size), _spans(n_right, size)
    for a, rows in enumerate(left):
        for b, cols in enumerate(right):
            if symmetric and b < a:
                continue
            factor = 2.0 if symmetric and a != b else 1.0
            yield _Block(rows, cols, factor, a == b and (symmetric or same))


def _staircase(n: int, size: int) -> Iterator[tuple[_Block, tuple[_Block, ...]]]:
    """The upper triangle of a symmetric ``n x n`` sum in row spans of ``size``, one GEMM per span
    (its rows against all columns from its diagonal on; nothing mirrored). Each GEMM holds two
    blocks: the span's diagonal block, counted once, and the columns after it, counted twice."""
    for rows in _spans(n, size):
        head = _Block(rows, rows, 1.0, True)
        parts = (head, _Block(rows, slice(rows.stop, n), 2.0, False)) if rows.stop < n else (head,)
        yield _Block(rows, slice(rows.start, n), 1.0, True), parts


def _part_of(t: Tensor, gemm: _Block, part: _Block) -> Tensor:
    """The columns of ``part`` in ``t``, the ``(B, rows, cols)`` result of the GEMM ``gemm`` (a view)."""
    return t[:, :, part.cols.start - gemm.cols.start : part.cols.stop - gemm.cols.start]


def _terms(same: bool, wx: Tensor, wy: Tensor) -> tuple[str, ...]:
    """``("xx",)`` for a symmetric within-set sum (``y is x`` with one weight vector), else ``("xy",)``."""
    return ("xx",) if same and wx is wy else ("xy",)


def _sq_norms(points: Tensor, shift: Tensor | None) -> Tensor:
    """``||p_i - shift||^2`` as ``(B, n)``, a few thousand rows at a time (no full copy)."""
    spans = _spans(points.shape[-2], 4096)
    parts = [points[:, s] if shift is None else points[:, s] - shift for s in spans]
    return torch.cat([torch.linalg.vector_norm(p, dim=-1).square() for p in parts], -1)


def _centre(x: Tensor, sq_norms: Tensor, *, always: bool) -> Tensor | None:
    """A centre for ``x`` when the cells lie farther from the origin than they spread, else None.

    ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b`` loses ``eps (||a||^2 + ||b||^2)`` to rounding;
    shifting by a point inside the cloud (the mean of the first :data:`_CENTRE_CELLS` cells)
    keeps that near ``eps`` times the spread. Data already near the origin (log-normalised
    counts, PCA scores) skip the shift and its copy unless ``always`` (launch-bound devices: the
    copy is cheap there, the host sync that deciding takes is not).
    """
    centre = x[:, :_CENTRE_CELLS].mean(-2, keepdim=True)
    if always:
        return centre
    offset = centre.square().sum(-1)  # (B, 1)
    spread = sq_norms[:, :_CENTRE_CELLS].mean(-1, keepdim=True)
    return centre if bool((2.0 * offset > spread).any()) else None


class _Set:
    """One side of a reduction: cells ``(B, n, G)`` seen shifted by a common centre, weights ``(B, n)``.

    Dense plans shift once (a copy); blocked plans shift each block as it is used.
    """

    def __init__(self, base: Tensor, shift: Tensor | None, weights: Tensor, sq_norms: Tensor) -> None:
        self.base, self.shift, self.weights, self.sq_norms = base, shift, weights, sq_norms

    @classmethod
    def build(cls, points: Tensor, weights: Tensor, centre: Tensor | None, *, copy: bool, sq_norms: Tensor | None = None) -> _Set:
        if centre is None:
            return cls(points, None, weights, _sq_norms(points, None) if sq_norms is None else sq_norms)
        if copy:
            shifted = points - centre
            return cls(shifted, None, weights, _sq_norms(shifted, None))
        return cls(points, centre, weights, _sq_norms(points, centre))

    @property
    def size(self) -> int:
        return self.base.shape[-2]

    def rows(self, span: slice) -> Tensor:
        """Shifted rows ``span``."""
        rows = self.base[:, span]
        return rows if self.shift is None else rows - self.shift


@dataclass(frozen=True)
class _Plan:
    """What one call of :class:`_RadialSums` computes and how."""

    terms: tuple[str, ...]
    same: bool  # the "xy" term compares a set with itself: exact zero distances on the diagonal
    exclude: tuple[str, ...]  # terms whose i == j pairs are dropped (U-statistics)
    block_size: int | None  # rows per block; None: dense (whole sets, symmetric sums split)
    record: bool  # autograd is recording (under torch.no_grad nothing is kept for a backward)
    shared_inv_l2: float | None  # 1 / l^2 when one lengthscale serves the whole batch
    launch_bound: bool  # on a device where launches and host syncs cost more than arithmetic (GPUs)

    @property
    def dense(self) -> bool:
        return self.block_size is None

    @property
    def split(self) -> int:
        """Row spans of a symmetric sum: :data:`SYMMETRIC_SPLIT`, or 1 where launch-bound."""
        return 1 if self.launch_bound else SYMMETRIC_SPLIT

    def gemms(self, term: str, n_left: int, n_right: int) -> Iterator[tuple[_Block, tuple[_Block, ...]]]:
        """The GEMMs of one term's sum, each with the blocks (weights, factor) its result holds."""
        symmetric = term != "xy"
        if self.dense and symmetric and self.split > 1 and n_left >= SYMMETRIC_SPLIT_MIN_ROWS:
            yield from _staircase(n_left, -(-n_left // self.split))
            return
        size = self.block_size or max(n_left, n_right)
        for blk in _blocks(symmetric, self.same, n_left, n_right, size):
            yield blk, (blk,)

    def blocks(self, term: str, n_left: int, n_right: int) -> Iterator[_Block]:
        """The blocks of one term's sum, in the order :meth:`gemms` computes them."""
        for _, parts in self.gemms(term, n_left, n_right):
            yield from parts


def _sq_dists(a: Tensor, b: Tensor, na: Tensor, nb: Tensor, diagonal: bool, scale: float, split: int) -> Tensor:
    """``scale (||a_i||^2 + ||b_j||^2 - 2 a_i.b_j)`` as ``(B, n, m)`` from GEMMs.

    On a square diagonal block (``b`` holds the rows of ``a``) of :data:`SYMMETRIC_SPLIT_MIN_ROWS`
    rows or more the result is symmetric: row block ``i`` of ``split`` is multiplied
    with the columns from block ``i`` on, and the rest of its rows is the transpose.
    """
    na, nb = na * scale, nb * scale
    square = diagonal and a.shape[-2] == b.shape[-2]
    if not square or split == 1 or a.shape[-2] < SYMMETRIC_SPLIT_MIN_ROWS:
        return torch.add(na.unsqueeze(-1), nb.unsqueeze(-2)).baddbmm_(a, b.transpose(-1, -2), alpha=-2.0 * scale)
    n = a.shape[-2]
    out = a.new_empty(a.shape[0], n, n)
    for rows in _spans(n, -(-n // split)):
        rest = slice(rows.start, n)
        block = torch.baddbmm(na[:, rows, None], a[:, rows], a[:, rest].transpose(-1, -2), alpha=-2.0 * scale)
        out[:, rows, rest] = block.add_(na[:, None, rest])
        out[:, rows.stop:, rows] = block[:, :, rows.stop - rows.start:].transpose(-1, -2)
    return out


def _scaled_sq_dists(left: _Set, right: _Set, blk: _Block, a: Tensor, b: Tensor, inv_l2: Tensor, plan: _Plan) -> Tensor:
    """``s_ij = ||a_i - b_j||^2 / l^2`` for one block, ``(B, n, m)``, written in place.

    A lengthscale shared by the whole batch is folded into the GEMM (one pass fewer).
    """
    shared = plan.shared_inv_l2
    s = _sq_dists(a, b, left.sq_norms[:, blk.rows], right.sq_norms[:, blk.cols], blk.diagonal, shared or 1.0, plan.split)
    s.clamp_min_(0.0)
    if shared is None:
        s.mul_(inv_l2[:, None, None])
    if blk.diagonal:
        s.diagonal(dim1=-2, dim2=-1).zero_()
    return s


def _row_times(w: Tensor, k: Tensor) -> Tensor:
    """``w^T k`` per batch element, ``(B, m)``: a row vector times a matrix (torch's batched
    matrix-times-column-vector is several times slower on CPU)."""
    return torch.bmm(w.unsqueeze(-2), k).squeeze(-2)


class _RadialSums(torch.autograd.Function):
    """Weighted sums ``(B, terms)`` of a radial kernel, with a GEMM-based hand-written backward.

    Inputs have one batch dimension: ``inv_l2 (B,)``, ``x (B, N, G)``, ``wx (B, N)``,
    ``y (B, M, G)``, ``wy (B, M)``. Dense plans keep the scaled distances for the backward;
    blocked plans keep only the inputs and recompute each block.
    """

    @staticmethod
    def forward(ctx: Any, kernel: RadialKernel, plan: _Plan, inv_l2: Tensor, x: Tensor, wx: Tensor, y: Tensor, wy: Tensor) -> Tensor:  # type: ignore[override]
        need_l2, need_x, need_wx, need_y, need_wy = (n and plan.record for n in ctx.needs_input_grad[2:7])
        keep = plan.dense and (need_l2 or need_x or need_y)  # blocked plans recompute instead
        need_w = {"x": need_wx, "y": need_wy}
        x_norms = _sq_norms(x, None)
        centre = _centre(x, x_norms, always=plan.launch_bound)
        sets = {
            "x": _Set.build(x, wx, centre, copy=plan.dense, sq_norms=x_norms),
            "y": _Set.build(y, wy, centre, copy=plan.dense),
        }
        out = x.new_zeros(x.shape[0], len(plan.terms))
        saved: list[Tensor] = []
        weight_grads: list[Tensor] = []  # per term: d term / d (left weights), d term / d (right weights)
        for t, term in enumerate(plan.terms):
            left, right = sets[term[0]], sets[term[1]]
            track_w = need_w[term[0]] or need_w[term[1]]
            if track_w:
                d_left, d_right = torch.zeros_like(left.weights), torch.zeros_like(right.weights)
            for gemm, parts in plan.gemms(term, left.size, right.size):
                a, b = left.rows(gemm.rows), right.rows(gemm.cols)
                s = _scaled_sq_dists(left, right, gemm, a, b, inv_l2, plan)
                if keep:
                    saved.extend(_part_of(s, gemm, blk) for blk in parts)
                    s = s.clone()
                k = kernel.profile_(s)
                if gemm.diagonal and term in plan.exclude:
                    k.diagonal(dim1=-2, dim2=-1).zero_()
                for blk in parts:
                    kb = _part_of(k, gemm, blk)
                    wl, wr = left.weights[:, blk.rows], right.weights[:, blk.cols]
                    wk = _row_times(wl, kb)
                    out[:, t] += blk.factor * (wk * wr).sum(-1)
                    if track_w:
                        d_left[:, blk.rows] += blk.factor * _row_times(wr, kb.transpose(-1, -2))
                        d_right[:, blk.cols] += blk.factor * wk
            if track_w:
                weight_grads.extend([d_left, d_right])
        ctx.kernel, ctx.plan, ctx.keep = kernel, plan, keep
        ctx.centred = centre is not None
        shifted = [sets[n].base if plan.dense else sets[n].shift for n in ("x", "y")] if centre is not None else []
        ctx.save_for_backward(inv_l2, x, wx, y, wy, *[sets[n].sq_norms for n in ("x", "y")], *shifted, *weight_grads, *saved)
        ctx.n_weight_grads = len(weight_grads)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        kernel, plan = ctx.kernel, ctx.plan
        need_l2, need_x, need_wx, need_y, need_wy = ctx.needs_input_grad[2:7]
        inv_l2, x, wx, y, wy, x_norms, y_norms, *rest = ctx.saved_tensors
        if ctx.centred:
            bx, by, *rest = rest
            if plan.dense:
                sets = {"x": _Set(bx, None, wx, x_norms), "y": _Set(by, None, wy, y_norms)}
            else:
                sets = {"x": _Set(x, bx, wx, x_norms), "y": _Set(y, by, wy, y_norms)}
        else:
            sets = {"x": _Set(x, None, wx, x_norms), "y": _Set(y, None, wy, y_norms)}
        weight_grads, saved = iter(rest[: ctx.n_weight_grads]), iter(rest[ctx.n_weight_grads :])
        need = {"x": need_x, "y": need_y}
        need_w = {"x": need_wx, "y": need_wy}
        grads: dict[str, Tensor | None] = {"x": None, "y": None}
        coef = {n: torch.zeros_like(sets[n].weights) if need[n] else None for n in ("x", "y")}
        w_grads = {"x": torch.zeros_like(wx) if need_wx else None, "y": torch.zeros_like(wy) if need_wy else None}
        g_l2 = torch.zeros_like(inv_l2) if need_l2 else None

        def add_product(name: str, span: slice, q: Tensor, other: Tensor) -> None:
            """``grads[name][:, span] += q @ other``; a first product covering all rows allocates."""
            if grads[name] is None:
                if span.start == 0 and span.stop == sets[name].size:
                    grads[name] = torch.bmm(q, other)
                    return
                grads[name] = torch.zeros_like(sets[name].base)
            grads[name][:, span].baddbmm_(q, other)

        for t, term in enumerate(plan.terms):
            g = grad_out[:, t]
            if need_w[term[0]] or need_w[term[1]]:
                for name in term:
                    vector = next(weight_grads)
                    if w_grads[name] is not None:
                        w_grads[name] += g[:, None] * vector
            left, right = sets[term[0]], sets[term[1]]
            need_left, need_right = need[term[0]], need[term[1]]
            # A dense within-set term gathers its blocks' q (and their mirror images) into one
            # symmetric matrix for a single GEMM over all rows: a block's transposed product has
            # only the block's rows as inner dimension, a slow GEMM.
            full_q = None
            if plan.dense and term != "xy" and need_left:
                full_q = left.base.new_empty(left.base.shape[0], left.size, left.size)
            for blk in plan.blocks(term, left.size, right.size):
                s = next(saved) if ctx.keep else None
                if not (need_left or need_right or need_l2):
                    continue
                a, b = left.rows(blk.rows), right.rows(blk.cols)
                if s is None:
                    s = _scaled_sq_dists(left, right, blk, a, b, inv_l2, plan)
                symmetric_diagonal = blk.diagonal and term != "xy"  # q symmetric: count the left side twice
                scale = 2.0 if symmetric_diagonal else 1.0
                # d out / d s_ij = factor g wl_i wr_j f'(s_ij) and d s_ij / d a_i = 2 inv_l2 (a_i - b_j):
                # with q_ij = -2 scale inv_l2 (d out / d s_ij), d out / d a_i = (q b)_i - (sum_j q_ij) a_i.
                row = left.weights[:, blk.rows] * (-2.0 * scale * blk.factor * inv_l2 * g)[:, None]
                q = kernel.profile_grad(s) * row.unsqueeze(-1)
                q.mul_(right.weights[:, None, blk.cols])
                if g_l2 is not None:  # d s / d inv_l2 = s / inv_l2
                    g_l2 -= torch.einsum("bij,bij->b", q, s) / (2.0 * scale * inv_l2.square())
                if full_q is not None:
                    full_q[:, blk.rows, blk.cols] = q
                    if not blk.diagonal:
                        full_q[:, blk.cols, blk.rows] = q.transpose(-1, -2)
                    continue
                if need_left:
                    coef[term[0]][:, blk.rows] += q.sum(-1)
                    add_product(term[0], blk.rows, q, b)
                if need_right and not symmetric_diagonal:
                    coef[term[1]][:, blk.cols] += q.sum(-2)
                    add_product(term[1], blk.cols, q.transpose(-1, -2), a)
            if full_q is not None:
                everything = slice(0, left.size)
                coef[term[0]] += full_q.sum(-1)
                add_product(term[0], everything, full_q, left.rows(everything))
        for name in ("x", "y"):  # the -(sum_j q_ij) a_i parts, one pass per set
            if grads[name] is not None:  # None: no term uses this input (y passed as x), zero gradient
                for span in _spans(sets[name].size, 4096):
                    grads[name][:, span].addcmul_(coef[name][:, span, None], sets[name].rows(span), value=-1.0)
        return None, None, g_l2, grads["x"], w_grads["x"], grads["y"], w_grads["y"]


def _fast_path(kernel: Kernel) -> bool:
    """Radial kernels whose only trainable parameter (if any) is the lengthscale."""
    if not isinstance(kernel, RadialKernel):
        return False
    return not any(p.requires_grad for name, p in kernel.named_parameters() if name != "raw_lengthscale")


def _flatten(t: Tensor, batch: torch.Size, event_dims: int) -> Tensor:
    """``t`` broadcast to ``batch`` and reshaped to one batch dimension (a copy only if broadcast)."""
    event = t.shape[t.dim() - event_dims :]
    return t.expand(batch + event).reshape((-1,) + event)


def _radial_sums(
    kernel: RadialKernel, terms: tuple[str, ...], x: Tensor, wx: Tensor, y: Tensor, wy: Tensor, *, same: bool, exclude: tuple[str, ...], block_size: int | None
) -> tuple[Tensor, ...]:
    inv_l2 = kernel.lengthscale.to(x.dtype).square().reciprocal()
    if inv_l2.dim() >= 2:  # median heuristic: one lengthscale per set pair, (..., 1, 1)
        inv_l2 = inv_l2[..., 0, 0]
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2], wx.shape[:-1], wy.shape[:-1], inv_l2.shape)
    launch_bound = _launch_bound(x.device)
    shared = float(inv_l2.detach()) if inv_l2.dim() == 0 and not launch_bound else None  # float(): a host sync
    plan = _Plan(terms, same, exclude, block_size, torch.is_grad_enabled(), shared, launch_bound)
    out = _RadialSums.apply(
        kernel, plan, _flatten(inv_l2, batch, 0), _flatten(x, batch, 2), _flatten(wx, batch, 1), _flatten(y, batch, 2), _flatten(wy, batch, 1)
    )
    return tuple(out.reshape(*batch, len(terms)).unbind(-1))


def _block_value(kernel: Kernel, a: Tensor, b: Tensor, wa: Tensor, wb: Tensor, *, diagonal: bool, exclude: bool) -> Tensor:
    """``wa^T K(a, b) wb`` through ``kernel.forward`` and autograd (any kernel)."""
    k = kernel.forward(a, b, same=diagonal)
    if exclude and diagonal:
        k = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    return (wa.unsqueeze(-2) @ k @ wb.unsqueeze(-1))[..., 0, 0]


def _generic_sums(
    kernel: Kernel, terms: tuple[str, ...], x: Tensor, wx: Tensor, y: Tensor, wy: Tensor, *, same: bool, exclude: tuple[str, ...], block_size: int | None
) -> tuple[Tensor, ...]:
    """Any kernel, by blocks; blocked sums are checkpointed so backward recomputes each block."""
    sets = {"x": (x, wx), "y": (y, wy)}
    results = []
    for term in terms:
        (a, wa), (b, wb) = sets[term[0]], sets[term[1]]
        n, m = a.shape[-2], b.shape[-2]
        size = block_size or max(n, m)
        total = 0
        for blk in _blocks(term != "xy", same, n, m, size):
            fn = partial(_block_value, kernel, diagonal=blk.diagonal, exclude=term in exclude)
            rows = a[..., blk.rows, :]
            cols = rows if blk.diagonal else b[..., blk.cols, :]
            args = (rows, cols, wa[..., blk.rows], wb[..., blk.cols])
            if block_size is not None and torch.is_grad_enabled():
                value = checkpoint(fn, *args, use_reentrant=False)
            else:
                value = fn(*args)
            total = total + blk.factor * value
        results.append(total)
    return tuple(results)


class _BlockReduction(KernelReduction):
    """Shared engine of the dense (one block) and chunked (``block_size`` blocks) reductions.

    Sets that fit in one block are summed as dense: a single block holds what dense holds anyway.
    """

    block_size: int | None = None

    def _sums(
        self, kernel: Kernel, terms: tuple[str, ...], x: Tensor, wx: Tensor, y: Tensor, wy: Tensor, *, same: bool, exclude: tuple[str, ...]
    ) -> tuple[Tensor, ...]:
        engine = _radial_sums if _fast_path(kernel) else _generic_sums
        fits = self.block_size is None or self.block_size >= max(x.shape[-2], y.shape[-2])
        return engine(kernel, terms, x, wx, y, wy, same=same, exclude=exclude, block_size=None if fits else self.block_size)

    def weighted_sum(self, kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, same: bool = False, exclude_diagonal: bool = False) -> Tensor:
        terms = _terms(same, wx, wy)
        (total,) = self._sums(kernel, terms, x, wx, y, wy, same=same, exclude=terms if exclude_diagonal and same else ())
        return total

    def mmd_terms(self, kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, exclude_diagonal: bool) -> tuple[Tensor, Tensor, Tensor]:
        exclude = ("xx", "yy") if exclude_diagonal else ()
        # y is x: the cross term gets exact zero self-distances (MMD(x, x) = 0 exactly).
        kxx, kyy, kxy = self._sums(kernel, _TERMS, x, wx, y, wy, same=y is x, exclude=exclude)
        return kxx, kyy, kxy


class DenseReduction(_BlockReduction):
    """Forms the kernel matrices whole: fastest for small sets, ``O(B (N^2 + M^2 + N M))`` memory.

    Radial kernels: on a CPU 2.25 GEMMs forward from :data:`SYMMETRIC_SPLIT_MIN_ROWS` cells on
    (each set's Gram with itself on 10 of 16 blocks), 3 below and on GPUs (see :func:`_launch_bound`);
    backward one GEMM per term and differentiated side (training with only ``x`` differentiated: 2);
    the scaled distances are kept for the backward.

    ``backend="auto"``: first choice, up to :data:`DENSE_MAX_ENTRIES` kernel entries per call.
    """

    priority = 30
    max_entries = DENSE_MAX_ENTRIES

    def __repr__(self) -> str:
        return "DenseReduction()"


class ChunkedReduction(_BlockReduction):
    """Sums over ``block_size x block_size`` blocks: memory ``O(B block_size^2)`` plus the inputs.

    Never holds more than one block of the kernel per set; the backward recomputes each block
    (one more GEMM per block than dense) instead of keeping them, so exact MMDs over tens of
    thousands of cells fit in bounded memory (16384 cells of 2000 genes, forward and backward: the
    peak in ``docs/performance.md``). Sets that fit in one block are handled as dense.

    ``backend="auto"``: the fallback, at any size on any device (with the default ``block_size``).

    Args:
        block_size: rows and columns per block.
    """

    priority = 10

    def __init__(self, block_size: int = 1024) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InputError(f"block_size must be a positive integer, got {block_size!r}.")
        self.block_size = block_size

    def __repr__(self) -> str:
        return f"ChunkedReduction(block_size={self.block_size})"
