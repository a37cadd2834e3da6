"""Conformance kits for every plug-in group (scikit-learn ``check_estimator`` style).

Each kit is a list of small named checks. A check builds small random data, tests one part of the
documented contract and raises ``AssertionError`` naming the property that failed.

One kit per entry-point group:

- ``perturbdiff.kernels``: :func:`check_kernel`;
- ``perturbdiff.embeddings``: :func:`check_embedding`;
- ``perturbdiff.estimators``: :func:`check_estimator`;
- ``perturbdiff.backends``: :func:`check_reduction`;
- ``perturbdiff.schedules``: :func:`check_schedule`;
- ``perturbdiff.denoisers``: :func:`check_denoiser`;
- ``perturbdiff.encoders``: :func:`check_encoder`;
- ``perturbdiff.predictors``: :func:`check_predictor`.

Plug-in authors call them from their own tests, one kit per test, or one pytest item per
(object, check) with :func:`parametrize_with_checks`, so the first failure does not hide the rest::

    from perturbdiff_core.testing import check_kernel, parametrize_with_checks

    def test_my_kernel():
        check_kernel(MyKernel(lengthscale=2.0))

    @parametrize_with_checks([MyKernel(lengthscale=2.0), (MyEstimator(), {"kernel": "energy"})])
    def test_conformance(obj, check):
        check(obj)

The kits never modify the object they are given (checks work on copies).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import Tensor
from torch.autograd.gradcheck import GradcheckError

from .errors import PerturbDiffError, first_line
from .mmd.estimators import MMDEstimator, as_estimator
from .mmd.kernels import Kernel, RadialKernel, as_kernel
from .mmd.reductions import KernelReduction

if TYPE_CHECKING:  # imported where used: the data layer is heavy for a kernel author's tests
    from .data.encoders import PerturbationEncoder
    from .diffusion.denoisers import Denoiser
    from .diffusion.schedules import NoiseSchedule
    from .evaluation.predictors import Predictor
    from .mmd.embeddings import EmbeddingMap

__all__ = [
    "CheckSkipped",
    "check_denoiser",
    "check_embedding",
    "check_encoder",
    "check_estimator",
    "check_kernel",
    "check_predictor",
    "check_reduction",
    "check_schedule",
    "checks",
    "parametrize_with_checks",
]

#: A named check: it takes the object under test and raises AssertionError (or CheckSkipped).
NamedCheck = tuple[str, Callable[[Any], None]]


class CheckSkipped(Exception):
    """A check that cannot run here because an optional dependency is absent (pykeops for the KeOps
    smoke test): a kit goes on with the next check, and :func:`parametrize_with_checks` skips the item
    with the reason. Checks that do not apply to an object (a radial kernel's fast paths for another
    kernel) are not listed for it at all."""


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


def _run(obj: Any, named: list[NamedCheck]) -> None:
    """Every check in order; the first failure raises, checks that do not apply are passed over."""
    for _, check in named:
        try:
            check(obj)
        except CheckSkipped:
            continue


def _yaml_round_trip(values: Any, what: str) -> None:
    """``values`` survives ``yaml.safe_dump`` / ``safe_load`` unchanged (what a run folder and a checkpoint need)."""
    try:
        again = yaml.safe_load(yaml.safe_dump(values))
    except yaml.YAMLError as err:
        raise AssertionError(f"{what} is not YAML-serialisable: {first_line(err)}; use numbers, strings, lists and dicts.") from None
    _require(again == values, f"{what} changes through YAML: {values!r} reads back as {again!r}.")


# ----------------------------------------------------------------------------------------- kernels

#: Scales (standard deviations) of the 200-point sets on which definiteness is checked, beside a set
#: mixing clusters of several scales: a kernel that is not positive definite can look fine on 12 points.
SPREAD_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)


def _spread_points() -> Tensor:
    """``(6, 200, 4)`` float64: 200 normal points at each of :data:`SPREAD_SCALES`, and four clusters of 50
    points of scales 0.1 to 3 around centres three times as far apart."""
    gen = torch.Generator().manual_seed(9)
    sets = [torch.randn(200, 4, generator=gen, dtype=torch.float64) * scale for scale in SPREAD_SCALES]
    clusters = [
        torch.randn(50, 4, generator=gen, dtype=torch.float64) * scale + 3.0 * scale * torch.randn(1, 4, generator=gen, dtype=torch.float64)
        for scale in SPREAD_SCALES[:4]
    ]
    return torch.stack([*sets, torch.cat(clusters)])


def _kernel_shapes(kernel: Kernel, *, dtype: torch.dtype) -> None:
    """Shapes ``(..., N, G), (..., M, G) -> (..., N, M)``, finite values, symmetry."""
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


def _kernel_same_path(kernel: Kernel, *, dtype: torch.dtype) -> None:
    """``K(x, x)`` (``same=True``: ``y is x``, the path estimators take within a set) equals
    ``K(x, x.clone())`` (``same=False``), and the biased MMD^2 of ``x`` and its copy is 0.

    Up to rounding: a distance computed as ``|x|^2 + |y|^2 - 2 x.y`` is off by about
    ``sqrt(eps) |x|`` near 0, hence a tolerance of ``100 sqrt(eps)`` times the largest ``|K|``.
    """
    name = type(kernel).__name__
    k = copy.deepcopy(kernel).to(dtype)
    (x,) = _data((2, 9, 6), dtype=dtype, seed=7)
    twin = x.clone()
    same, other = k(x), k(x, twin)
    atol = 100 * math.sqrt(torch.finfo(dtype).eps) * max(1.0, other.abs().max().item())
    _close(same, other, f"{name}: same=True path failed: K(x, x) differs from K(x, x.clone())", rtol=0.0, atol=atol)
    mmd = same.mean((-2, -1)) + k(twin).mean((-2, -1)) - 2.0 * other.mean((-2, -1))
    _require(
        bool((mmd.abs() <= atol).all()),
        f"{name}: same=True path failed: the biased MMD^2(x, x.clone()) is {mmd.tolist()}, not 0; the within-set "
        f"terms (same=True) and the cross terms (same=False) compute different kernels.",
    )


def _kernel_definite(kernel: Kernel, *, dtype: torch.dtype) -> None:
    """Positive semi-definiteness, or for ``conditionally_positive_definite`` kernels ``H K H`` PSD, on 12
    points and on 200-point sets spread over scales 0.1 to 10 (float64)."""
    name = type(kernel).__name__
    k = copy.deepcopy(kernel).double()
    (z,) = _data((2, 12, 4), dtype=torch.float64, seed=2)
    for points, where in ((z, "12 points"), (_spread_points(), "200 points at scales 0.1 to 10")):
        gram = k(points, points)
        if kernel.conditionally_positive_definite:
            n = gram.shape[-1]
            centring = torch.eye(n, dtype=gram.dtype) - 1.0 / n
            gram, what = centring @ gram @ centring, "conditional definiteness (H K H PSD for conditionally PD kernels)"
        else:
            what = "positive semi-definiteness"
        eig = torch.linalg.eigvalsh(0.5 * (gram + gram.transpose(-1, -2)))
        worst = eig.min().item()
        scale = max(1.0, eig.abs().max().item())
        _require(
            worst >= -1e-8 * scale,
            f"{name}: {what} failed on {where}: smallest eigenvalue {worst:.3g} (largest |eig| {scale:.3g}).",
        )


def _kernel_batching(kernel: Kernel, *, dtype: torch.dtype) -> None:
    """A batch of sets equals a loop over them, also with a batch of one broadcast against many."""
    name = type(kernel).__name__
    rtol, atol = _tolerances(dtype)
    k = copy.deepcopy(kernel).to(dtype)
    x, y = _data((3, 6, 4), (3, 5, 4), dtype=dtype)
    loop = torch.stack([k(x[b], y[b]) for b in range(x.shape[0])])
    _close(k(x, y), loop, f"{name}: batch = loop failed: K(x, y) over a batch differs from a loop over sets", rtol=rtol, atol=atol)
    loop = torch.stack([k(x[b], y[0]) for b in range(x.shape[0])])
    _close(k(x, y[:1]), loop, f"{name}: batch broadcasting failed: K(x (3, ...), y (1, ...)) differs from a loop", rtol=rtol, atol=atol)


def _kernel_diag(kernel: Kernel, *, dtype: torch.dtype) -> None:
    """``diag=True`` equals the diagonal of the matrix."""
    name = type(kernel).__name__
    rtol, atol = _tolerances(dtype)
    k = copy.deepcopy(kernel).to(dtype)
    (x,) = _data((3, 6, 4), dtype=dtype)
    (x2,) = _data((3, 6, 4), dtype=dtype, seed=3)
    _close(
        k(x, x2, diag=True),
        torch.diagonal(k(x, x2), dim1=-2, dim2=-1),
        f"{name}: diag agreement failed: K(x, y, diag=True) differs from the diagonal of K(x, y)",
        rtol=rtol,
        atol=atol,
    )


def _kernel_dtypes(kernel: Kernel, *, dtype: torch.dtype) -> None:
    """float32 agrees with float64."""
    name = type(kernel).__name__
    x, y = _data((3, 6, 4), (3, 5, 4))
    k32, k64 = copy.deepcopy(kernel).float(), copy.deepcopy(kernel).double()
    ref = k64(x, y)
    _close(
        k32(x.float(), y.float()).double(),
        ref,
        f"{name}: float32 vs float64 agreement failed",
        rtol=1e-4,
        atol=1e-5 * max(1.0, ref.abs().max().item()),
    )


def _kernel_profile(kernel: RadialKernel, *, dtype: torch.dtype) -> None:
    """The fast paths of a radial kernel: in-place ``profile_`` and closed-form ``profile_grad``
    against ``profile`` and its autograd derivative, in float64 on random ``s > 0`` (and finite at 0)."""
    name = type(kernel).__name__
    k = copy.deepcopy(kernel).double()
    s = torch.cat([torch.zeros(1, dtype=torch.float64), torch.rand(63, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 6.0 + 1e-3])
    rtol, atol = _tolerances(torch.float64)
    expected = k.profile(s)
    _close(k.profile_(s.clone()), expected, f"{name}: profile_ (in place) differs from profile", rtol=rtol, atol=atol)
    argument = s.clone()
    grad = k.profile_grad(argument)
    _require(torch.equal(argument, s), f"{name}: profile_grad modified its input (backward passes reuse s).")
    _require(bool(torch.isfinite(grad).all()), f"{name}: profile_grad is not finite (check s = 0).")
    positive = s[1:].clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(k.profile(positive).sum(), positive)
    _close(grad[1:], reference, f"{name}: profile_grad differs from the autograd derivative of profile", rtol=rtol, atol=atol)


def _kernel_lengthscale(kernel: RadialKernel, *, dtype: torch.dtype) -> None:
    """Lengthscale semantics ``k_l(x, y) = k_1(x / l, y / l)``: the lengthscale only rescales the cells
    (a ``profile`` that reads ``self.lengthscale`` again scales twice)."""
    name = type(kernel).__name__
    rtol, atol = _tolerances(torch.float64)
    k = copy.deepcopy(kernel).double()
    x, y = _data((2, 6, 4), (2, 6, 4), seed=8)
    unit = k.fixed_at(torch.zeros((), dtype=torch.float64))
    for l in (0.4, 2.5):
        scaled = k.fixed_at(torch.tensor(math.log(l), dtype=torch.float64))
        what = f"{name}: lengthscale semantics k_l(x, y) = k_1(x / l, y / l) failed at l = {l}"
        _close(scaled(x, y), unit(x / l, y / l), what, rtol=rtol, atol=atol)
        _close(scaled(x, y, diag=True), unit(x / l, y / l, diag=True), f"{what} (diag=True)", rtol=rtol, atol=atol)


def _kernel_keops(kernel: RadialKernel, *, dtype: torch.dtype) -> None:
    """``profile`` builds a formula on a KeOps ``LazyTensor`` (symbolic only: nothing is compiled).

    The KeOps backend evaluates ``profile`` on LazyTensors: a ``torch.exp(s)`` or ``s.clamp(...)``
    there fails only when that backend is chosen, on large sets. Skipped when pykeops does not import.
    """
    name = type(kernel).__name__
    try:
        from pykeops.torch import LazyTensor
    except Exception as err:  # noqa: BLE001 - pykeops is optional; any failure to import means "not here"
        raise CheckSkipped(f"pykeops does not import ({type(err).__name__}: {first_line(err)})") from None
    x, y = _data((5, 3), (4, 3))
    s = ((LazyTensor(x[:, None, :]) - LazyTensor(y[None, :, :])) ** 2).sum(-1) * 0.7
    try:
        out = copy.deepcopy(kernel).double().fixed_at(torch.zeros((), dtype=torch.float64)).profile(s)
    except Exception as err:  # noqa: BLE001 - report whatever the plug-in's formula raises
        raise AssertionError(
            f"{name}: KeOps LazyTensor smoke test failed: profile(s) raised {type(err).__name__}: {first_line(err)}; "
            f"write it with method-style operations (s.exp(), s.log(), s.sqrt(), arithmetic) that LazyTensors support."
        ) from None
    _require(
        isinstance(out, LazyTensor),
        f"{name}: KeOps LazyTensor smoke test failed: profile(s) of a LazyTensor returned a {type(out).__name__}.",
    )


def _kernel_gradients(kernel: Kernel, *, dtype: torch.dtype) -> None:
    """``torch.autograd.gradcheck`` of ``K(x, y)`` in float64 (listed when the kit runs in float64), hyperparameters fixed first (the median
    heuristic is not differentiated)."""
    name = type(kernel).__name__
    x, y = _data((2, 4, 4), (2, 3, 4))
    fixed = copy.deepcopy(kernel).double().adapt(x, y)
    _gradcheck(lambda a, b: fixed(a, b), (x, y), f"{name}: gradcheck of K(x, y) failed")


def _kernel_checks(kernel: Kernel, *, dtype: torch.dtype = torch.float64) -> list[NamedCheck]:
    named = [
        ("shapes_and_symmetry", _kernel_shapes),
        ("same_path", _kernel_same_path),
        ("definiteness", _kernel_definite),
        ("batching", _kernel_batching),
        ("diag", _kernel_diag),
        ("float32", _kernel_dtypes),
    ]
    if isinstance(kernel, RadialKernel):
        named += [("profile_fast_paths", _kernel_profile), ("lengthscale", _kernel_lengthscale), ("keops_profile", _kernel_keops)]
    if dtype == torch.float64:
        named.append(("gradients", _kernel_gradients))
    return [(label, partial(check, dtype=dtype)) for label, check in named]


def check_kernel(kernel: Kernel, *, dtype: torch.dtype = torch.float64) -> None:
    """Check a :class:`~perturbdiff_core.mmd.kernels.Kernel` against the kernel contract.

    Shapes ``(..., N, G), (..., M, G) -> (..., N, M)``; symmetry ``K(x, y) = K(y, x)^T``;
    ``K(x, x)`` (the ``same=True`` path) equal to ``K(x, x.clone())`` and ``MMD^2(x, x.clone()) = 0``;
    positive semi-definiteness (or, for ``conditionally_positive_definite`` kernels such as
    ``-||x - y||``, ``c^T K c >= 0`` whenever ``sum(c) = 0``, i.e. ``H K H`` PSD with the centring
    matrix ``H``) on 12 points and on 200-point sets at scales 0.1 to 10; batch broadcasting equal to a
    loop over sets; ``diag=True`` equal to the diagonal; float32 agreeing with float64; and, in float64,
    ``torch.autograd.gradcheck``. Radial kernels also have their in-place ``profile_`` and
    ``profile_grad`` checked against ``profile`` and its autograd derivative, the lengthscale semantics
    ``k_l(x, y) = k_1(x / l, y / l)``, and ``profile`` on a KeOps ``LazyTensor`` (where pykeops imports).

    Args:
        kernel: the kernel to check (not modified; copies are cast to each dtype).
        dtype: dtype of the main checks; gradcheck runs only when it is float64.
    """
    _run(kernel, _kernel_checks(kernel, dtype=dtype))


# -------------------------------------------------------------------------------------- estimators


def _estimator_setup(estimator: MMDEstimator | str, kernel: Kernel | str, kernel_params: dict[str, Any]) -> tuple[MMDEstimator, Kernel, str]:
    est = copy.deepcopy(as_estimator(estimator))
    k = as_kernel(kernel if isinstance(kernel, str) else copy.deepcopy(kernel), **kernel_params).double()
    return est, k, f"{est!r} with {type(k).__name__}"


def _estimator_values(estimator: MMDEstimator, *, kernel: Kernel | str, kernel_params: dict[str, Any]) -> None:
    """Shape and finiteness, symmetry, ``MMD(x, x)`` (0, or <= 0 for U-statistics), non-negative biased estimates."""
    est, k, name = _estimator_setup(estimator, kernel, kernel_params)
    x, y = _data((3, 8, 4), (3, 6, 4))
    wx, wy = _weights((3, 8), (3, 6))
    value = est(x, y, k, x_weights=wx, y_weights=wy)
    _require(tuple(value.shape) == (3,), f"{name}: shape contract failed: batch (3, ...) gave shape {tuple(value.shape)}, expected (3,).")
    _require(bool(torch.isfinite(value).all()), f"{name}: finiteness failed: got {value.tolist()}.")
    _close(est(y, x, k, x_weights=wy, y_weights=wx), value, f"{name}: symmetry MMD(x, y) = MMD(y, x) failed", rtol=1e-6, atol=1e-9)
    same = est(x, x, k, x_weights=wx, y_weights=wx)
    if est.unbiased:
        _require(bool((same <= 1e-9).all()), f"{name}: MMD(x, x) <= 0 for an unbiased estimator failed: got {same.tolist()}.")
    else:
        _close(same, torch.zeros_like(same), f"{name}: MMD(x, x) = 0 failed", rtol=0.0, atol=1e-9)
        _require(bool((value >= -1e-9).all()), f"{name}: non-negativity of a biased estimate failed: got {value.tolist()}.")


def _estimator_batching(estimator: MMDEstimator, *, kernel: Kernel | str, kernel_params: dict[str, Any]) -> None:
    """A batch of set pairs equals a loop, also with a batch of one broadcast."""
    est, k, name = _estimator_setup(estimator, kernel, kernel_params)
    x, y = _data((3, 8, 4), (3, 6, 4))
    wx, wy = _weights((3, 8), (3, 6))

    def mmd(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
        return est(a, b, k, x_weights=wa, y_weights=wb)

    loop = torch.stack([mmd(x[b], y[b], wx[b], wy[b]) for b in range(3)])
    _close(mmd(x, y, wx, wy), loop, f"{name}: batch = loop failed", rtol=1e-6, atol=1e-9)
    loop = torch.stack([mmd(x[b], y[0], wx[b], wy[0]) for b in range(3)])
    _close(mmd(x, y[:1], wx, wy[:1]), loop, f"{name}: batch broadcasting (y batch 1) failed", rtol=1e-6, atol=1e-9)


def _estimator_weights(estimator: MMDEstimator, *, kernel: Kernel | str, kernel_params: dict[str, Any]) -> None:
    """Uniform weights = no weights; integer weights = repeated cells (biased estimators, kernel fixed)."""
    est, k, name = _estimator_setup(estimator, kernel, kernel_params)
    x, y = _data((3, 8, 4), (3, 6, 4))
    wx, wy = _weights((3, 8), (3, 6))
    _close(
        est(x, y, k, x_weights=torch.full_like(wx, 2.5), y_weights=torch.full_like(wy, 0.5)),
        est(x, y, k),
        f"{name}: uniform weights = no weights failed",
        rtol=1e-6,
        atol=1e-9,
    )
    if not est.unbiased:  # with the kernel fixed: repeating cells moves a median heuristic
        counts = torch.tensor([1, 3, 2, 1, 2, 1, 1, 3])
        fixed = k.adapt(x[0], y[0])
        _close(
            est(x[0], y[0], fixed, x_weights=counts.double()),
            est(x[0].repeat_interleave(counts, dim=0), y[0], fixed),
            f"{name}: integer weights = repeated cells failed",
            rtol=1e-6,
            atol=1e-9,
        )


def _estimator_cell_order(estimator: MMDEstimator, *, kernel: Kernel | str, kernel_params: dict[str, Any]) -> None:
    """Invariance to the order of cells (listed for estimators that claim ``permutation_invariant``)."""
    est, k, name = _estimator_setup(estimator, kernel, kernel_params)
    x, y = _data((3, 8, 4), (3, 6, 4))
    wx, wy = _weights((3, 8), (3, 6))
    px, py = torch.randperm(8, generator=torch.Generator().manual_seed(4)), torch.randperm(6, generator=torch.Generator().manual_seed(5))
    _close(
        est(x[:, px], y[:, py], k, x_weights=wx[:, px], y_weights=wy[:, py]),
        est(x, y, k, x_weights=wx, y_weights=wy),
        f"{name}: permutation invariance of cells failed",
        rtol=1e-6,
        atol=1e-9,
    )


def _estimator_gradients(estimator: MMDEstimator, *, kernel: Kernel | str, kernel_params: dict[str, Any]) -> None:
    """Finite gradients wrt cells and weights, and ``torch.autograd.gradcheck`` in float64."""
    est, k, name = _estimator_setup(estimator, kernel, kernel_params)
    x, y = _data((3, 8, 4), (3, 6, 4))
    wx, wy = _weights((3, 8), (3, 6))
    leaves = [t.clone().requires_grad_(True) for t in (x, y, wx, wy)]
    est(leaves[0], leaves[1], k, x_weights=leaves[2], y_weights=leaves[3]).sum().backward()
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


def _estimator_checks(estimator: MMDEstimator | str, kernel: Kernel | str = "rbf", **kernel_params: Any) -> list[NamedCheck]:
    named = [("values", _estimator_values), ("batching", _estimator_batching), ("weights", _estimator_weights)]
    if as_estimator(estimator).permutation_invariant:  # a linear-time estimator pairs cells by position
        named.append(("cell_order", _estimator_cell_order))
    named.append(("gradients", _estimator_gradients))
    return [(label, partial(check, kernel=kernel, kernel_params=kernel_params)) for label, check in named]


def check_estimator(estimator: MMDEstimator | str, kernel: Kernel | str = "rbf", **kernel_params: Any) -> None:
    """Check an :class:`~perturbdiff_core.mmd.estimators.MMDEstimator` against the estimator contract.

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
    _run(as_estimator(estimator), _estimator_checks(estimator, kernel, **kernel_params))


