"""Conformance kit for kernels, MMD estimators and kernel reductions (scikit-learn ``check_estimator`` style).

Each check builds small random data, tests the documented contract property by property and
raises ``AssertionError`` naming the property that failed. Plug-in authors call them from
their own tests::

    from perturbdiff_core.testing import check_estimator, check_kernel

    def test_my_kernel():
        check_kernel(MyKernel(lengthscale=2.0))

    def test_my_estimator():
        check_estimator(MyEstimator(), kernel="rbf")
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

from .estimators import MMDEstimator, as_estimator
from .kernels import Kernel, RadialKernel, as_kernel
from .reductions import KernelReduction

__all__ = ["check_estimator", "check_kernel", "check_reduction"]


def _data(*shapes: Sequence[int], dtype: torch.dtype = torch.float64, seed: int = 0, shift: float = 0.3) -> list[Tensor]:
    """Random normal cell sets, the ``i``-th shifted by ``i * shift`` so they differ in distribution."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).add_(i * shift).to(dtype) for i, shape in enumerate(shapes)]


def _weights(*shapes: Sequence[int], seed: int = 1) -> list[Tensor]:
    """Random positive weights in ``[0.2, 1.2)``, float64."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.2 for shape in shapes]


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-7, 1e-9) if dtype == torch.float64 else (1e-4, 1e-5)


def _close(actual: Tensor, expected: Tensor, what: str, *, rtol: float, atol: float) -> None:
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, check_dtype=False, msg=lambda detail: f"{what}: {detail}"
    )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _gradcheck(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], what: str) -> None:
    """``torch.autograd.gradcheck`` of ``fn`` at float64 ``inputs``, failing with ``what``."""
    leaves = tuple(t.detach().double().requires_grad_(True) for t in inputs)
    try:
        torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)
    except GradcheckError as err:
        raise AssertionError(f"{what}: analytical and numerical gradients differ: {err}") from None


# ----------------------------------------------------------------------------------------- kernels


def check_kernel(kernel: Kernel, *, dtype: torch.dtype = torch.float64) -> None:
    """Check a :class:`~perturbdiff_core.kernels.Kernel` against the kernel contract.

    Shapes ``(..., N, G), (..., M, G) -> (..., N, M)``; symmetry ``K(x, y) = K(y, x)^T``;
    positive semi-definiteness (or, for ``conditionally_negative_definite`` kernels such as
    ``-||x - y||``, ``c^T K c >= 0`` whenever ``sum(c) = 0``, i.e. ``H K H`` PSD with the centring
    matrix ``H``); batch broadcasting equal to a loop over sets; ``diag=True`` equal to the
    diagonal; float32 agreeing with float64; and, in float64, ``torch.autograd.gradcheck``.
    Radial kernels also have their in-place ``profile_`` and ``profile_grad`` checked against
    ``profile`` and its autograd derivative.

    Args:
        kernel: the kernel to check (not modified; copies are cast to each dtype).
        dtype: dtype of the main checks; gradcheck runs only when it is float64.
    """
    name = type(kernel).__name__
    rtol, atol = _tolerances(dtype)
    k = copy.deepcopy(kernel).to(dtype)
    x, y = _data((3, 6, 4), (3, 5, 4), dtype=dtype)

    kxy = k(x, y)
    _require(
        tuple(kxy.shape) == (3, 6, 5),
        f"{name}: shape contract failed: K(x, y) for x (3, 6, 4), y (3, 5, 4) has shape {tuple(kxy.shape)}, expected (3, 6, 5).",
    )
    _require(bool(torch.isfinite(kxy).all()), f"{name}: finiteness failed: K(x, y) has NaN or Inf entries.")
    kxx = k(x, x)
    _close(kxx, kxx.transpose(-1, -2), f"{name}: symmetry K(x, x) = K(x, x)^T failed", rtol=rtol, atol=atol)
    _close(k(y, x), kxy.transpose(-1, -2), f"{name}: symmetry K(y, x) = K(x, y)^T failed", rtol=rtol, atol=atol)

    (z,) = _data((2, 12, 4), dtype=torch.float64, seed=2)
    gram = copy.deepcopy(kernel).double()(z, z)
    if kernel.conditionally_negative_definite:
        n = gram.shape[-1]
        centring = torch.eye(n, dtype=gram.dtype) - 1.0 / n
        gram, what = centring @ gram @ centring, "conditional definiteness (H K H PSD for CND kernels)"
    else:
        what = "positive semi-definiteness"
    eig = torch.linalg.eigvalsh(0.5 * (gram + gram.transpose(-1, -2)))
    worst = eig.min().item()
    scale = max(1.0, eig.abs().max().item())
    _require(worst >= -1e-8 * scale, f"{name}: {what} failed: smallest eigenvalue {worst:.3g} (largest |eig| {scale:.3g}).")

    loop = torch.stack([k(x[b], y[b]) for b in range(x.shape[0])])
    _close(kxy, loop, f"{name}: batch = loop failed: K(x, y) over a batch differs from a loop over sets", rtol=rtol, atol=atol)
    broadcast = k(x, y[:1])
    loop = torch.stack([k(x[b], y[0]) for b in range(x.shape[0])])
    _close(broadcast, loop, f"{name}: batch broadcasting failed: K(x (3, ...), y (1, ...)) differs from a loop", rtol=rtol, atol=atol)

    (x2,) = _data((3, 6, 4), dtype=dtype, seed=3)
    _close(
        k(x, x2, diag=True),
        torch.diagonal(k(x, x2), dim1=-2, dim2=-1),
        f"{name}: diag agreement failed: K(x, y, diag=True) differs from the diagonal of K(x, y)",
        rtol=rtol,
        atol=atol,
    )

    k32, k64 = copy.deepcopy(kernel).float(), copy.deepcopy(kernel).double()
    ref = k64(x.double(), y.double())
    _close(
        k32(x.float(), y.float()).double(),
        ref,
        f"{name}: float32 vs float64 agreement failed",
        rtol=1e-4,
        atol=1e-5 * max(1.0, ref.abs().max().item()),
    )

    if isinstance(kernel, RadialKernel):
        _check_profile(copy.deepcopy(kernel).double(), name)

    if dtype == torch.float64:  # hyperparameters fixed first: the median heuristic is not differentiated
        a, b = x[:2, :4].double(), y[:2, :3].double()
        fixed = k64.adapt(a, b)
        _gradcheck(lambda a, b: fixed(a, b), (a, b), f"{name}: gradcheck of K(x, y) failed")


def _check_profile(kernel: RadialKernel, name: str) -> None:
    """The fast paths of a radial kernel: in-place ``profile_`` and closed-form ``profile_grad``
    against ``profile`` and its autograd derivative, in float64 on random ``s > 0`` (and finite at 0)."""
    s = torch.cat([torch.zeros(1, dtype=torch.float64), torch.rand(63, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 6.0 + 1e-3])
    rtol, atol = _tolerances(torch.float64)
    expected = kernel.profile(s)
    _close(kernel.profile_(s.clone()), expected, f"{name}: profile_ (in place) differs from profile", rtol=rtol, atol=atol)
    argument = s.clone()
    grad = kernel.profile_grad(argument)
    _require(torch.equal(argument, s), f"{name}: profile_grad modified its input (backward passes reuse s).")
    _require(bool(torch.isfinite(grad).all()), f"{name}: profile_grad is not finite (check s = 0).")
    positive = s[1:].clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(kernel.profile(positive).sum(), positive)
    _close(grad[1:], reference, f"{name}: profile_grad differs from the autograd derivative of profile", rtol=rtol, atol=atol)


# -------------------------------------------------------------------------------------- estimators


def check_estimator(estimator: MMDEstimator | str, kernel: Kernel | str = "rbf", **kernel_params: Any) -> None:
    """Check an :class:`~perturbdiff_core.estimators.MMDEstimator` against the estimator contract.

    Output shape and finiteness; symmetry ``MMD(x, y) = MMD(y, x)``; ``MMD(x, x) = 0`` (biased
    estimators) or ``<= 0`` (U-statistics: for a PSD kernel ``k_ij <= (k_ii + k_jj) / 2``, which
    makes the unbiased ``MMD(x, x)`` non-positive); non-negativity of biased estimates; batch =
    loop and batch broadcasting; uniform weights = no weights; integer weights = repeated cells
    (biased estimators); invariance to the order of cells (when ``permutation_invariant``);
    finite gradients and ``torch.autograd.gradcheck`` in float64 wrt cells and weights.

    Args:
        estimator: an estimator instance or a ``perturbdiff.estimators`` plug-in name.
        kernel: a kernel instance or a ``perturbdiff.kernels`` plug-in name.
        **kernel_params: parameters of a named kernel.
    """
    est = as_estimator(estimator)
    k = as_kernel(kernel, **kernel_params).double()
    name = f"{est!r} with {type(k).__name__}"
    rtol, atol = 1e-6, 1e-9
    x, y = _data((3, 8, 4), (3, 6, 4))
    wx, wy = _weights((3, 8), (3, 6))

    def mmd(a: Tensor, b: Tensor, wa: Tensor | None = None, wb: Tensor | None = None) -> Tensor:
        return est(a, b, k, x_weights=wa, y_weights=wb)

    value = mmd(x, y, wx, wy)
    _require(tuple(value.shape) == (3,), f"{name}: shape contract failed: batch (3, ...) gave shape {tuple(value.shape)}, expected (3,).")
    _require(bool(torch.isfinite(value).all()), f"{name}: finiteness failed: got {value.tolist()}.")
    _close(mmd(y, x, wy, wx), value, f"{name}: symmetry MMD(x, y) = MMD(y, x) failed", rtol=rtol, atol=atol)

    same = mmd(x, x, wx, wx)
    if est.unbiased:
        _require(bool((same <= 1e-9).all()), f"{name}: MMD(x, x) <= 0 for an unbiased estimator failed: got {same.tolist()}.")
    else:
        _close(same, torch.zeros_like(same), f"{name}: MMD(x, x) = 0 failed", rtol=0.0, atol=1e-9)
        _require(bool((value >= -1e-9).all()), f"{name}: non-negativity of a biased estimate failed: got {value.tolist()}.")

    loop = torch.stack([mmd(x[b], y[b], wx[b], wy[b]) for b in range(3)])
    _close(value, loop, f"{name}: batch = loop failed", rtol=rtol, atol=atol)
    loop = torch.stack([mmd(x[b], y[0], wx[b], wy[0]) for b in range(3)])
    _close(mmd(x, y[:1], wx, wy[:1]), loop, f"{name}: batch broadcasting (y batch 1) failed", rtol=rtol, atol=atol)

    _close(
        mmd(x, y, torch.full_like(wx, 2.5), torch.full_like(wy, 0.5)),
        mmd(x, y),
        f"{name}: uniform weights = no weights failed",
        rtol=rtol,
        atol=atol,
    )
    if not est.unbiased:  # with the kernel fixed: repeating cells moves a median heuristic
        counts = torch.tensor([1, 3, 2, 1, 2, 1, 1, 3])
        fixed = k.adapt(x[0], y[0])
        _close(
            est(x[0], y[0], fixed, x_weights=counts.double()),
            est(x[0].repeat_interleave(counts, dim=0), y[0], fixed),
            f"{name}: integer weights = repeated cells failed",
            rtol=rtol,
            atol=atol,
        )
    if est.permutation_invariant:
        px, py = torch.randperm(8, generator=torch.Generator().manual_seed(4)), torch.randperm(6, generator=torch.Generator().manual_seed(5))
        _close(mmd(x[:, px], y[:, py], wx[:, px], wy[:, py]), value, f"{name}: permutation invariance of cells failed", rtol=rtol, atol=atol)

    leaves = [t.clone().requires_grad_(True) for t in (x, y, wx, wy)]
    mmd(*leaves).sum().backward()
    for label, leaf in zip(("x", "y", "x_weights", "y_weights"), leaves):
        _require(
            leaf.grad is not None and bool(torch.isfinite(leaf.grad).all()),
            f"{name}: finite gradient wrt {label} failed: {None if leaf.grad is None else 'NaN or Inf'}.",
        )
    a, b = x[:2, :5], y[:2, :4]
    # The median heuristic is not differentiated: fix one lengthscale from the pooled cells first.
    fixed = k.adapt(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    _gradcheck(
        lambda a, b, wa, wb: est(a, b, fixed, x_weights=wa, y_weights=wb),
        (a, b, wx[:2, :5], wy[:2, :4]),
        f"{name}: gradcheck wrt cells and weights failed",
    )


# -------------------------------------------------------------------------------------- reductions


def _dense_sum(kernel: Kernel, a: Tensor, b: Tensor, wa: Tensor, wb: Tensor, *, same: bool, exclude_diagonal: bool) -> Tensor:
    """Reference ``wa^T K(a, b) wb`` from the whole kernel matrix and plain autograd."""
    k = kernel.forward(a, b, same=same)
    if exclude_diagonal:
        k = k * (1.0 - torch.eye(k.shape[-1], dtype=k.dtype))
    return (wa.unsqueeze(-2) @ k @ wb.unsqueeze(-1))[..., 0, 0]


def check_reduction(reduction: KernelReduction, kernel: Kernel | str, *, dtype: torch.dtype = torch.float64, device: str = "cpu") -> None:
    """Check a :class:`~perturbdiff_core.reductions.KernelReduction` against a dense reference.

    ``weighted_sum`` (cross sums, ``same=True`` with and without ``exclude_diagonal``) and
    ``mmd_terms``: values and gradients wrt cells and weights must equal the whole kernel matrix
    under plain autograd, with and without batch broadcasting; in float64 the reduction's
    backward also passes ``torch.autograd.gradcheck``. Call it for kernels the reduction
    ``supports`` on ``device``. A ``"median"`` kernel is first fixed on the check's cells, as
    estimators fix it before they call a reduction.
    """
    k = (as_kernel(kernel) if isinstance(kernel, str) else copy.deepcopy(kernel)).to(dtype=dtype, device=device)
    x, y = (t.to(device) for t in _data((2, 7, 3), (2, 5, 3), dtype=dtype))
    k = k.adapt(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
    name = f"{type(reduction).__name__} with {type(k).__name__}"
    _require(reduction.supports(k, torch.device(device).type), f"{name}: supports(kernel, {device!r}) is False; nothing to check.")
    rtol, atol = _tolerances(dtype)
    wx, wy = (t.to(device=device, dtype=dtype) for t in _weights((2, 7), (2, 5)))

    def compare(label: str, run: Callable[..., Sequence[Tensor]], ref: Callable[..., Sequence[Tensor]], *inputs: Tensor) -> None:
        mine_in = [t.clone().requires_grad_(True) for t in inputs]
        ref_in = [t.clone().requires_grad_(True) for t in inputs]
        mine, expected = run(*mine_in), ref(*ref_in)
        shapes = []
        for i, (got, want) in enumerate(zip(mine, expected)):
            try:  # a reduction may return a term broadcast to the batch of both sets
                shapes.append(torch.broadcast_shapes(got.shape, want.shape))
            except RuntimeError:
                raise AssertionError(f"{name}: {label} value {i} has shape {tuple(got.shape)}, expected {tuple(want.shape)}.") from None
            _close(got.expand(shapes[-1]), want.expand(shapes[-1]), f"{name}: {label} value {i} differs from the dense reference", rtol=rtol, atol=atol)
        coef = [c.to(device) for c in _data(*shapes, dtype=dtype, seed=6)]
        mine_g = torch.autograd.grad(sum((c * t.expand(c.shape)).sum() for c, t in zip(coef, mine)), mine_in, allow_unused=True)
        ref_g = torch.autograd.grad(sum((c * t.expand(c.shape)).sum() for c, t in zip(coef, expected)), ref_in, allow_unused=True)
        for i, (got, want) in enumerate(zip(mine_g, ref_g)):
            want = torch.zeros_like(inputs[i]) if want is None else want
            got = torch.zeros_like(inputs[i]) if got is None else got
            _close(got, want, f"{name}: {label} gradient wrt input {i} differs from the dense reference", rtol=rtol, atol=atol)

    def cross(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> tuple[Tensor]:
        return (reduction.weighted_sum(k, a, b, wa, wb),)

    def cross_ref(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> tuple[Tensor]:
        return (_dense_sum(k, a, b, wa, wb, same=False, exclude_diagonal=False),)

    compare("weighted_sum(x, y)", cross, cross_ref, x, y, wx, wy)
    compare("weighted_sum(x, y) with y batch 1", cross, cross_ref, x, y[:1], wx, wy[:1])
    for exclude in (False, True):
        def within(a: Tensor, wa: Tensor, exclude: bool = exclude) -> tuple[Tensor]:
            return (reduction.weighted_sum(k, a, a, wa, wa, same=True, exclude_diagonal=exclude),)

        def within_ref(a: Tensor, wa: Tensor, exclude: bool = exclude) -> tuple[Tensor]:
            return (_dense_sum(k, a, a, wa, wa, same=True, exclude_diagonal=exclude),)

        def terms(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor, exclude: bool = exclude) -> tuple[Tensor, ...]:
            return reduction.mmd_terms(k, a, b, wa, wb, exclude_diagonal=exclude)

        def terms_ref(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor, exclude: bool = exclude) -> tuple[Tensor, ...]:
            return (
                _dense_sum(k, a, a, wa, wa, same=True, exclude_diagonal=exclude),
                _dense_sum(k, b, b, wb, wb, same=True, exclude_diagonal=exclude),
                _dense_sum(k, a, b, wa, wb, same=False, exclude_diagonal=False),
            )

        compare(f"weighted_sum(x, x, same=True, exclude_diagonal={exclude})", within, within_ref, x, wx)
        compare(f"mmd_terms(exclude_diagonal={exclude})", terms, terms_ref, x, y, wx, wy)
        compare(f"mmd_terms(exclude_diagonal={exclude}) with y batch 1", terms, terms_ref, x, y[:1], wx, wy[:1])

    if dtype == torch.float64:
        def terms_sum(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
            kxx, kyy, kxy = reduction.mmd_terms(k, a, b, wa, wb, exclude_diagonal=True)
            return kxx + 0.7 * kyy - 2.0 * kxy

        _gradcheck(terms_sum, (x[:, :5], y[:, :4], wx[:, :5], wy[:, :4]), f"{name}: gradcheck of mmd_terms failed")
