"""MMD estimators and reductions against brute-force loops, closed forms and GeomLoss."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import integrate

from perturbdiff_core import mmd2
from perturbdiff_core.errors import ConfigError, PerturbDiffDeprecationWarning, PerturbDiffError, PerturbDiffWarning, UnknownPluginError
from perturbdiff_core.mmd.estimators import QuadraticMMD, as_estimator
from perturbdiff_core.mmd.kernels import as_kernel
from perturbdiff_core.mmd.reductions import AutoReduction
from perturbdiff_core.registry import load
from perturbdiff_plugins import reductions as reduction_plugins
from perturbdiff_plugins.keops import KeOpsReduction
from perturbdiff_plugins.reductions import ChunkedReduction, DenseReduction

# ------------------------------------------------------------------ independent float64 references

PROFILES = {  # k as a function of the distance r, written from the textbook formulas
    "rbf": lambda r, l: math.exp(-(r**2) / (2 * l**2)),
    "laplace": lambda r, l: math.exp(-r / l),
    "matern32": lambda r, l: (1 + math.sqrt(3) * r / l) * math.exp(-math.sqrt(3) * r / l),
    "matern52": lambda r, l: (1 + math.sqrt(5) * r / l + 5 * r**2 / (3 * l**2)) * math.exp(-math.sqrt(5) * r / l),
    "imq": lambda r, l: 1 / math.sqrt(1 + r**2 / l**2),
    "energy": lambda r, l: -r,
}


def brute_mmd(name: str, l: float, x: np.ndarray, y: np.ndarray, wx: np.ndarray, wy: np.ndarray, *, unbiased: bool) -> float:
    """Double loops over cells: weighted V-statistic, or the U-statistic dropping i == j."""
    k = lambda a, b: PROFILES[name](float(np.sqrt(((a - b) ** 2).sum())), l)  # noqa: E731
    wx, wy = wx / wx.sum(), wy / wy.sum()

    def within(z: np.ndarray, w: np.ndarray) -> float:
        total = sum(w[i] * w[j] * k(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if not (unbiased and i == j))
        return total / (1 - (w**2).sum()) if unbiased else total

    cross = sum(wx[i] * wy[j] * k(x[i], y[j]) for i in range(len(x)) for j in range(len(y)))
    return within(x, wx) + within(y, wy) - 2 * cross


def brute_linear(name: str, l: float, x: np.ndarray, y: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> float:
    """Gretton et al. (2012) Lemma 14 over pairs (2i, 2i+1), each term a pair-weighted mean."""
    k = lambda a, b: PROFILES[name](float(np.sqrt(((a - b) ** 2).sum())), l)  # noqa: E731
    n = 2 * (min(len(x), len(y)) // 2)
    terms = [(x, x, wx, wx, 0, 1, 1), (y, y, wy, wy, 0, 1, 1), (x, y, wx, wy, 0, 1, -1), (x, y, wx, wy, 1, 0, -1)]
    total = 0.0
    for a, b, wa, wb, da, db, sign in terms:
        num = den = 0.0
        for i in range(0, n, 2):
            p = wa[i + da] * wb[i + db]
            num += p * k(a[i + da], b[i + db])
            den += p
        total += sign * num / den
    return total


def rand(*shape: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def rand_weights(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1


# ------------------------------------------------------------------------- brute-force agreement


#: Every built-in backend, with parameters that make it do its own work on small sets (chunked: several blocks).
BACKENDS = [
    pytest.param("auto", {}, id="auto"),
    pytest.param("dense", {}, id="dense"),
    pytest.param("chunked", {"block_size": 4}, id="chunked4"),
    pytest.param("keops", {}, id="keops", marks=pytest.mark.keops),
]


def skip_unless_it_runs(backend: str, kernel) -> None:
    """Skip, with the reason, when the named backend cannot evaluate ``kernel`` here (KeOps without a compiler)."""
    reduction = load("perturbdiff.backends", backend) if backend != "auto" else None
    if reduction is not None and not reduction.supports(kernel, "cpu"):
        pytest.skip(f"the {backend} backend cannot run {type(kernel).__name__} on this machine")


@pytest.mark.parametrize("kernel", sorted(PROFILES))
@pytest.mark.parametrize("statistic", ["biased", "unbiased"])
@pytest.mark.parametrize(("backend", "backend_params"), BACKENDS)
def test_quadratic_estimators_match_double_loops(kernel: str, statistic: str, backend: str, backend_params: dict) -> None:
    """Every backend gives the weighted V- and U-statistic of float64 double loops, on random sets."""
    x, y = rand(2, 9, 3, seed=0), rand(2, 6, 3, seed=1, shift=0.4)
    wx, wy = rand_weights(2, 9, seed=2), rand_weights(2, 6, seed=3)
    l = 1.3
    k = as_kernel(kernel, **({} if kernel == "energy" else {"lengthscale": l}))
    skip_unless_it_runs(backend, k)
    est = as_estimator(statistic, backend=backend, backend_params=backend_params)
    got = est(x, y, k, x_weights=wx, y_weights=wy)
    unbiased = statistic == "unbiased"
    want = [brute_mmd(kernel, l, x[b].numpy(), y[b].numpy(), wx[b].numpy(), wy[b].numpy(), unbiased=unbiased) for b in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_unweighted_unbiased_is_the_classic_u_statistic() -> None:
    x, y = rand(11, 2, seed=4), rand(8, 2, seed=5, shift=0.3)
    k = lambda a, b: math.exp(-((a - b) ** 2).sum() / 2)  # noqa: E731
    xs, ys = x.numpy(), y.numpy()
    n, m = len(xs), len(ys)
    kxx = sum(k(xs[i], xs[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a, b) for a in xs for b in ys) / (n * m)
    assert mmd2(x, y, "rbf", "unbiased", lengthscale=1.0).item() == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-12)


@pytest.mark.parametrize("kernel", ["rbf", "energy", "matern52"])
@pytest.mark.parametrize("sizes", [(10, 10), (9, 6), (5, 8)])
def test_linear_estimator_matches_pair_loops(kernel: str, sizes: tuple[int, int]) -> None:
    x, y = rand(2, sizes[0], 3, seed=6), rand(2, sizes[1], 3, seed=7, shift=0.5)
    wx, wy = rand_weights(2, sizes[0], seed=8), rand_weights(2, sizes[1], seed=9)
    params = {} if kernel == "energy" else {"lengthscale": 1.1}
    got = mmd2(x, y, kernel, "linear", x_weights=wx, y_weights=wy, **params)
    want = [brute_linear(kernel, 1.1, x[b].numpy(), y[b].numpy(), wx[b].numpy(), wy[b].numpy()) for b in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    plain = mmd2(x, y, kernel, "linear", **params)  # uniform weights: (2/n) sum_i h_i
    uniform = [brute_linear(kernel, 1.1, x[b].numpy(), y[b].numpy(), np.ones(sizes[0]), np.ones(sizes[1])) for b in range(2)]
    np.testing.assert_allclose(plain.numpy(), uniform, rtol=1e-10, atol=1e-12)


def test_exact_embedding_equals_biased_and_nystrom_on_all_cells_too() -> None:
    x, y = rand(2, 9, 3, seed=10), rand(2, 7, 3, seed=11, shift=0.5)
    wx, wy = rand_weights(2, 9, seed=12), rand_weights(2, 7, seed=13)
    kernel = as_kernel("rbf", lengthscale=1.4)
    biased = mmd2(x, y, kernel, "biased", x_weights=wx, y_weights=wy)
    exact = load("perturbdiff.estimators", "embedding", embedding="exact")
    torch.testing.assert_close(exact(x, y, kernel, x_weights=wx, y_weights=wy), biased, rtol=1e-12, atol=1e-12)
    # Nystrom with every cell as a landmark reproduces K on the cells (up to the rcond cut-off).
    nystrom = load("perturbdiff.estimators", "embedding", embedding="nystrom", num_landmarks=100, rcond=1e-12)
    torch.testing.assert_close(nystrom(x, y, kernel, x_weights=wx, y_weights=wy), biased, rtol=1e-6, atol=1e-8)


def test_random_fourier_features_approximate_biased_and_stay_fixed() -> None:
    x, y = rand(2, 20, 3, seed=14), rand(2, 20, 3, seed=15, shift=0.7)
    kernel = as_kernel("rbf", lengthscale=1.5)
    rff = load("perturbdiff.estimators", "embedding", embedding="rff", num_features=20000)
    first = rff(x, y, kernel)
    torch.testing.assert_close(rff(x, y, kernel), first, rtol=0, atol=0)  # cached features
    # Kernel values carry O(D^-1/2) ~ 0.01 error; the biased MMD^2 here is about 0.4.
    torch.testing.assert_close(first, mmd2(x, y, kernel, "biased"), rtol=0, atol=0.03)
    other = as_kernel("rbf", lengthscale=1.5)  # another kernel object gets its own map
    rff(x, y, other)
    assert len(rff._maps) == 2


def test_unbiased_embedding_estimator_is_the_u_statistic_of_its_feature_kernel() -> None:
    """Exact map: equals UnbiasedMMD. RFF map: equals a double loop over i != j of phi_i . phi_j."""
    x, y = rand(2, 9, 3, seed=16), rand(2, 7, 3, seed=17, shift=0.5)
    wx, wy = rand_weights(2, 9, seed=18), rand_weights(2, 7, seed=19)
    kernel = as_kernel("matern32", lengthscale=1.3)
    exact = load("perturbdiff.estimators", "embedding", embedding="exact", unbiased=True)
    unbiased = mmd2(x, y, kernel, "unbiased", x_weights=wx, y_weights=wy)
    torch.testing.assert_close(exact(x, y, kernel, x_weights=wx, y_weights=wy), unbiased, rtol=1e-12, atol=1e-12)

    rff = load("perturbdiff.estimators", "embedding", embedding="rff", num_features=64, unbiased=True)
    got = rff(x, y, kernel, x_weights=wx, y_weights=wy)
    phi_x, phi_y = rff._maps[kernel].features(x), rff._maps[kernel].features(y)
    for b in range(2):
        u, v = wx[b] / wx[b].sum(), wy[b] / wy[b].sum()

        def within(phi, w):
            pairs = [(i, j) for i in range(len(w)) for j in range(len(w)) if i != j]
            num = sum(w[i] * w[j] * (phi[i] @ phi[j]) for i, j in pairs)
            return num / sum(w[i] * w[j] for i, j in pairs)

        cross = sum(u[i] * v[j] * (phi_x[b, i] @ phi_y[b, j]) for i in range(9) for j in range(7))
        want = within(phi_x[b], u) + within(phi_y[b], v) - 2 * cross
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-12)
    biased = load("perturbdiff.estimators", "embedding", embedding="rff", num_features=64)
    biased._maps = rff._maps  # same features: the two statistics differ
    assert not torch.allclose(biased(x, y, kernel, x_weights=wx, y_weights=wy), got)
    with pytest.raises(PerturbDiffError, match="at least 2 cells.*unbiased=False"):
        rff(x[:, :1], y, kernel)


@pytest.mark.parametrize("name", ["biased", "unbiased"])
def test_quadratic_estimators_given_an_embedding_are_deprecated_aliases_of_the_embedding_estimator(name: str) -> None:
    x, y = rand(2, 9, 3, seed=20), rand(2, 7, 3, seed=21, shift=0.5)
    wx, wy = rand_weights(2, 9, seed=22), rand_weights(2, 7, seed=23)
    kernel = as_kernel("rbf", lengthscale="median")
    unbiased = name == "unbiased"
    in_code = "embedding='rff', unbiased=True, num_features=32, seed=3" if unbiased else "embedding='rff', num_features=32, seed=3"
    in_config = "{embedding: rff, unbiased: true, num_features: 32, seed: 3}" if unbiased else "{embedding: rff, num_features: 32, seed: 3}"
    replacement = re.escape(f"use the estimator 'embedding' with {in_code} (in a config: estimator: embedding, estimator_params: {in_config})")
    with pytest.warns(PerturbDiffDeprecationWarning, match=f"'{name}' given embedding='rff' is deprecated: {replacement}"):
        alias = load("perturbdiff.estimators", name, embedding="rff", num_features=32, seed=3)
    direct = load("perturbdiff.estimators", "embedding", embedding="rff", num_features=32, seed=3, unbiased=unbiased)

    def value_and_grad(estimator):
        x_ = x.clone().requires_grad_(True)
        value = estimator(x_, y, kernel, x_weights=wx, y_weights=wy)
        return value, torch.autograd.grad(value.sum(), x_)[0]

    assert all(torch.equal(a, b) for a, b in zip(value_and_grad(alias), value_and_grad(direct)))
    assert alias.unbiased == unbiased and repr(alias) == repr(direct)
    with pytest.raises(PerturbDiffError, match="belong to the embedding estimator: use estimator='embedding'"):
        load("perturbdiff.estimators", name, num_features=32)


# ------------------------------------------------------------------------------ population values


def gaussian_expected_kernel(a: np.ndarray, var_a: float, b: np.ndarray, var_b: float, l: float) -> float:
    """E k(x, y) for x ~ N(a, var_a I), y ~ N(b, var_b I), k = exp(-||x - y||^2 / (2 l^2)).

    x - y ~ N(a - b, C), C = (var_a + var_b) I, and exp(-||z||^2 / 2l^2) = (2 pi l^2)^(d/2) N(z; 0, l^2 I),
    so E k = (2 pi l^2)^(d/2) N(a - b; 0, C + l^2 I) = det(I + C / l^2)^(-1/2) exp(-|a - b|^2 / (2 (l^2 + var_a + var_b))).
    """
    d = len(a)
    c = var_a + var_b
    return (1 + c / l**2) ** (-d / 2) * math.exp(-((a - b) ** 2).sum() / (2 * (l**2 + c)))


def test_gaussian_expected_kernel_closed_form_matches_quadrature() -> None:
    a, var_a, b, var_b, l = 0.3, 0.8, -0.5, 1.7, 1.2
    sd = math.sqrt(var_a + var_b)

    def integrand(z: float) -> float:
        density = math.exp(-((z - (a - b)) ** 2) / (2 * sd**2)) / (sd * math.sqrt(2 * math.pi))
        return density * math.exp(-(z**2) / (2 * l**2))

    value, _ = integrate.quad(integrand, -40, 40)
    assert gaussian_expected_kernel(np.array([a]), var_a, np.array([b]), var_b, l) == pytest.approx(value, rel=1e-10)


def population_mmd2(m1: np.ndarray, s1: float, m2: np.ndarray, s2: float, l: float) -> float:
    ek = gaussian_expected_kernel
    return ek(m1, s1**2, m1, s1**2, l) + ek(m2, s2**2, m2, s2**2, l) - 2 * ek(m1, s1**2, m2, s2**2, l)


@pytest.mark.parametrize("estimator", ["unbiased", "linear", "biased"])
def test_mean_over_draws_matches_population_mmd(estimator: str) -> None:
    d, n, draws, l = 3, 12, 6000, 1.5
    m1, s1, m2, s2 = np.zeros(d), 1.0, np.array([0.6, 0.0, -0.3]), 1.3
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(draws, n, d, generator=gen, dtype=torch.float64) * s1 + torch.from_numpy(m1)
    y = torch.randn(draws, n, d, generator=gen, dtype=torch.float64) * s2 + torch.from_numpy(m2)
    values = mmd2(x, y, "rbf", estimator, lengthscale=l)
    mean, se = values.mean().item(), values.std().item() / math.sqrt(draws)
    truth = population_mmd2(m1, s1, m2, s2, l)
    if estimator == "biased":  # the V-statistic is biased upwards by O(1/n): the test can tell
        assert mean - truth > 6 * se
    else:
        assert abs(mean - truth) < 4 * se, (mean, truth, se)


# ---------------------------------------------------------------------------------------- GeomLoss


def test_geomloss_gaussian_is_half_the_biased_mmd() -> None:
    """GeomLoss ``SamplesLoss("gaussian", blur=l)`` uses k = exp(-||x-y||^2 / (2 blur^2)), our
    ``rbf`` with lengthscale ``blur``, and returns 0.5 * biased MMD^2 (the RKHS norm halved)."""
    geomloss = pytest.importorskip("geomloss")
    x, y = rand(2, 9, 3, seed=17), rand(2, 7, 3, seed=18, shift=0.4)
    a, b = rand_weights(2, 9, seed=19), rand_weights(2, 7, seed=20)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    for blur in (0.7, 2.0):
        theirs = geomloss.SamplesLoss("gaussian", blur=blur, backend="tensorized")(a, x, b, y)
        ours = mmd2(x, y, "rbf", "biased", x_weights=a, y_weights=b, lengthscale=blur)
        torch.testing.assert_close(theirs, 0.5 * ours, rtol=1e-12, atol=1e-14)


def test_geomloss_energy_is_half_the_biased_energy_distance() -> None:
    """GeomLoss ``SamplesLoss("energy")`` uses k = -||x - y|| and returns 0.5 * biased MMD^2, except
    that its tensorized distances are sqrt(max(d^2, 1e-8)): every self-distance is 1e-4, which
    adds -0.5e-4 (sum a_i^2 + sum b_j^2)."""
    geomloss = pytest.importorskip("geomloss")
    x, y = rand(2, 9, 3, seed=21), rand(2, 7, 3, seed=22, shift=0.4)
    a, b = rand_weights(2, 9, seed=23), rand_weights(2, 7, seed=24)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    theirs = geomloss.SamplesLoss("energy", backend="tensorized")(a, x, b, y)
    ours = mmd2(x, y, "energy", "biased", x_weights=a, y_weights=b)
    offset = -0.5e-4 * (a.square().sum(-1) + b.square().sum(-1))
    torch.testing.assert_close(theirs, 0.5 * ours + offset, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------- chunked, gradients, backward


def dense_reference(kernel, x, y, wx, wy, exclude):
    """The three MMD sums from the whole kernel matrix through ``kernel.forward`` and plain autograd."""
    def total(a, b, wa, wb, same):
        k = kernel.forward(a, b, same=same)
        if same and exclude:
            k = k * (1 - torch.eye(k.shape[-1], dtype=k.dtype))
        return (wa.unsqueeze(-2) @ k @ wb.unsqueeze(-1))[..., 0, 0]

    return total(x, x, wx, wx, True), total(y, y, wy, wy, True), total(x, y, wx, wy, False)


def assert_matches_dense_reference(reduction, kernel, x, y, wx, wy, *, exclude: bool, inputs, seed: int, rtol: float, atol: float) -> None:
    """``reduction.mmd_terms`` equals :func:`dense_reference` in value (``rtol``, ``atol``) and in
    the gradients of a random combination of the three terms to ``inputs`` (ten times looser)."""
    mine = reduction.mmd_terms(kernel, x, y, wx, wy, exclude_diagonal=exclude)
    ref = dense_reference(kernel, x, y, wx, wy, exclude)
    for got, want in zip(mine, ref):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    coef = rand(3, 2, seed=seed)
    g_mine = torch.autograd.grad(sum((c * t).sum() for c, t in zip(coef, mine)), inputs)
    g_ref = torch.autograd.grad(sum((c * t).sum() for c, t in zip(coef, ref)), inputs)
    for got, want in zip(g_mine, g_ref):
        torch.testing.assert_close(got, want, rtol=10 * rtol, atol=10 * atol)


KERNELS = [
    ("rbf", {"lengthscale": 1.3, "trainable": True}),
    ("energy", {}),
    ("laplace", {"lengthscale": "median"}),
    ("mixture", {"relative": False}),
    ("gpytorch", {"class_name": "MaternKernel", "nu": 1.5}),
]


@pytest.mark.parametrize(("kernel", "params"), KERNELS, ids=[k for k, _ in KERNELS])
@pytest.mark.parametrize("reduction", [DenseReduction(), ChunkedReduction(3)], ids=["dense", "chunked3"])
@pytest.mark.parametrize("exclude", [False, True])
def test_reduction_values_and_gradients_equal_plain_autograd(kernel, params, reduction, exclude) -> None:
    k = as_kernel(kernel, **params).double()
    x, y = rand(2, 10, 4, seed=25).requires_grad_(), rand(2, 7, 4, seed=26, shift=0.3).requires_grad_()
    wx, wy = rand_weights(2, 10, seed=27).requires_grad_(), rand_weights(2, 7, seed=28).requires_grad_()
    k = k.adapt(x, y)
    inputs = [x, y, wx, wy, *[p for p in k.parameters() if p.requires_grad]]
    assert_matches_dense_reference(reduction, k, x, y, wx, wy, exclude=exclude, inputs=inputs, seed=29, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", [DenseReduction(), ChunkedReduction(8)], ids=["dense", "chunked8"])
@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("kernel", ["energy", "matern52"])
def test_symmetric_staircase_gram_equals_plain_autograd(monkeypatch, reduction, split: int, kernel: str) -> None:
    """Within-set sums over a staircase of row blocks (dense: diagonal blocks and the columns after
    them; chunked: each diagonal block's Gram mirrored), uneven blocks too: values and gradients
    to cells and weights."""
    monkeypatch.setattr(reduction_plugins, "SYMMETRIC_SPLIT", split)
    monkeypatch.setattr(reduction_plugins, "SYMMETRIC_SPLIT_MIN_ROWS", 4)
    x, y = rand(2, 11, 4, seed=40).requires_grad_(), rand(2, 9, 4, seed=41, shift=0.3).requires_grad_()
    wx, wy = rand_weights(2, 11, seed=42).requires_grad_(), rand_weights(2, 9, seed=43).requires_grad_()
    k = as_kernel(kernel).double().adapt(x, y)  # a median lengthscale is fixed first, as estimators do
    assert_matches_dense_reference(reduction, k, x, y, wx, wy, exclude=True, inputs=(x, y, wx, wy), seed=44, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", [DenseReduction(), ChunkedReduction(8)], ids=["dense", "chunked8"])
@pytest.mark.parametrize("kernel", ["energy", "rbf"])
@pytest.mark.parametrize("shift", [0.0, 40.0], ids=["near-origin", "far-from-origin"])
def test_launch_bound_plan_equals_plain_autograd(monkeypatch, reduction, kernel: str, shift: float) -> None:
    """The plan of GPUs, forced here on the CPU: one GEMM per term (no staircase even where the CPU
    plan splits), always centred, the lengthscale kept as a tensor; values and gradients."""
    centres = []

    def recording_centre(x, sq_norms, *, always):
        centres.append(original_centre(x, sq_norms, always=always))
        return centres[-1]

    def no_staircase(*args):
        raise AssertionError("a launch-bound plan must not split a symmetric sum")

    original_centre = reduction_plugins._centre
    monkeypatch.setattr(reduction_plugins, "_launch_bound", lambda device: True)
    monkeypatch.setattr(reduction_plugins, "SYMMETRIC_SPLIT_MIN_ROWS", 4)  # the CPU plan would split these sets
    monkeypatch.setattr(reduction_plugins, "_staircase", no_staircase)
    monkeypatch.setattr(reduction_plugins, "_centre", recording_centre)
    x = rand(2, 11, 4, seed=50, shift=shift).requires_grad_()
    y = rand(2, 9, 4, seed=51, shift=shift + 0.3).requires_grad_()
    k = as_kernel(kernel).double().adapt(x, y)
    wx, wy = rand_weights(2, 11, seed=52).requires_grad_(), rand_weights(2, 9, seed=53).requires_grad_()
    assert_matches_dense_reference(reduction, k, x, y, wx, wy, exclude=True, inputs=(x, y, wx, wy), seed=54, rtol=1e-9, atol=1e-11)
    assert centres and all(c is not None for c in centres)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the launch-bound plan on its own device)")
@pytest.mark.parametrize("reduction", [DenseReduction(), ChunkedReduction(128)], ids=["dense", "chunked128"])
@pytest.mark.parametrize("kernel", ["energy", "rbf"])
def test_gpu_float32_agrees_with_cpu_float64(reduction, kernel: str) -> None:
    x64 = rand(2, 300, 20, seed=60, shift=3.0).requires_grad_()  # enough cells for the CPU plan's staircase
    y64 = rand(2, 260, 20, seed=61, shift=3.2)
    wx, wy = rand_weights(2, 300, seed=62), rand_weights(2, 260, seed=63)
    x = x64.detach().float().cuda().requires_grad_()
    on_gpu = (y64.float().cuda(), wx.float().cuda(), wy.float().cuda())
    mine = reduction.mmd_terms(as_kernel(kernel).cuda(), x, *on_gpu, exclude_diagonal=True)
    ref = reduction.mmd_terms(as_kernel(kernel).double(), x64, y64, wx, wy, exclude_diagonal=True)
    coef = rand(3, 2, seed=64)
    (g_mine,) = torch.autograd.grad(sum((c.float().cuda() * t).sum() for c, t in zip(coef, mine)), (x,))
    (g_ref,) = torch.autograd.grad(sum((c * t).sum() for c, t in zip(coef, ref)), (x64,))
    for got, want in zip(mine, ref):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_mine.double().cpu(), g_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "reduction", [DenseReduction(), ChunkedReduction(3), ChunkedReduction(64)], ids=["dense", "chunked3", "chunked-one-block"]
)
@pytest.mark.parametrize("kernel", ["rbf", "energy", "matern32"])
def test_hand_written_backward_passes_gradcheck(reduction, kernel: str) -> None:
    """gradcheck wrt cells and weights (unequal N, M, random weights) and the log-lengthscale."""
    k = as_kernel(kernel, **({} if kernel == "energy" else {"lengthscale": 1.2})).double()
    raw = k.raw_lengthscale.detach().clone()
    del k.raw_lengthscale  # a plain tensor attribute instead, so gradcheck can perturb it

    def f(x, y, wx, wy, raw_l):
        k.raw_lengthscale = raw_l
        kxx, kyy, kxy = reduction.mmd_terms(k, x, y, wx, wy, exclude_diagonal=True)
        return torch.stack([kxx, 0.7 * kyy, kxy])

    x, y = rand(2, 7, 3, seed=30), rand(2, 5, 3, seed=31, shift=0.3)
    wx, wy = rand_weights(2, 7, seed=32), rand_weights(2, 5, seed=33)
    inputs = [t.clone().requires_grad_(True) for t in (x, y, wx, wy, raw)]
    if kernel == "energy":  # its lengthscale is fixed at 1
        inputs[-1].requires_grad_(False)
    assert torch.autograd.gradcheck(f, inputs)


def test_gradient_wrt_x_alone_matches() -> None:
    """The training case: only the predicted cells need a gradient (the y-y term's backward is skipped)."""
    k = as_kernel("rbf", lengthscale=1.1).double()
    x, y = rand(2, 8, 3, seed=34).requires_grad_(), rand(2, 6, 3, seed=35)
    w = torch.full((2, 8), 1 / 8, dtype=torch.float64)
    v = torch.full((2, 6), 1 / 6, dtype=torch.float64)
    for reduction in (DenseReduction(), ChunkedReduction(5)):
        kxx, kyy, kxy = reduction.mmd_terms(k, x, y, w, v, exclude_diagonal=False)
        (gx,) = torch.autograd.grad((kxx + kyy - 2 * kxy).sum(), x)
        ref = dense_reference(k, x, y, w, v, False)
        (want,) = torch.autograd.grad((ref[0] + ref[1] - 2 * ref[2]).sum(), x)
        torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", [DenseReduction(), ChunkedReduction(4)], ids=["dense", "chunked4"])
def test_weighted_sum_same_set_with_two_weight_vectors(reduction) -> None:
    k = as_kernel("energy").double()
    x = rand(2, 9, 3, seed=36).requires_grad_()
    wa, wb = rand_weights(2, 9, seed=37), rand_weights(2, 9, seed=38)
    for exclude in (False, True):
        got = reduction.weighted_sum(k, x, x, wa, wb, same=True, exclude_diagonal=exclude)
        kk = k.forward(x, x, same=True) * (1 - exclude * torch.eye(9, dtype=torch.float64))
        want = (wa.unsqueeze(-2) @ kk @ wb.unsqueeze(-1))[..., 0, 0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


def test_far_from_origin_float32_distances_stay_accurate() -> None:
    """Cells offset by 1000 (raw counts): the shift by the mean keeps float32 GEMM distances exact enough."""
    x64, y64 = rand(1, 50, 20, seed=39, shift=1000.0), rand(1, 40, 20, seed=40, shift=1000.5)
    want = mmd2(x64, y64, as_kernel("rbf", lengthscale=4.0).double(), "unbiased")
    for reduction in (DenseReduction(), ChunkedReduction(16)):
        got = as_estimator("unbiased", backend=reduction)(x64.float(), y64.float(), as_kernel("rbf", lengthscale=4.0))
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kernel", ["rbf", "gpytorch"])
def test_chunked_autograd_keeps_no_kernel_matrix(kernel: str) -> None:
    """Besides views of the inputs, tensors saved for the backward hold O(N + M + block^2) numbers, not O(N M)."""
    block, n, m = 4, 13, 11
    x, y = rand(2, n, 3, seed=41).requires_grad_(), rand(2, m, 3, seed=42)
    k = as_kernel(kernel, **({"class_name": "RBFKernel"} if kernel == "gpytorch" else {})).double().adapt(x, y)
    w, v = torch.full((2, n), 1 / n, dtype=torch.float64), torch.full((2, m), 1 / m, dtype=torch.float64)
    saved: list[int] = []
    inputs = {t.untyped_storage().data_ptr() for t in (x, y, w, v)}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in inputs:  # views of the inputs cost nothing
            saved.append(t.numel())
        return t

    for reduction, bound in ((ChunkedReduction(block), 2 * (4 * (n + m) + block * block)), (DenseReduction(), None)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            terms = reduction.mmd_terms(k, x, y, w, v, exclude_diagonal=True)
        if bound is not None:
            assert sum(saved) <= bound, (saved, bound)
        else:  # the hook does see kernel matrices: the dense backend keeps them
            assert sum(saved) >= 2 * (n * n + n * m)
        torch.autograd.grad(sum(t.sum() for t in terms), x)


# ------------------------------------------------------------------------------------- auto backend


def stand_in(batch: int, cells: int, device: str) -> SimpleNamespace:
    """Shape and device of a (possibly huge) set, without allocating it."""
    return SimpleNamespace(shape=torch.Size([batch, cells, 2000]), device=torch.device(device))


def test_auto_follows_the_builtin_declarations(monkeypatch: pytest.MonkeyPatch) -> None:
    """dense up to its max_entries; above it keops on CUDA where it runs, else chunked; never keops on CPU."""

    def keops_runs(self, kernel, device_type):
        assert device_type == "cuda", "the KeOps probe must not run for CPU tensors"
        return True

    monkeypatch.setattr(KeOpsReduction, "supports", keops_runs)  # as if pykeops compiled here
    auto, kernel = AutoReduction(), as_kernel("rbf")
    for cells in (8, 256, 4096, 100_000):
        chosen = auto.choose(kernel, stand_in(8, cells, "cpu"), stand_in(8, cells, "cpu"))
        assert isinstance(chosen, DenseReduction if 8 * 3 * cells**2 <= DenseReduction.max_entries else ChunkedReduction)
    # The choice is per call: on CUDA tensors the same object picks KeOps for large sets only.
    assert isinstance(auto.choose(kernel, stand_in(8, 100_000, "cuda"), stand_in(8, 100_000, "cuda")), KeOpsReduction)
    assert isinstance(auto.choose(kernel, stand_in(8, 64, "cuda"), stand_in(8, 64, "cuda")), DenseReduction)
    monkeypatch.setattr(KeOpsReduction, "supports", lambda self, kernel, device_type: False)  # pykeops missing: chunked
    assert isinstance(auto.choose(kernel, stand_in(8, 100_000, "cuda"), stand_in(8, 100_000, "cuda")), ChunkedReduction)


FAKE_BACKENDS = """
from perturbdiff_plugins.reductions import DenseReduction


class SmallCpuSums(DenseReduction):
    priority = 100
    max_entries = 10_000
    devices = ("cpu",)


class NeedsParameters(DenseReduction):
    priority = 1000

    def __init__(self, size):
        self.size = size
"""


def test_auto_picks_a_registered_backend_by_its_declaration(install_fake) -> None:
    """A third-party backend takes the calls it declares (a size limit, a device) by its priority;
    one that cannot be built with defaults is left out of auto, without breaking it."""
    install_fake(
        "perturbdiff-fake-backends",
        {"small_cpu": "perturbdiff_fake_backends:SmallCpuSums", "needs_parameters": "perturbdiff_fake_backends:NeedsParameters"},
        group="perturbdiff.backends",
        modules={"perturbdiff_fake_backends": FAKE_BACKENDS},
    )
    auto, kernel = AutoReduction(), as_kernel("rbf")
    assert type(auto.choose(kernel, stand_in(2, 40, "cpu"), stand_in(2, 40, "cpu"))).__name__ == "SmallCpuSums"  # 9600 entries
    assert type(auto.choose(kernel, stand_in(2, 41, "cpu"), stand_in(2, 41, "cpu"))) is DenseReduction  # 10086
    assert type(auto.choose(kernel, stand_in(2, 40, "cuda"), stand_in(2, 40, "cuda"))) is DenseReduction
    assert "NeedsParameters" not in [type(b).__name__ for b in auto.backends]
    x, y = rand(2, 7, 3, seed=45), rand(2, 5, 3, seed=46, shift=0.3)
    dense = as_estimator("unbiased", backend="dense")(x, y, kernel)
    torch.testing.assert_close(as_estimator("unbiased", backend="small_cpu")(x, y, kernel), dense, rtol=0, atol=0)
    torch.testing.assert_close(as_estimator("unbiased")(x, y, kernel), dense, rtol=0, atol=0)


def test_auto_with_no_backend_that_applies_says_so() -> None:
    auto = AutoReduction()
    auto.backends = [b for b in auto.backends if b.max_entries is not None]  # only dense: bounded
    with pytest.raises(ConfigError, match="No registered MMD backend applies to RBF on cpu"):
        auto.choose(as_kernel("rbf"), stand_in(8, 100_000, "cpu"), stand_in(8, 100_000, "cpu"))


def test_auto_is_the_default_backend_and_agrees_with_dense() -> None:
    x, y = rand(3, 12, 4, seed=43), rand(3, 9, 4, seed=44, shift=0.2)
    assert isinstance(as_estimator("unbiased").reduction, AutoReduction)
    dense = as_estimator("unbiased", backend="dense")(x, y, as_kernel("rbf"))
    torch.testing.assert_close(mmd2(x, y, "rbf", "unbiased"), dense, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------- deprecated estimator aliases


@pytest.mark.parametrize(
    ("params", "statistic", "block_size"), [({}, "unbiased", 1024), ({"block_size": 4}, "unbiased", 4), ({"block_size": 3, "unbiased": False}, "biased", 3)]
)
def test_the_chunked_estimator_is_a_deprecated_alias_with_the_same_numbers(params: dict, statistic: str, block_size: int) -> None:
    """``chunked`` warns, naming its replacement, and computes exactly what the new spelling and the
    old class (a QuadraticMMD over a ChunkedReduction) compute: values and gradients, float64."""
    x, y = rand(2, 9, 3, seed=60), rand(2, 7, 3, seed=61, shift=0.3)
    wx, wy = rand_weights(2, 9, seed=62), rand_weights(2, 7, seed=63)
    kernel = as_kernel("matern32", lengthscale=1.2)
    replacement = rf"use the estimator '{statistic}' with backend='chunked', backend_params=\{{'block_size': {block_size}\}}"
    with pytest.warns(DeprecationWarning, match=rf"'chunked' is deprecated: {replacement}"):
        alias = as_estimator("chunked", **params)
    new = as_estimator(statistic, backend="chunked", backend_params={"block_size": block_size})
    old = QuadraticMMD(ChunkedReduction(block_size), unbiased=statistic == "unbiased")

    def value_and_grad(estimator):
        x_ = x.clone().requires_grad_(True)
        value = estimator(x_, y, kernel, x_weights=wx, y_weights=wy)
        return value, torch.autograd.grad(value.sum(), x_)[0]

    got = value_and_grad(alias)
    for reference in (new, old):
        assert all(torch.equal(a, b) for a, b in zip(got, value_and_grad(reference)))


def test_the_keops_estimator_is_a_deprecated_alias() -> None:
    replacement = r"use the estimator 'biased' with backend='keops' .*estimator_params: \{backend: keops\}"
    with pytest.warns(DeprecationWarning, match=f"'keops' is deprecated: {replacement}") as record:
        alias = as_estimator("keops", unbiased=False)
    assert issubclass(record[0].category, PerturbDiffWarning)  # so the command line prints it, as one line
    assert not alias.unbiased and isinstance(alias.reduction, KeOpsReduction)


@pytest.mark.keops
@pytest.mark.parametrize("unbiased", [True, False])
def test_the_keops_alias_computes_what_the_keops_backend_does(unbiased: bool) -> None:
    kernel = as_kernel("rbf", lengthscale=1.4)
    skip_unless_it_runs("keops", kernel)
    x, y = rand(2, 9, 3, seed=64), rand(2, 7, 3, seed=65, shift=0.3)
    wx, wy = rand_weights(2, 9, seed=66), rand_weights(2, 7, seed=67)
    with pytest.warns(DeprecationWarning):
        alias = as_estimator("keops", unbiased=unbiased)
    statistic = "unbiased" if unbiased else "biased"
    got = alias(x, y, kernel, x_weights=wx, y_weights=wy)
    assert torch.equal(got, as_estimator(statistic, backend="keops")(x, y, kernel, x_weights=wx, y_weights=wy))
    dense = as_estimator(statistic, backend="dense")(x, y, kernel, x_weights=wx, y_weights=wy)
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-12)


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mmd2(torch.tensor([[0.0, float("nan")]]), torch.zeros(2, 2)), "NaN"),
        (lambda: mmd2(torch.zeros(3, 4), torch.zeros(3, 5)), "genes"),
        (lambda: mmd2(torch.zeros(0, 4), torch.zeros(3, 4)), "empty"),
        (lambda: mmd2(torch.zeros(3, 0), torch.zeros(3, 0)), "0 genes"),
        (lambda: mmd2(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long)), r"torch.int64; .*\.float\(\)"),
        (lambda: mmd2(torch.ones(3, 4, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)), r"torch.bool; .*\.float\(\)"),
        (lambda: mmd2(torch.ones(3, 4, dtype=torch.complex64), torch.ones(3, 4, dtype=torch.complex64)), "complex"),
        (lambda: mmd2(torch.ones(3, 4, device="meta"), torch.ones(3, 4, device="meta")), "meta device"),
        (lambda: mmd2(torch.zeros(1, 4), torch.randn(3, 4), estimator="unbiased"), "at least 2 cells"),
        (lambda: mmd2(torch.zeros(1, 4), torch.randn(3, 4), estimator="linear"), "at least 2 cells"),
        (lambda: mmd2(torch.randn(3, 4), torch.randn(3, 4), x_weights=torch.ones(4)), "one weight per cell"),
        (lambda: mmd2(torch.randn(2, 3), torch.randn(2, 3), x_weights=-torch.ones(2)), "non-negative"),
        (lambda: mmd2(torch.randn(3, 4), torch.randn(3, 4), estimator="quadratik"), "known names: .*unbiased"),
        (lambda: as_estimator("biased", backend="gpu"), "'auto' or one of: chunked, dense"),
        (lambda: as_estimator("unbiased", backend="chunked", backend_params={"block_size": 0}), "block_size"),
        (lambda: as_estimator("unbiased", backend_params={"block_size": 8}), r"backend='auto' builds .*\['block_size'\] need a named backend"),
        (lambda: as_estimator("biased", backend="chunked", embedding="rff"), "no backend applies to it"),
        (lambda: as_estimator("embedding", embedding="fourier"), "known: .*rff"),
        (
            lambda: mmd2(torch.randn(4, 2), torch.randn(4, 2), estimator="linear", x_weights=torch.tensor([1.0, 0, 1, 0])),
            "zero-weight",
        ),
    ],
)
def test_bad_input_raises_one_clear_error(make, match: str) -> None:
    with pytest.raises(PerturbDiffError, match=match):
        make()