# -------------------------------------------------------------------------------------- reductions


def _dense_sum(kernel: Kernel, a: Tensor, b: Tensor, wa: Tensor, wb: Tensor, *, same: bool, exclude_diagonal: bool) -> Tensor:
    """Reference ``wa^T K(a, b) wb`` from the whole kernel matrix and plain autograd."""
    k = kernel.forward(a, b, same=same)
    if exclude_diagonal:
        k = k * (1.0 - torch.eye(k.shape[-1], dtype=k.dtype))
    return (wa.unsqueeze(-2) @ k @ wb.unsqueeze(-1))[..., 0, 0]


def _reduction_setup(
    reduction: KernelReduction, kernel: Kernel | str, dtype: torch.dtype, device: str
) -> tuple[Kernel, str, Tensor, Tensor, Tensor, Tensor]:
    k = (as_kernel(kernel) if isinstance(kernel, str) else copy.deepcopy(kernel)).to(dtype=dtype, device=device)
    x, y = (t.to(device) for t in _data((2, 7, 3), (2, 5, 3), dtype=dtype))
    k = k.adapt(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
    name = f"{type(reduction).__name__} with {type(k).__name__}"
    _require(reduction.supports(k, torch.device(device).type), f"{name}: supports(kernel, {device!r}) is False; nothing to check.")
    wx, wy = (t.to(device=device, dtype=dtype) for t in _weights((2, 7), (2, 5)))
    return k, name, x, y, wx, wy


def _reduction_dense(reduction: KernelReduction, *, kernel: Kernel | str, dtype: torch.dtype, device: str) -> None:
    """``weighted_sum`` (cross sums, ``same=True`` with and without ``exclude_diagonal``) and ``mmd_terms``:
    values and gradients equal to the whole kernel matrix under plain autograd, with and without broadcasting."""
    k, name, x, y, wx, wy = _reduction_setup(reduction, kernel, dtype, device)
    rtol, atol = _tolerances(dtype)

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


def _reduction_gradcheck(reduction: KernelReduction, *, kernel: Kernel | str, dtype: torch.dtype, device: str) -> None:
    """The reduction's own backward pass against finite differences (listed when the kit runs in float64)."""
    k, name, x, y, wx, wy = _reduction_setup(reduction, kernel, dtype, device)

    def terms_sum(a: Tensor, b: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
        kxx, kyy, kxy = reduction.mmd_terms(k, a, b, wa, wb, exclude_diagonal=True)
        return kxx + 0.7 * kyy - 2.0 * kxy

    _gradcheck(terms_sum, (x[:, :5], y[:, :4], wx[:, :5], wy[:, :4]), f"{name}: gradcheck of mmd_terms failed")


def _reduction_checks(
    reduction: KernelReduction, kernel: Kernel | str = "rbf", *, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> list[NamedCheck]:
    options = {"kernel": kernel, "dtype": dtype, "device": device}
    named = [("dense_agreement", _reduction_dense)] + ([("gradcheck", _reduction_gradcheck)] if dtype == torch.float64 else [])
    return [(label, partial(check, **options)) for label, check in named]


def check_reduction(reduction: KernelReduction, kernel: Kernel | str, *, dtype: torch.dtype = torch.float64, device: str = "cpu") -> None:
    """Check a :class:`~perturbdiff_core.mmd.reductions.KernelReduction` against a dense reference.

    ``weighted_sum`` (cross sums, ``same=True`` with and without ``exclude_diagonal``) and
    ``mmd_terms``: values and gradients wrt cells and weights must equal the whole kernel matrix
    under plain autograd, with and without batch broadcasting; in float64 the reduction's
    backward also passes ``torch.autograd.gradcheck``. Call it for kernels the reduction
    ``supports`` on ``device``. A ``"median"`` kernel is first fixed on the check's cells, as
    estimators fix it before they call a reduction.
    """
    _run(reduction, _reduction_checks(reduction, kernel, dtype=dtype, device=device))


# -------------------------------------------------------------------------------------- embeddings


def _embedding_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y = _data((3, 8, 4), (3, 6, 4), seed=10)
    wx, wy = _weights((3, 8), (3, 6), seed=11)
    return x, y, wx / wx.sum(-1, keepdim=True), wy / wy.sum(-1, keepdim=True)


def _fitted_embedding(embedding: EmbeddingMap) -> EmbeddingMap:
    x, y, _, _ = _embedding_data()
    fresh = copy.deepcopy(embedding)
    fitted = fresh.fit(torch.cat([x, y], dim=-2))
    _require(fitted is fresh, f"{type(embedding).__name__}: fit(cells) must return the map itself, got {type(fitted).__name__}.")
    return fitted


def _embedding_features(embedding: EmbeddingMap, *, atol: float) -> None:
    """Explicit maps (only): features ``(..., N, D)``, finite, batch = loop; weighted and uniform mean embeddings."""
    name = type(embedding).__name__
    fitted = _fitted_embedding(embedding)
    x, _, wx, _ = _embedding_data()
    phi = fitted.features(x)
    _require(phi.dim() == 3 and tuple(phi.shape[:2]) == (3, 8), f"{name}: features of (3, 8, 4) cells have shape {tuple(phi.shape)}, expected (3, 8, D).")
    _require(bool(torch.isfinite(phi).all()), f"{name}: features are not finite.")
    _close(torch.stack([fitted.features(x[b]) for b in range(3)]), phi, f"{name}: features batch = loop failed", rtol=1e-6, atol=1e-9)
    _close(fitted.mean_embedding(x), phi.mean(-2), f"{name}: uniform mean embedding differs from the mean feature", rtol=1e-6, atol=1e-9)
    _close(fitted.mean_embedding(x, wx), (wx.unsqueeze(-1) * phi).sum(-2), f"{name}: weighted mean embedding failed", rtol=1e-6, atol=1e-9)


def _embedding_inner(embedding: EmbeddingMap, *, atol: float) -> None:
    """``inner(x, y, wx, wy)`` approximates ``wx^T K(x, y) wy`` under the map's (fitted) kernel within ``atol``
    times the largest ``|K|``, is symmetric, and for explicit maps is the product of the mean embeddings."""
    name = type(embedding).__name__
    fitted = _fitted_embedding(embedding)
    x, y, wx, wy = _embedding_data()
    got = fitted.inner(x, y, wx, wy)
    _require(tuple(got.shape) == (3,), f"{name}: inner of 3 set pairs has shape {tuple(got.shape)}, expected (3,).")
    gram = fitted.kernel(x, y)
    exact = (wx.unsqueeze(-2) @ gram @ wy.unsqueeze(-1))[..., 0, 0]
    tolerance = atol * max(1.0, gram.abs().max().item())
    _close(got, exact, f"{name}: inner(x, y) differs from wx^T K(x, y) wy by more than atol = {atol}", rtol=0.0, atol=tolerance)
    _close(fitted.inner(y, x, wy, wx), got, f"{name}: symmetry inner(x, y) = inner(y, x) failed", rtol=1e-6, atol=1e-9)
    if fitted.explicit:
        product = (fitted.mean_embedding(x, wx) * fitted.mean_embedding(y, wy)).sum(-1)
        _close(got, product, f"{name}: inner differs from the product of the mean embeddings", rtol=1e-6, atol=1e-9)


def _embedding_state(embedding: EmbeddingMap, *, atol: float) -> None:
    """A fresh map loaded with a fitted map's ``state_dict`` gives the same inner products."""
    name = type(embedding).__name__
    fitted = _fitted_embedding(embedding)
    fresh = copy.deepcopy(embedding)
    fresh.load_state_dict(fitted.state_dict())
    x, y, wx, wy = _embedding_data()
    _close(fresh.inner(x, y, wx, wy), fitted.inner(x, y, wx, wy), f"{name}: state_dict round trip failed", rtol=1e-10, atol=1e-12)


def _embedding_checks(embedding: EmbeddingMap, *, atol: float = 0.1) -> list[NamedCheck]:
    named = [("features", _embedding_features)] if embedding.explicit else []  # an implicit map has no features
    named += [("inner_products", _embedding_inner), ("state_dict", _embedding_state)]
    return [(label, partial(check, atol=atol)) for label, check in named]


def check_embedding(embedding: EmbeddingMap, *, atol: float = 0.1) -> None:
    """Check an :class:`~perturbdiff_core.mmd.embeddings.EmbeddingMap` against the embedding contract.

    Fitted on the pooled cells of a few sets (float64): ``fit`` returns the map; for explicit maps,
    features ``(..., N, D)`` that are finite and batch = loop, and (weighted) mean embeddings that are
    (weighted) mean features; ``inner(x, y, wx, wy)`` equal to ``wx^T K(x, y) wy`` under the map's
    kernel within ``atol`` times the largest ``|K|`` (random features approximate it), symmetric, and
    for explicit maps the product of the mean embeddings; a fresh map loaded with the fitted map's
    ``state_dict`` gives the same inner products.
    """
    _run(embedding, _embedding_checks(embedding, atol=atol))


# --------------------------------------------------------------------------------------- schedules


def _alpha_bars(schedule: NoiseSchedule) -> Tensor:
    """The schedule's table; its own ConfigError (bad betas, alpha_bar(T) too large) as an AssertionError."""
    try:
        return copy.deepcopy(schedule).alpha_bars
    except PerturbDiffError as err:
        raise AssertionError(f"{type(schedule).__name__}: betas() contract failed: {err}") from None


def _schedule_betas(schedule: NoiseSchedule) -> None:
    """``betas()`` is float64 ``(T,)`` in ``(0, 1)``; ``alpha_bar(0) = 1``."""
    name = type(schedule).__name__
    betas = copy.deepcopy(schedule).betas()
    t = schedule.num_steps
    _require(
        isinstance(betas, Tensor) and betas.dtype == torch.float64 and tuple(betas.shape) == (t,),
        f"{name}: betas() must return a float64 tensor of shape ({t},), got {getattr(betas, 'dtype', type(betas).__name__)} "
        f"{tuple(getattr(betas, 'shape', ()))}.",
    )
    _require(
        bool(((betas > 0) & (betas < 1)).all()),
        f"{name}: every beta must lie in (0, 1); got values in [{betas.min().item():.3g}, {betas.max().item():.3g}].",
    )
    table = _alpha_bars(schedule)
    _require(table[0].item() == 1.0, f"{name}: alpha_bar(0) = 1 failed: got {table[0].item()!r}.")


def _schedule_monotone(schedule: NoiseSchedule) -> None:
    """``alpha_bar`` strictly decreases from ``t = 0`` to ``T``."""
    table = _alpha_bars(schedule)
    steps = torch.nonzero(table[1:] >= table[:-1]).flatten()
    _require(
        not len(steps),
        f"{type(schedule).__name__}: alpha_bar must decrease at every step; it does not from t = {steps[:5].tolist()} to t + 1.",
    )


def _schedule_final(schedule: NoiseSchedule) -> None:
    """``alpha_bar(T)`` is small: step ``T`` is (almost) pure noise, where sampling starts."""
    from .diffusion.schedules import MAX_FINAL_ALPHA_BAR

    final = _alpha_bars(schedule)[-1].item()
    _require(final <= MAX_FINAL_ALPHA_BAR, f"{type(schedule).__name__}: alpha_bar(T) = {final:.3g} > {MAX_FINAL_ALPHA_BAR:g}.")


def _schedule_config(schedule: NoiseSchedule) -> None:
    """``config()`` is YAML-serialisable, includes ``num_steps``, and rebuilds the same schedule
    (``type(schedule)(**config())``, which is what ``load(group, name, **config)`` does)."""
    name = type(schedule).__name__
    config = schedule.config()
    _yaml_round_trip(config, f"{name}.config()")
    _require(
        config.get("num_steps") == schedule.num_steps,
        f"{name}: config() must include num_steps = {schedule.num_steps}, got {config!r}.",
    )
    rebuilt = type(schedule)(**config)
    _require(rebuilt.config() == config, f"{name}: config round trip failed: {config!r} rebuilds a schedule with config {rebuilt.config()!r}.")
    _require(torch.equal(rebuilt.betas(), schedule.betas()), f"{name}: config round trip failed: the rebuilt schedule has other betas.")


def _schedule_checks(schedule: NoiseSchedule) -> list[NamedCheck]:
    return [
        ("betas_and_alpha_bar_0", _schedule_betas),
        ("monotone", _schedule_monotone),
        ("final_value", _schedule_final),
        ("config_round_trip", _schedule_config),
    ]


def check_schedule(schedule: NoiseSchedule) -> None:
    """Check a :class:`~perturbdiff_core.diffusion.schedules.NoiseSchedule` against the schedule contract.

    ``betas()`` float64 of shape ``(T,)`` in ``(0, 1)``; ``alpha_bar(0) = 1``; ``alpha_bar`` strictly
    decreasing; ``alpha_bar(T) <=`` :data:`~perturbdiff_core.diffusion.schedules.MAX_FINAL_ALPHA_BAR`;
    ``config()`` YAML-serialisable, with ``num_steps``, rebuilding a schedule with the same betas.
    """
    _run(schedule, _schedule_checks(schedule))


# --------------------------------------------------------------------------------------- denoisers

#: The data dimensions a denoiser's constructor must accept by these names; training injects them.
DENOISER_DIMENSIONS = ("num_genes", "perturbation_dim", "num_cell_types", "num_batches")


def _random_denoiser(denoiser: Denoiser) -> Denoiser:
    """A float64 copy in evaluation mode with random non-zero weights everywhere (zero-initialised
    output layers would hide any asymmetry)."""
    net = copy.deepcopy(denoiser)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.3)
    return net.double().eval()


def _denoiser_inputs(denoiser: Denoiser, b: int = 3, s: int = 5, sc: int = 7, seed: int = 1) -> tuple[Tensor, Tensor, Any, Tensor]:
    from .data.batch import Conditioning

    gen = torch.Generator().manual_seed(seed)
    g = denoiser.num_genes
    x = torch.randn(b, s, g, generator=gen, dtype=torch.float64)
    self_cond = torch.randn(b, s, g, generator=gen, dtype=torch.float64)
    cond = Conditioning(
        control=torch.randn(b, sc, g, generator=gen, dtype=torch.float64),
        perturbation=torch.randn(b, denoiser.perturbation_dim, generator=gen, dtype=torch.float64),
        cell_type=torch.arange(b) % denoiser.num_cell_types,
        batch=torch.arange(b) % denoiser.num_batches,
        template=torch.randn(b, s, g, generator=gen, dtype=torch.float64) if denoiser.templates else None,
    )
    t = torch.randint(1, 1001, (b,), generator=gen)
    return x, t, cond, self_cond


def _denoiser_tolerance(out: Tensor) -> dict[str, float]:
    return {"rtol": 1e-7, "atol": 1e-9 * max(1.0, out.abs().max().item())}


def _denoiser_signature(denoiser: Denoiser) -> None:
    """The constructor takes the injected data dimensions by name, and ``config()`` returns them."""
    name = type(denoiser).__name__
    parameters = inspect.signature(type(denoiser)).parameters
    missing = [d for d in DENOISER_DIMENSIONS if d not in parameters]
    _require(
        not missing,
        f"{name}: the constructor must take the data dimensions {', '.join(DENOISER_DIMENSIONS)} by name (training "
        f"passes them, sized for the data); it lacks {', '.join(missing)}.",
    )
    config = denoiser.config()
    wrong = {d: config.get(d) for d in DENOISER_DIMENSIONS if config.get(d) != getattr(denoiser, d, None)}
    _require(not wrong, f"{name}: config() must return the data dimensions (data_config() does); it gives {wrong}.")


def _denoiser_shapes(denoiser: Denoiser) -> None:
    """``(B, S, G)`` out for ``(B, S, G)`` in, with and without a self-conditioning estimate and with a
    control set of another size; finite; the input's dtype."""
    name = type(denoiser).__name__
    net = _random_denoiser(denoiser)
    for sc in (7, 3):
        x, t, cond, self_cond = _denoiser_inputs(net, sc=sc)
        for estimate in (self_cond, None):
            out = net(x, t, cond, estimate)
            _require(tuple(out.shape) == tuple(x.shape), f"{name}: output shape {tuple(out.shape)} for x_t {tuple(x.shape)} (control sets of {sc} cells).")
            _require(out.dtype == x.dtype, f"{name}: output dtype {out.dtype} for x_t of {x.dtype}.")
            _require(bool(torch.isfinite(out).all()), f"{name}: output has NaN or Inf.")


def _denoiser_cell_order(denoiser: Denoiser) -> None:
    """Equivariance over cells: permuting the cells of ``x_t`` (and ``self_cond``, and the templates of a
    denoiser that reads them) permutes the output."""
    from dataclasses import replace

    net = _random_denoiser(denoiser)
    x, t, cond, self_cond = _denoiser_inputs(net)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(2))
    out = net(x, t, cond, self_cond)
    permuted = cond if cond.template is None else replace(cond, template=cond.template[:, perm])
    _close(
        net(x[:, perm], t, permuted, self_cond[:, perm]), out[:, perm], f"{type(denoiser).__name__}: equivariance over cells failed",
        **_denoiser_tolerance(out),
    )


def _denoiser_control_order(denoiser: Denoiser) -> None:
    """Invariance to the order of the control cells."""
    from dataclasses import replace

    net = _random_denoiser(denoiser)
    x, t, cond, self_cond = _denoiser_inputs(net)
    perm = torch.randperm(cond.control.shape[1], generator=torch.Generator().manual_seed(3))
    out = net(x, t, cond, self_cond)
    shuffled = replace(cond, control=cond.control[:, perm])
    _close(net(x, t, shuffled, self_cond), out, f"{type(denoiser).__name__}: invariance to the order of control cells failed", **_denoiser_tolerance(out))


def _denoiser_sets_independent(denoiser: Denoiser) -> None:
    """The sets of a batch are independent: each set's output equals its output alone, and changing
    every input of one set leaves the others' outputs unchanged."""
    from dataclasses import replace

    name = type(denoiser).__name__
    net = _random_denoiser(denoiser)
    x, t, cond, self_cond = _denoiser_inputs(net)
    out = net(x, t, cond, self_cond)
    tol = _denoiser_tolerance(out)
    for b in range(x.shape[0]):
        alone = net(x[b : b + 1], t[b : b + 1], cond.map_tensors(lambda v, b=b: v[b : b + 1]), self_cond[b : b + 1])
        _close(alone[0], out[b], f"{name}: sets independent failed: set {b} alone differs from set {b} in a batch", **tol)
    x2, self_cond2, t2 = x.clone(), self_cond.clone(), t.clone()
    x2[1] += 3.0
    self_cond2[1] -= 1.0
    t2[1] = t2[1] // 2 + 1
    cond2 = cond.map_tensors(torch.clone)
    cond2.control[1] *= 2.0
    cond2.perturbation[1] += 1.0
    cond2 = replace(cond2, cell_type=cond2.cell_type.clone(), batch=cond2.batch.clone())
    cond2.cell_type[1] = (cond2.cell_type[1] + 1) % net.num_cell_types
    cond2.batch[1] = (cond2.batch[1] + 1) % net.num_batches
    out2 = net(x2, t2, cond2, self_cond2)
    keep = [0, 2]
    _close(out2[keep], out[keep], f"{name}: sets independent failed: changing set 1 changed the output of sets 0 and 2", **tol)


def _denoiser_config(denoiser: Denoiser) -> None:
    """``config()`` is YAML-serialisable and rebuilds the network: ``type(d)(**config())`` loaded with
    the state dict gives the same config and the same outputs."""
    name = type(denoiser).__name__
    net = _random_denoiser(denoiser)
    config = net.config()
    _yaml_round_trip(config, f"{name}.config()")
    rebuilt = type(denoiser)(**config).double().eval()
    _require(rebuilt.config() == config, f"{name}: config round trip failed: {config!r} rebuilds a network with config {rebuilt.config()!r}.")
    try:
        rebuilt.load_state_dict(net.state_dict())
    except RuntimeError as err:
        raise AssertionError(f"{name}: config round trip failed: the rebuilt network does not take the weights ({first_line(err)}).") from None
    x, t, cond, self_cond = _denoiser_inputs(net)
    _close(rebuilt(x, t, cond, self_cond), net(x, t, cond, self_cond), f"{name}: config round trip failed: the rebuilt network differs", rtol=0.0, atol=0.0)


def _denoiser_checks(denoiser: Denoiser) -> list[NamedCheck]:
    return [
        ("injected_dimensions", _denoiser_signature),
        ("shapes", _denoiser_shapes),
        ("cell_equivariance", _denoiser_cell_order),
        ("control_order_invariance", _denoiser_control_order),
        ("sets_independent", _denoiser_sets_independent),
        ("config_round_trip", _denoiser_config),
    ]


def check_denoiser(denoiser: Denoiser) -> None:
    """Check a :class:`~perturbdiff_core.diffusion.denoisers.Denoiser` against the denoiser contract.

    On a float64 copy in evaluation mode with random non-zero weights: the constructor takes
    ``num_genes``, ``perturbation_dim``, ``num_cell_types`` and ``num_batches`` by name and
    ``config()`` returns them; ``(B, S, G)`` out for ``(B, S, G)`` in, with and without
    ``self_cond``, with control sets of any size, finite; equivariance over the cells of ``x_t``;
    invariance to the order of the control cells; the sets of a batch independent; ``config()``
    YAML-serialisable and rebuilding the same network. Build it small: the kit runs it a few dozen times.
    """
    _run(denoiser, _denoiser_checks(denoiser))


# ---------------------------------------------------------------------------------------- encoders

#: Training perturbations of the encoder kit: three singles, a combination and the control label.
ENCODER_PERTURBATIONS = ("A", "B", "C", "A+B", "control")


def _fitted_encoder(encoder: PerturbationEncoder, perturbations: Sequence[str], *, use_dose: bool = False) -> PerturbationEncoder:
    fresh = copy.deepcopy(encoder)
    fitted = fresh.fit(list(perturbations), control_label="control", separator="+", use_dose=use_dose)
    _require(fitted is fresh, f"{type(encoder).__name__}: fit(...) must return the encoder itself, got {type(fitted).__name__}.")
    return fitted


def _encoder_encode(encoder: PerturbationEncoder, *, perturbations: Sequence[str]) -> None:
    """``encode`` gives ``(n, dim)`` finite float32 rows; control is all zeros; a combination is the sum of its
    parts; a row does not depend on the other names encoded with it."""
    name = type(encoder).__name__
    enc = _fitted_encoder(encoder, perturbations)
    _require(enc.fitted and enc.dim == enc.part_dim, f"{name}: after fit, fitted is {enc.fitted} and dim {enc.dim} (part_dim {enc.part_dim}).")
    names = list(perturbations)
    out = enc.encode(names)
    _require(
        isinstance(out, Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (len(names), enc.dim),
        f"{name}: encode({names}) must be a float32 tensor ({len(names)}, {enc.dim}), got {getattr(out, 'dtype', type(out).__name__)} "
        f"{tuple(getattr(out, 'shape', ()))}.",
    )
    _require(bool(torch.isfinite(out).all()), f"{name}: encodings have NaN or Inf.")
    rows = dict(zip(names, out))
    if "control" in rows:
        _require(not rows["control"].any(), f"{name}: the control label must encode as all zeros, got {rows['control'].tolist()}.")
    for combination in (n for n in names if "+" in n):
        parts = enc.encode(combination.split("+"))
        _close(rows[combination], parts.sum(0), f"{name}: {combination} must encode as the sum of its parts", rtol=1e-6, atol=1e-6)
    for i, single in enumerate(names):
        _close(enc.encode([single])[0], out[i], f"{name}: the encoding of {single!r} depends on the names encoded with it", rtol=0.0, atol=0.0)


def _encoder_unseen(encoder: PerturbationEncoder, *, perturbations: Sequence[str]) -> None:
    """A perturbation the encoder cannot encode raises DataError naming it, never a silent zero vector."""
    from .errors import DataError

    name = type(encoder).__name__
    enc = _fitted_encoder(encoder, perturbations)
    unseen = "never_seen_perturbation"
    try:
        out = enc.encode([unseen])
    except DataError as err:
        _require(unseen in str(err), f"{name}: the DataError for an unknown perturbation must name it; got: {err}")
        return
    _require(bool(out.any()), f"{name}: {unseen!r} was encoded as zeros, the control's encoding; raise DataError naming it instead.")


def _encoder_dose(encoder: PerturbationEncoder, *, perturbations: Sequence[str]) -> None:
    """Fitted with ``use_dose``: one more column, ``log1p(dose)`` for perturbed rows and 0 for control."""
    name = type(encoder).__name__
    enc = _fitted_encoder(encoder, perturbations, use_dose=True)
    _require(enc.dim == enc.part_dim + 1, f"{name}: with use_dose, dim must be part_dim + 1; got {enc.dim} and {enc.part_dim}.")
    names = list(perturbations)
    doses = [float(i % 3) + 0.5 for i in range(len(names))]
    out = enc.encode(names, doses)
    expected = torch.tensor([0.0 if n == "control" else math.log1p(d) for n, d in zip(names, doses)], dtype=torch.float32)
    _close(out[:, -1], expected, f"{name}: the dose column must be log1p(dose) (0 for control)", rtol=1e-6, atol=1e-6)


def _encoder_state(encoder: PerturbationEncoder, *, perturbations: Sequence[str]) -> None:
    """``state_dict()`` is JSON-serialisable and restores the fitted encoder in a fresh copy; fitting is
    deterministic (the training names in another order give the same encodings)."""
    name = type(encoder).__name__
    enc = _fitted_encoder(encoder, perturbations)
    state = enc.state_dict()
    try:
        again = json.loads(json.dumps(state))
    except (TypeError, ValueError) as err:
        raise AssertionError(f"{name}: state_dict() is not JSON-serialisable ({err}); checkpoints store it as JSON.") from None
    names = list(perturbations)
    restored = copy.deepcopy(encoder).load_state_dict(again)
    _close(restored.encode(names), enc.encode(names), f"{name}: state_dict round trip failed", rtol=0.0, atol=0.0)
    refitted = _fitted_encoder(encoder, list(reversed(names)))
    _close(refitted.encode(names), enc.encode(names), f"{name}: fitting depends on the order of the training names", rtol=0.0, atol=0.0)


def _encoder_not_fitted(encoder: PerturbationEncoder, *, perturbations: Sequence[str]) -> None:
    """Encoding before ``fit`` raises DataError (listed for an encoder given unfitted)."""
    from .errors import DataError

    name = type(encoder).__name__
    try:
        copy.deepcopy(encoder).encode(list(perturbations)[:1])
    except DataError:
        return
    raise AssertionError(f"{name}: encode before fit must raise DataError (call fit or load_state_dict first).")


def _encoder_checks(encoder: PerturbationEncoder, *, perturbations: Sequence[str] = ENCODER_PERTURBATIONS) -> list[NamedCheck]:
    named = [
        ("encode", _encoder_encode),
        ("unseen_perturbation", _encoder_unseen),
        ("dose_feature", _encoder_dose),
        ("state_round_trip", _encoder_state),
    ]
    if not encoder.fitted:
        named.append(("not_fitted", _encoder_not_fitted))
    return [(label, partial(check, perturbations=tuple(perturbations))) for label, check in named]


def check_encoder(encoder: PerturbationEncoder, *, perturbations: Sequence[str] = ENCODER_PERTURBATIONS) -> None:
    """Check a :class:`~perturbdiff_core.data.encoders.PerturbationEncoder` (unfitted) against the encoder contract.

    Fitted on ``perturbations`` (singles, an ``A+B`` combination and ``control``; give names your
    encoder knows, e.g. those of its lookup table): ``fit`` returns the encoder; ``encode`` gives
    finite float32 ``(n, dim)`` rows, zeros for control, the sum of the parts for a combination, each
    row independent of the others; an unknown perturbation raises DataError naming it (or gets a
    non-zero vector); with ``use_dose`` a last column ``log1p(dose)``; ``state_dict()`` JSON-serialisable
    and restoring the encoder; fitting independent of the order of the names; encoding before ``fit``
    raises DataError.
    """
    _run(encoder, _encoder_checks(encoder, perturbations=perturbations))


# -------------------------------------------------------------------------------------- predictors

#: The predictor kit's held-out condition: perturbation A in cell type t2 (A is trained on in t1).
HELD_OUT = "A|t2"


def _screen() -> tuple[Any, list[str]]:
    """A small synthetic screen (:func:`~perturbdiff_core.data.synthetic.synthetic_screen`: A, B, A+B and
    controls in cell types t1 and t2, 12 genes) with its encoder fitted, and the training conditions
    (every perturbed condition but :data:`HELD_OUT`)."""
    from .data.config import DataConfig
    from .data.dataset import PerturbationData
    from .data.synthetic import synthetic_screen

    adata = synthetic_screen(240, 12, perturbations=("A", "B", "A+B"), cell_types=("t1", "t2"), seed=0)
    data = PerturbationData(adata, DataConfig(cell_type_key="cell_type", min_cells_per_condition=1))
    train = [c.label for c in data.perturbed_conditions if c.label != HELD_OUT]
    return data.fit(train), train


def _fitted_predictor(predictor: Predictor) -> tuple[Any, Any, list[str]]:
    from .evaluation.predictors import Predictor

    data, train = _screen()
    model = copy.deepcopy(predictor)
    fitted = model.fit(data, train)
    _require(isinstance(fitted, Predictor), f"{type(predictor).__name__}: fit(data, train) must return the predictor, got {type(fitted).__name__}.")
    return fitted, data, train


def _predictor_predict(predictor: Predictor) -> None:
    """``predict`` gives ``(n_cells, G)`` finite floating-point cells, for fewer and more cells than the
    context has controls."""
    name = type(predictor).__name__
    model, data, _ = _fitted_predictor(predictor)
    condition = data.condition(HELD_OUT)
    for n in (17, 3 * len(data.control_cells(condition.context))):
        cells = np.asarray(model.predict(data, condition, n, seed=0))
        _require(cells.shape == (n, data.n_genes), f"{name}: predict of {n} cells over {data.n_genes} genes has shape {cells.shape}.")
        _require(np.issubdtype(cells.dtype, np.floating), f"{name}: predicted cells must be floating point, got {cells.dtype}.")
        _require(bool(np.isfinite(cells).all()), f"{name}: predicted cells have NaN or Inf.")


def _predictor_held_out(predictor: Predictor) -> None:
    """Neither ``fit`` nor ``predict`` nor ``shift`` nor ``shift_standard_error`` reads the real cells of the
    held-out condition (every ``data.read`` is watched)."""
    from .evaluation.predictors import Predictor

    name = type(predictor).__name__
    data, train = _screen()
    forbidden = set(data.cells(HELD_OUT).tolist())
    read, leaks, stage = data.read, [], "fit"

    def spy(rows: np.ndarray) -> np.ndarray:
        leaked = forbidden & set(np.asarray(rows).reshape(-1).tolist())
        if leaked:
            leaks.append(f"{len(leaked)} of its cells during {stage}")
        return read(rows)

    data.read = spy
    fitted = copy.deepcopy(predictor).fit(data, train)
    _require(isinstance(fitted, Predictor), f"{name}: fit(data, train) must return the predictor.")
    stage = "predict"
    fitted.predict(data, data.condition(HELD_OUT), 11, seed=0)
    stage = "shift"
    fitted.shift(data, data.condition(HELD_OUT))
    stage = "shift_standard_error"
    fitted.shift_standard_error(data, data.condition(HELD_OUT))
    _require(not leaks, f"{name}: read the real cells of the held-out condition {HELD_OUT}: {'; '.join(leaks)}.")


def _predictor_seed(predictor: Predictor) -> None:
    """The same seed gives the same cells, also from a second fit."""
    name = type(predictor).__name__
    first, data, _ = _fitted_predictor(predictor)
    second, _, _ = _fitted_predictor(predictor)
    condition = data.condition(HELD_OUT)
    a = np.asarray(first.predict(data, condition, 13, seed=3))
    _require(np.array_equal(a, np.asarray(first.predict(data, condition, 13, seed=3))), f"{name}: predict is not deterministic for a given seed.")
    _require(
        np.array_equal(a, np.asarray(second.predict(data, condition, 13, seed=3))),
        f"{name}: two fits on the same data predict differently for the same seed.",
    )


def _predictor_shift(predictor: Predictor) -> None:
    """``shift`` gives a finite ``(G,)`` vector (what ``model.anchor`` adds to each control set's mean), and
    ``shift_standard_error`` ``None`` or a finite non-negative one."""
    name = type(predictor).__name__
    model, data, _ = _fitted_predictor(predictor)
    shift = np.asarray(model.shift(data, data.condition(HELD_OUT)))
    _require(shift.shape == (data.n_genes,), f"{name}: shift has shape {shift.shape}, expected ({data.n_genes},).")
    _require(bool(np.isfinite(shift).all()), f"{name}: shift has NaN or Inf.")
    error = model.shift_standard_error(data, data.condition(HELD_OUT))
    if error is not None:
        error = np.asarray(error)
        _require(
            error.shape == (data.n_genes,),
            f"{name}: shift_standard_error has shape {error.shape}, expected ({data.n_genes},); return None if unknown.",
        )
        _require(bool((np.isfinite(error) & (error >= 0)).all()), f"{name}: shift_standard_error has NaN, Inf or < 0.")


def _predictor_checks(predictor: Predictor) -> list[NamedCheck]:
    return [
        ("predict", _predictor_predict),
        ("never_reads_held_out_cells", _predictor_held_out),
        ("deterministic_per_seed", _predictor_seed),
        ("shift", _predictor_shift),
    ]


def check_predictor(predictor: Predictor) -> None:
    """Check a :class:`~perturbdiff_core.evaluation.predictors.Predictor` (unfitted) against the predictor contract.

    Fitted on a synthetic screen (A, B, A+B and controls in two cell types) with the condition
    :data:`HELD_OUT` left out: ``fit`` returns the predictor; ``predict`` gives finite floating-point
    ``(n_cells, G)`` cells of the held-out condition, also for more cells than its context has
    controls; ``fit``, ``predict``, ``shift`` and ``shift_standard_error`` never read the held-out condition's cells (every
    ``data.read`` is watched); the same seed gives the same cells; ``shift`` is a finite ``(G,)`` vector, and
    ``shift_standard_error`` ``None`` or a finite non-negative one.
    """
    _run(predictor, _predictor_checks(predictor))


# ----------------------------------------------------------------------------- every group at once


def checks(obj: Any, **options: Any) -> list[NamedCheck]:
    """The named checks of ``obj``'s plug-in group, bound to ``options`` (those of its ``check_*`` kit:
    ``dtype`` for a kernel, ``kernel`` for an estimator or a backend, ``atol`` for an embedding,
    ``perturbations`` for an encoder)."""
    from .data.encoders import PerturbationEncoder
    from .diffusion.denoisers import Denoiser
    from .diffusion.schedules import NoiseSchedule
    from .evaluation.predictors import Predictor
    from .mmd.embeddings import EmbeddingMap

    suites: list[tuple[type, Callable[..., list[NamedCheck]]]] = [
        (Kernel, _kernel_checks),
        (MMDEstimator, _estimator_checks),
        (KernelReduction, _reduction_checks),
        (EmbeddingMap, _embedding_checks),
        (NoiseSchedule, _schedule_checks),
        (Denoiser, _denoiser_checks),
        (PerturbationEncoder, _encoder_checks),
        (Predictor, _predictor_checks),
    ]
    for interface, suite in suites:
        if isinstance(obj, interface):
            return suite(obj, **options)
    raise TypeError(
        f"{type(obj).__name__} implements none of the plug-in interfaces "
        f"({', '.join(interface.__name__ for interface, _ in suites)}); there is no kit for it."
    )


def _as_pytest_check(check: Callable[[Any], None], label: str) -> Callable[[Any], None]:
    """``check`` with :class:`CheckSkipped` turned into ``pytest.skip``."""

    def run(obj: Any) -> None:
        try:
            check(obj)
        except CheckSkipped as why:
            import pytest

            pytest.skip(str(why))

    run.__name__ = run.__qualname__ = label
    return run


def parametrize_with_checks(objects: Iterable[Any]) -> Any:
    """A ``pytest.mark.parametrize`` decorator with one item per (object, check), like scikit-learn's:
    every check runs and reports on its own, so the first failure does not hide the rest.

    Each entry of ``objects`` is a plug-in instance, or ``(instance, options)`` with the options of its
    kit (``{"kernel": "energy"}`` for an estimator). The decorated test takes ``obj`` and ``check``::

        @parametrize_with_checks([MyKernel(lengthscale=2.0), (MyEstimator(), {"kernel": "energy"})])
        def test_conformance(obj, check):
            check(obj)

    Test ids read ``<class>-<check>``; only the checks that apply to an object are listed (the radial
    checks for radial kernels, ...). A check whose optional dependency is absent (pykeops for the KeOps
    smoke test) is skipped with the reason.
    """
    import pytest

    params = []
    for entry in objects:
        obj, options = entry if isinstance(entry, tuple) else (entry, {})
        for label, check in checks(obj, **options):
            params.append(pytest.param(obj, _as_pytest_check(check, label), id=f"{type(obj).__name__}-{label}"))
    return pytest.mark.parametrize(("obj", "check"), params)
