"""Kernels against independent float64 NumPy references (scipy cdist) and against GPyTorch."""

from __future__ import annotations

import math
import re

import gpytorch
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist
from torch.autograd import gradcheck
from torch.func import functional_call

from perturbdiff_core import mmd2
from perturbdiff_core.errors import ConfigError, InputError, UnknownPluginError
from perturbdiff_core.mmd.embeddings import as_embedding
from perturbdiff_core.mmd.kernels import RadialKernel, as_kernel
from perturbdiff_core.validation import check_sets

L = 1.7  # lengthscale of the reference cases; distances in the data are ~0.5 to 6

# Independent closed forms of the distance d = ||x - y||, written with NumPy only.
REFERENCES = {
    "rbf": lambda d: np.exp(-(d**2) / (2 * L**2)),
    "laplace": lambda d: np.exp(-d / L),
    "matern32": lambda d: (1 + math.sqrt(3) * d / L) * np.exp(-math.sqrt(3) * d / L),
    "matern52": lambda d: (1 + math.sqrt(5) * d / L + 5 * d**2 / (3 * L**2)) * np.exp(-math.sqrt(5) * d / L),
    "imq": lambda d: 1 / np.sqrt(1 + d**2 / L**2),
    "energy-0.5": lambda d: -(d**0.5),
    "energy-1": lambda d: -d,
    "energy-2": lambda d: -(d**2),
    "mixture": lambda d: np.exp(-(d**2) / (2 * 0.6**2)) + np.exp(-(d**2) / (2 * 2.5**2)),
    "gpytorch-matern": lambda d: (1 + math.sqrt(3) * d / L) * np.exp(-math.sqrt(3) * d / L),
    "gpytorch-rq": lambda d: (1 + d**2 / (2 * 0.7 * L**2)) ** -0.7,
}


def make_kernel(case: str):
    """Each case built through the registry, as a user would."""
    if case in ("rbf", "laplace", "matern32", "matern52", "imq"):
        return as_kernel(case, lengthscale=L)
    if case.startswith("energy"):
        return as_kernel("energy", beta=float(case.split("-")[1]))
    if case == "mixture":
        return as_kernel("mixture", base="rbf", lengthscales=[0.6, 2.5], relative=False)
    if case == "gpytorch-matern":
        return as_kernel("gpytorch", class_name="MaternKernel", nu=1.5, lengthscale=L)
    rq = gpytorch.kernels.RQKernel()
    rq.alpha = 0.7
    return as_kernel("gpytorch", kernel=rq, lengthscale=L)


CASES = list(REFERENCES)
PD_CASES = [c for c in CASES if not c.startswith("energy")]


def data(shape_x, shape_y, seed=0, dtype=torch.float64):
    """Non-trivial cells: anisotropic scales, an offset between the sets."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.4, 1.6, shape_x[-1], dtype=torch.float64)
    x = torch.randn(*shape_x, generator=g, dtype=torch.float64) * scale + 0.3
    y = torch.randn(*shape_y, generator=g, dtype=torch.float64) * scale - 0.2
    return x.to(dtype), y.to(dtype)


def reference_matrix(case: str, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Loop over the broadcast batch, cdist per pair of sets, float64."""
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    xs = np.broadcast_to(x.double().numpy(), (*batch, *x.shape[-2:])).reshape(-1, *x.shape[-2:])
    ys = np.broadcast_to(y.double().numpy(), (*batch, *y.shape[-2:])).reshape(-1, *y.shape[-2:])
    out = np.stack([REFERENCES[case](cdist(a, b)) for a, b in zip(xs, ys)])
    return out.reshape(*batch, x.shape[-2], y.shape[-2])


def rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(got.detach().double().numpy() - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shapes", [((3, 17, 5), (3, 11, 5)), ((1, 17, 5), (4, 11, 5)), ((17, 5), (11, 5))])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_matches_numpy_reference(case, shapes, dtype, tol):
    x, y = data(*shapes, dtype=dtype)
    k = make_kernel(case)(x, y)
    ref = reference_matrix(case, x, y)
    assert k.shape == ref.shape and k.dtype == dtype
    assert rel_err(k, ref) <= tol


@pytest.mark.parametrize("case", CASES)
def test_same_set_matches_reference(case):
    x, _ = data((2, 13, 4), (2, 1, 4))
    assert rel_err(make_kernel(case)(x), reference_matrix(case, x, x)) <= 1e-5


@pytest.mark.parametrize(
    "ours,theirs",
    [
        ("rbf", lambda: gpytorch.kernels.RBFKernel()),
        ("laplace", lambda: gpytorch.kernels.MaternKernel(nu=0.5)),
        ("matern32", lambda: gpytorch.kernels.MaternKernel(nu=1.5)),
        ("matern52", lambda: gpytorch.kernels.MaternKernel(nu=2.5)),
    ],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_matches_gpytorch(ours, theirs, dtype, tol):
    x, y = data((3, 17, 5), (3, 11, 5), seed=1, dtype=dtype)
    reference = theirs().to(dtype)
    reference.lengthscale = L
    with torch.no_grad(), gpytorch.settings.lazily_evaluate_kernels(False):
        expected = reference(x, y).to_dense()
    got = as_kernel(ours, lengthscale=L)(x, y)
    assert rel_err(got, expected.double().numpy()) <= tol


@pytest.mark.parametrize("case", CASES)
def test_diag_is_diagonal_of_full_matrix(case):
    x, y = data((1, 9, 5), (4, 9, 5), seed=2)
    kernel = make_kernel(case)
    full = torch.diagonal(kernel(x, y), dim1=-2, dim2=-1)
    diag = kernel(x, y, diag=True)
    assert diag.shape == (4, 9)
    torch.testing.assert_close(diag, full, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(diag, diag[..., :1].expand_as(diag))  # non-trivial: values vary


@pytest.mark.parametrize("case", PD_CASES)
def test_positive_semidefinite(case):
    x, _ = data((3, 40, 4), (3, 1, 4), seed=3)
    eig = torch.linalg.eigvalsh(make_kernel(case)(x))
    assert (eig.min(-1).values >= -1e-8 * eig.max(-1).values).all()
    assert (eig.max(-1).values > 1.0).all()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_energy_distance_is_conditionally_negative_definite(beta):
    """``D = ||x - y||^beta = -K`` is CND: the centred ``D`` is NSD and ``c^T D c <= 0`` for ``sum(c) = 0``."""
    x, _ = data((3, 40, 4), (3, 1, 4), seed=4)
    kernel = as_kernel("energy", beta=beta)
    distance = -kernel(x)
    center = torch.eye(40, dtype=distance.dtype) - 1.0 / 40
    eig = torch.linalg.eigvalsh(center @ distance @ center)
    assert (eig.max(-1).values <= 1e-8 * eig.abs().max(-1).values).all()
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 40, generator=g, dtype=distance.dtype)
    c = c - c.mean(-1, keepdim=True)
    assert ((c.unsqueeze(-2) @ distance @ c.unsqueeze(-1)).squeeze() < 0).all()
    # Only conditionally: the kernel matrix itself (zero trace) is indefinite.
    assert (torch.linalg.eigvalsh(-distance).min(-1).values < -1e-3).all()
    assert kernel.conditionally_positive_definite and not as_kernel("rbf").conditionally_positive_definite


def test_the_old_name_conditionally_negative_definite_still_works_with_a_warning():
    """Read, set or declared by a third-party subclass, the old name means the new one."""
    energy, rbf = as_kernel("energy"), as_kernel("rbf")
    with pytest.warns(DeprecationWarning, match="renamed conditionally_positive_definite"):
        assert energy.conditionally_negative_definite is True
    with pytest.warns(DeprecationWarning):
        assert (rbf + 2.0 * energy).conditionally_negative_definite is True  # sums and multiples inherit it
    with pytest.warns(DeprecationWarning):
        rbf.conditionally_negative_definite = True
    assert rbf.conditionally_positive_definite is True

    with pytest.warns(DeprecationWarning, match="NegativeDistance: Kernel.conditionally_negative_definite is renamed"):

        class NegativeDistance(RadialKernel):
            conditionally_negative_definite = True

            def profile(self, s):
                return -s.sqrt()

    assert NegativeDistance().conditionally_positive_definite is True
    with pytest.raises(ConfigError, match="only conditionally positive definite"):
        as_embedding("nystrom", kernel=NegativeDistance(lengthscale=1.0))


def test_energy_beta_two_is_twice_squared_mean_difference():
    x, y = data((4, 23, 6), (4, 31, 6), seed=5)
    got = mmd2(x, y, kernel="energy", estimator="biased", beta=2.0)
    expected = 2 * (x.numpy().mean(-2) - y.numpy().mean(-2)) ** 2
    np.testing.assert_allclose(got.numpy(), expected.sum(-1), rtol=1e-10)


@pytest.mark.parametrize("shapes", [((3, 17, 5), (3, 11, 5)), ((1, 17, 5), (4, 11, 5))])
def test_median_heuristic_per_batch_element(shapes):
    x, y = data(*shapes, seed=6)
    kernel = as_kernel("rbf", lengthscale="median")
    fitted = kernel.adapt(x, y)
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    xs = np.broadcast_to(x.numpy(), (*batch, *x.shape[-2:]))
    ys = np.broadcast_to(y.numpy(), (*batch, *y.shape[-2:]))
    expected = [np.median(pdist(np.concatenate([a, b]))) for a, b in zip(xs, ys)]
    np.testing.assert_allclose(fitted.lengthscale.reshape(-1).numpy(), expected, rtol=1e-12)
    assert kernel.adaptive and not fitted.adaptive
    # Calling a median kernel directly adapts it to the pair it is given.
    torch.testing.assert_close(kernel(x, y), fitted(x, y))
    d = np.stack([cdist(a, b) for a, b in zip(xs, ys)])
    ref = np.exp(-(d**2) / (2 * np.array(expected)[:, None, None] ** 2))
    assert rel_err(kernel(x, y), ref) <= 1e-10


RADIAL = ("rbf", "laplace", "matern12", "matern32", "matern52", "imq")


@pytest.mark.parametrize("name", RADIAL)
def test_radial_kernels_default_to_the_median_heuristic(name):
    """At l = 1 the Gaussian kernel between cells of many genes is ~1e-12 and the MMD sees nothing:
    the default is the median heuristic, and explicit numbers still fix the lengthscale."""
    x, y = data((2, 17, 5), (2, 11, 5), seed=8)
    default, median = as_kernel(name), as_kernel(name, lengthscale="median")
    assert default.adaptive
    torch.testing.assert_close(default(x, y), median(x, y), rtol=0, atol=0)
    torch.testing.assert_close(mmd2(x, y, name, "biased"), mmd2(x, y, name, "biased", lengthscale="median"), rtol=0, atol=0)
    fixed = as_kernel(name, lengthscale=2.0)
    assert not fixed.adaptive and fixed.lengthscale.item() == pytest.approx(2.0)


def test_a_median_lengthscale_cannot_be_read_before_it_is_fixed():
    """Code that forgets to adapt a median kernel must fail, not compute with a placeholder of 1."""
    x, y = data((13, 4), (9, 4), seed=9)
    with pytest.raises(InputError, match="'median' lengthscale.*adapt"):
        _ = as_kernel("rbf").lengthscale
    assert as_kernel("rbf").adapt(x, y).lengthscale.item() == pytest.approx(np.median(pdist(torch.cat([x, y]).numpy())), rel=1e-12)


def test_relative_mixture_uses_median_bandwidths():
    x, y = data((2, 15, 4), (2, 12, 4), seed=7)
    got = as_kernel("mixture", base="matern32", lengthscales=[0.5, 2.0])(x, y)
    for b in range(2):
        med = np.median(pdist(np.concatenate([x[b].numpy(), y[b].numpy()])))
        d = cdist(x[b].numpy(), y[b].numpy())
        ref = sum((1 + math.sqrt(3) * d / (l * med)) * np.exp(-math.sqrt(3) * d / (l * med)) for l in (0.5, 2.0))
        np.testing.assert_allclose(got[b].numpy(), ref, rtol=1e-10)


def coincident_data():
    """x has two equal cells and shares a cell with y, so distances of exactly 0 occur off the diagonal."""
    x, y = data((2, 6, 3), (2, 5, 3), seed=8)
    x[:, 1] = x[:, 2]
    y[:, 0] = x[:, 0]
    return x.requires_grad_(True), y


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_wrt_cells_with_coincident_points(case):
    x, y = coincident_data()
    kernel = make_kernel(case)
    # eps=1e-4 keeps GEMM cancellation in ||x - y||^2 (~1e-16) far below eps^2 at the kinks.
    assert gradcheck(lambda a: kernel(a, y), (x,), eps=1e-4, atol=1e-6)
    assert gradcheck(lambda a: kernel(a), (x,), eps=1e-4, atol=1e-6)
    assert gradcheck(lambda a: kernel(a[..., :5, :], y, diag=True), (x,), eps=1e-4, atol=1e-6)
    grad = torch.autograd.grad(kernel(x, y).sum() + kernel(x).sum(), x)[0]
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("case", ["rbf", "laplace", "matern32", "matern52", "imq", "gpytorch"])
def test_gradcheck_wrt_trainable_lengthscale(case):
    x, y = data((2, 7, 3), (2, 5, 3), seed=9)
    if case == "gpytorch":
        kernel = as_kernel("gpytorch", class_name="RBFKernel", lengthscale=L, trainable=True).double()
        key = "gpytorch_kernel.raw_lengthscale"
    else:
        kernel = as_kernel(case, lengthscale=L, trainable=True).double()
        key = "raw_lengthscale"
    raw = dict(kernel.named_parameters())[key]
    assert raw.requires_grad
    start = raw.detach().clone().requires_grad_(True)
    assert gradcheck(lambda r: functional_call(kernel, {key: r}, (x, y)), (start,))


def test_lengthscale_is_frozen_unless_trainable():
    assert not as_kernel("rbf", lengthscale=L).raw_lengthscale.requires_grad
    assert not any(p.requires_grad for p in as_kernel("gpytorch", class_name="RBFKernel").parameters())


def test_sum_and_scale_compose_matrices():
    x, y = data((3, 10, 4), (3, 8, 4), seed=10)
    k1, k2 = as_kernel("rbf", lengthscale=0.8), as_kernel("gpytorch", class_name="MaternKernel", nu=2.5)
    torch.testing.assert_close((k1 + k2)(x, y), k1(x, y) + k2(x, y))
    torch.testing.assert_close((2.0 * k1)(x, y), 2.0 * k1(x, y))
    torch.testing.assert_close((k1 * 3)(x, y), 3 * k1(x, y))
    torch.testing.assert_close((k1 + 0.5 * k2)(x, y, diag=False), k1(x, y) + 0.5 * k2(x, y))
    torch.testing.assert_close((k1 + k2)(x, x, diag=True), k1(x, x, diag=True) + k2(x, x, diag=True))
    median_sum = as_kernel("rbf", lengthscale="median") + k2
    assert median_sum.adaptive
    torch.testing.assert_close(median_sum(x, y), as_kernel("rbf", lengthscale="median")(x, y) + k2(x, y))


def test_gpytorch_adapter_runs_any_zoo_kernel():
    x, y = data((2, 9, 3), (2, 7, 3), seed=11)
    periodic = as_kernel("gpytorch", class_name="PeriodicKernel", lengthscale=L)
    inner = periodic.gpytorch_kernel
    p, l = inner.period_length.item(), inner.lengthscale.item()
    # GPyTorch's periodic kernel (its docstring): exp(-2 sum_k sin^2(pi (x_k - y_k) / p) / l), l not squared.
    diff = np.abs(x.numpy()[:, :, None, :] - y.numpy()[:, None, :, :])
    ref = np.exp(-2 * (np.sin(np.pi * diff / p) ** 2).sum(-1) / l)
    assert rel_err(periodic(x, y), ref) <= 1e-5


# ---------------------------------------------------------------- bad input -------------

def test_nan_and_inf_are_rejected():
    x, y = data((5, 3), (4, 3))
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[2, 1] = value
        with pytest.raises(InputError, match="NaN or Inf"):
            as_kernel("rbf")(bad, y)
        with pytest.raises(InputError, match="NaN or Inf"):
            as_kernel("gpytorch", class_name="RBFKernel")(x, bad)
    bad = x.clone()
    bad[2, 0], bad[2, 1], bad[3, 1] = -float("inf"), float("inf"), float("nan")  # their sum is NaN
    with pytest.raises(InputError, match="NaN or Inf"):
        mmd2(bad, y, kernel="rbf")


def test_values_whose_squared_distances_overflow_are_rejected_with_their_scale():
    """Finite float32 values of 1e20 square past the float32 limit: the MMD would be NaN, silently."""
    x, y = data((5, 3), (4, 3))
    for scale in (1e20, 3e38):
        huge = x.float().clone()
        huge[:2] = scale
        with pytest.raises(InputError, match=re.escape(f"so large (largest magnitude {scale:.3g})") + ".*overflow.*rescale"):
            mmd2(huge, y.float(), kernel="rbf")
    assert torch.isfinite(mmd2(x.float() * 1e6, y.float(), kernel="rbf")).all()  # large but fine


def test_the_overflow_bound_looks_at_each_cells_squared_norm():
    """float16 (max 65504): the bound 4 G m^2 flags a cell (100, 0, 0, 0), whose squared norm 1e4 is
    fine (4e4 < 65504); a cell (100, 100, 0, 0) is not (8e4)."""
    fine = torch.tensor([[100.0, 0, 0, 0], [0, 1, 2, 3]], dtype=torch.float16)
    check_sets(fine, fine)  # no error
    too_large = torch.tensor([[100.0, 100, 0, 0], [0, 1, 2, 3]], dtype=torch.float16)
    with pytest.raises(InputError, match="so large.*float16"):
        check_sets(too_large, fine)


def test_mismatched_genes_and_empty_sets_are_rejected():
    x, _ = data((5, 3), (4, 3))
    y, _ = data((4, 4), (1, 4))
    with pytest.raises(InputError, match="3 genes but y has 4"):
        as_kernel("matern32")(x, y)
    with pytest.raises(InputError, match="empty set"):
        as_kernel("energy")(x[:0], x)
    with pytest.raises(InputError, match="diag=True needs sets of equal size"):
        as_kernel("rbf")(x, x[:3], diag=True)


def test_unknown_kernel_names_list_the_known_ones():
    with pytest.raises(UnknownPluginError, match="known names:.*matern32.*rbf"):
        as_kernel("gaussian")
    with pytest.raises(UnknownPluginError, match="known names:.*MaternKernel.*RBFKernel"):
        as_kernel("gpytorch", class_name="MaternKernl")


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), "auto", True])
def test_invalid_lengthscales_are_rejected(value):
    with pytest.raises(InputError, match="lengthscale must be a positive"):
        as_kernel("rbf", lengthscale=value)