def test_unknown_names_are_lookup_errors_listing_known_ones() -> None:
    with pytest.raises(UnknownPluginError, match="linear"):
        as_estimator("nope")
    with pytest.raises(UnknownPluginError, match=r"Unknown MMD backend 'nope'; choose 'auto' or one of: chunked, dense, keops\."):
        as_estimator("unbiased", backend="nope")
    with pytest.raises(UnknownPluginError, match=r"'chunkd' \(did you mean 'chunked'\?\)"):
        as_estimator("biased", backend="chunkd")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("kernel", "params"), [("energy", {}), ("rbf", {"lengthscale": "median"}), ("laplace", {"lengthscale": 40.0})])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_half_precision_sets_are_summed_in_float32(dtype: torch.dtype, kernel: str, params: dict, estimator: str) -> None:
    """256-cell sets over 2000 genes: summed in float16 the energy MMD^2 came out 0.25 (bfloat16: 0.0)
    for a float64 value of 0.30. In float32 it must match float64 on the same (rounded) values."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2000, generator=gen, dtype=torch.float64).to(dtype)
    y = (torch.randn(256, 2000, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    got = mmd2(x, y, kernel, estimator, **params)
    expected = mmd2(x.double(), y.double(), kernel, estimator, **params)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-3, abs=1e-6)