def test_other_invalid_kernel_parameters_are_rejected():
    with pytest.raises(InputError, match="cannot be trained"):
        as_kernel("rbf", lengthscale="median", trainable=True)
    with pytest.raises(InputError, match="lengthscales must be a non-empty list"):
        as_kernel("mixture", lengthscales=[1.0, -2.0])
    with pytest.raises(InputError, match="mixture sets the bandwidths"):
        as_kernel("mixture", base=as_kernel("rbf", lengthscale=3.0))
    with pytest.raises(InputError, match="positive finite number"):
        -1.0 * as_kernel("rbf")
    with pytest.raises(ConfigError, match="does not take lenghtscale; it accepts.*lengthscale_prior"):
        as_kernel("gpytorch", class_name="RBFKernel", lenghtscale=2.0)
    with pytest.raises(ConfigError, match="has no lengthscale"):
        as_kernel("gpytorch", class_name="LinearKernel", lengthscale=2.0)
    with pytest.raises(ConfigError, match="exactly one of"):
        as_kernel("gpytorch")


@pytest.mark.parametrize("beta", [0.0, -0.5, 2.5, float("nan"), "1"])
def test_energy_beta_outside_range_is_rejected(beta):
    with pytest.raises(InputError, match=r"0 < beta <= 2"):
        as_kernel("energy", beta=beta)


def test_half_precision_sets_whose_float16_sum_would_overflow_are_accepted():
    """70,000 float16 ones are fine data (every squared distance 0), though their float16 sum overflows."""
    x = torch.ones(70_000, 1, dtype=torch.float16)
    check_sets(x, x)  # no error
