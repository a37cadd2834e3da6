"""Kernel mean embeddings (exact, random Fourier features, Nystrom) against float64 NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist

from perturbdiff_core.errors import ConfigError, InputError, UnknownPluginError
from perturbdiff_core.mmd.embeddings import as_embedding
from perturbdiff_core.mmd.kernels import as_kernel
from perturbdiff_plugins.embeddings import NotFittedError

# Independent closed forms of the distance d with lengthscale l.
PROFILES = {
    "rbf": lambda d, l: np.exp(-(d**2) / (2 * l**2)),
    "laplace": lambda d, l: np.exp(-d / l),
    "matern32": lambda d, l: (1 + math.sqrt(3) * d / l) * np.exp(-math.sqrt(3) * d / l),
    "matern52": lambda d, l: (1 + math.sqrt(5) * d / l + 5 * d**2 / (3 * l**2)) * np.exp(-math.sqrt(5) * d / l),
    "imq": lambda d, l: 1 / np.sqrt(1 + d**2 / l**2),
}


def cells(n, genes=4, seed=0, shift=0.0, batch=()):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 1.5, genes, dtype=torch.float64)
    return torch.randn(*batch, n, genes, generator=g, dtype=torch.float64) * scale + shift


def gram(name, a, b, l):
    return PROFILES[name](cdist(a.numpy(), b.numpy()), l)


def biased_mmd2(name, x, y, l):
    return gram(name, x, x, l).mean() + gram(name, y, y, l).mean() - 2 * gram(name, x, y, l).mean()


# ------------------------------------------------------------------ exact -----------------


def test_exact_inner_is_weighted_kernel_sum():
    x, y = cells(12, batch=(3,), seed=1), cells(9, batch=(3,), seed=2, shift=0.5)
    g = torch.Generator().manual_seed(3)
    wx, wy = torch.rand(3, 12, generator=g, dtype=torch.float64), torch.rand(3, 9, generator=g, dtype=torch.float64)
    wx, wy = wx / wx.sum(-1, keepdim=True), wy / wy.sum(-1, keepdim=True)
    embedding = as_embedding("exact", kernel=as_kernel("matern52", lengthscale=1.3))
    assert not embedding.explicit
    got = embedding.inner(x, y, wx, wy)
    expected = [wx[b].numpy() @ gram("matern52", x[b], y[b], 1.3) @ wy[b].numpy() for b in range(3)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    uniform = embedding.inner(x, y, None, None)
    np.testing.assert_allclose(uniform.numpy(), [gram("matern52", x[b], y[b], 1.3).mean() for b in range(3)], rtol=1e-10)


def test_exact_inner_with_energy_kernel_gives_energy_distance():
    x, y = cells(15, seed=4), cells(11, seed=5, shift=0.7)
    e = as_embedding("exact", kernel="energy")
    got = e.inner(x, x, None, None) + e.inner(y, y, None, None) - 2 * e.inner(x, y, None, None)
    def d(a, b):
        return cdist(a.numpy(), b.numpy()).mean()

    assert got.item() == pytest.approx(2 * d(x, y) - d(x, x) - d(y, y), rel=1e-10)


def test_exact_features_raise_because_implicit():
    with pytest.raises(ConfigError, match="exact embedding is implicit.*'rff' or 'nystrom'"):
        as_embedding("exact").features(cells(5))


def test_exact_median_lengthscale_is_fixed_by_fit():
    x, y = cells(10, seed=6), cells(10, seed=7)
    embedding = as_embedding("exact", kernel=as_kernel("rbf", lengthscale="median"))
    with pytest.raises(NotFittedError, match=r"call fit\(cells\)"):
        embedding.inner(x, y, None, None)
    pooled = torch.cat([x, y])
    embedding.fit(pooled)
    med = np.median(pdist(pooled.numpy()))
    assert embedding.inner(x, y, None, None).item() == pytest.approx(gram("rbf", x, y, med).mean(), rel=1e-10)


# ------------------------------------------------------------------ random Fourier features ---


@pytest.mark.parametrize("name", ["rbf", "matern32"])
def test_rff_mmd_error_shrinks_like_inverse_sqrt_features(name):
    x, y = cells(30, genes=5, seed=8), cells(30, genes=5, seed=9, shift=0.4)
    kernel = as_kernel(name, lengthscale=2.0)
    exact = biased_mmd2(name, x, y, 2.0)
    sizes = [64, 256, 1024, 4096]
    errors = []
    for size in sizes:
        per_seed = []
        for seed in range(24):
            rff = as_embedding("rff", kernel=kernel, num_features=size, seed=seed)
            approx = (rff.mean_embedding(x) - rff.mean_embedding(y)).square().sum()
            per_seed.append(abs(approx.item() - exact))
        errors.append(np.mean(per_seed))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert -0.8 < slope < -0.25, (slope, errors)
    assert errors[-1] < 0.1 * exact


@pytest.mark.parametrize("name", list(PROFILES))
def test_rff_inner_products_approximate_kernel(name):
    x, y = cells(20, seed=10), cells(20, seed=11, shift=0.3)
    rff = as_embedding("rff", kernel=as_kernel(name, lengthscale=1.4), num_features=2**15, seed=1)
    approx = (rff.features(x) @ rff.features(y).T).numpy()
    # Each entry averages 2^14 bounded cosines: standard deviation <= 0.0056.
    assert np.abs(approx - gram(name, x, y, 1.4)).max() < 0.03
    assert rff.features(x).shape == (20, 2**15)


def test_rff_is_seeded_batched_and_differentiable():
    x = cells(7, batch=(3,), seed=12).requires_grad_(True)
    kernel = as_kernel("matern52", lengthscale=1.3)  # a fixed lengthscale: no fit needed
    a = as_embedding("rff", kernel=kernel, num_features=64, seed=5)
    b = as_embedding("rff", kernel=kernel, num_features=64, seed=5)
    c = as_embedding("rff", kernel=kernel, num_features=64, seed=6)
    phi = a.features(x)
    assert phi.shape == (3, 7, 64)
    torch.testing.assert_close(phi, b.features(x), rtol=0, atol=0)
    assert not torch.allclose(phi, c.features(x))
    assert torch.autograd.gradcheck(a.features, (x,))
    assert a.mean_embedding(x).shape == (3, 64)


def test_rff_follows_a_trainable_lengthscale():
    x, y = cells(10, seed=13), cells(10, seed=14, shift=0.3)
    kernel = as_kernel("rbf", lengthscale=1.0, trainable=True).double()
    rff = as_embedding("rff", kernel=kernel, num_features=2**15).fit(x)
    with torch.no_grad():
        kernel.raw_lengthscale.fill_(math.log(2.5))  # after the frequencies were drawn
    approx = (rff.features(x) @ rff.features(y).T).detach().numpy()
    assert np.abs(approx - gram("rbf", x, y, 2.5)).max() < 0.03
    # The gradient reaches the lengthscale: autograd against a central difference.
    small = as_embedding("rff", kernel=kernel, num_features=16, seed=2)
    def loss():
        return small.features(x).sin().sum()

    (grad,) = torch.autograd.grad(loss(), kernel.raw_lengthscale)
    with torch.no_grad():
        kernel.raw_lengthscale += 1e-6
        up = loss()
        kernel.raw_lengthscale -= 2e-6
        down = loss()
    assert grad.item() == pytest.approx(((up - down) / 2e-6).item(), rel=1e-6)
    assert abs(grad.item()) > 1e-3


def test_rff_median_lengthscale_is_fixed_by_fit():
    pooled = cells(25, seed=15)
    rff = as_embedding("rff", kernel=as_kernel("rbf", lengthscale="median"), num_features=2**15)
    with pytest.raises(NotFittedError, match=r"'median' lengthscale; call fit\(cells\)"):
        rff.features(pooled)
    rff.fit(pooled.reshape(5, 5, 4))  # batched fit cells are pooled
    med = np.median(pdist(pooled.numpy()))
    assert rff.kernel.lengthscale.item() == pytest.approx(med, rel=1e-12)
    approx = (rff.features(pooled) @ rff.features(pooled).T).numpy()
    assert np.abs(approx - gram("rbf", pooled, pooled, med)).max() < 0.03


@pytest.mark.parametrize("kernel", ["energy", "mixture", lambda: as_kernel("gpytorch", class_name="RBFKernel")])
def test_rff_needs_a_spectral_sampler(kernel):
    kernel = kernel() if callable(kernel) else as_kernel(kernel, **({"relative": False} if kernel == "mixture" else {}))
    rff = as_embedding("rff", kernel=kernel, num_features=8)
    with pytest.raises(ConfigError, match="no spectral density sampler.*nystrom"):
        rff.features(cells(5))


def test_rff_bad_input():
    rff = as_embedding("rff", num_features=8).fit(cells(5, genes=4))
    with pytest.raises(InputError, match="x has 3 genes but the random features were drawn for 4"):
        rff.features(cells(5, genes=3))
    bad = cells(5)
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf"):
        rff.features(bad)
    with pytest.raises(InputError, match="empty set"):
        rff.features(cells(0))
    with pytest.raises(InputError, match="must be even"):
        as_embedding("rff", num_features=7)
    with pytest.raises(InputError, match="num_features must be a positive integer"):
        as_embedding("rff", num_features=0)


# ------------------------------------------------------------------ Nystrom -----------------


@pytest.mark.parametrize("name", ["rbf", "matern52"])
def test_nystrom_with_all_points_as_landmarks_is_exact(name):
    x = cells(40, seed=16, batch=(2,))
    nystrom = as_embedding("nystrom", kernel=as_kernel(name, lengthscale=1.5), num_landmarks=80).fit(x)
    phi = nystrom.features(x)
    assert phi.shape == (2, 40, nystrom.num_features)
    for b in range(2):
        assert np.abs((phi[b] @ phi[b].T).numpy() - gram(name, x[b], x[b], 1.5)).max() < 1e-6


def test_nystrom_error_decreases_with_more_landmarks():
    fit, held_out = cells(80, genes=3, seed=17), cells(30, genes=3, seed=18, shift=0.2)
    reference = gram("rbf", held_out, held_out, 1.5)
    errors, residual_traces = [], []
    for landmarks in (4, 8, 16, 32, 64):
        nystrom = as_embedding("nystrom", kernel=as_kernel("rbf", lengthscale=1.5), num_landmarks=landmarks).fit(fit)
        phi = nystrom.features(held_out).numpy()
        errors.append(np.linalg.norm(reference - phi @ phi.T) / np.linalg.norm(reference))
        residual_traces.append(np.trace(reference - phi @ phi.T))
    # The same seed gives nested landmark sets, so the PSD residual K - Phi Phi^T shrinks in
    # Loewner order: its trace and Frobenius norm decrease at every step.
    assert all(a > b for a, b in zip(residual_traces, residual_traces[1:])), residual_traces
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0], errors


def test_nystrom_float32_features_are_stable():
    x = cells(60, seed=19)
    nystrom = as_embedding("nystrom", kernel=as_kernel("rbf", lengthscale=1.0), num_landmarks=60).fit(x.float())
    phi = nystrom.features(x.float())
    assert phi.dtype == torch.float32
    assert np.abs((phi @ phi.T).double().numpy() - gram("rbf", x, x, 1.0)).max() < 1e-3


def test_nystrom_state_dict_round_trip_and_median():
    x = cells(30, seed=20)
    fitted = as_embedding("nystrom", kernel="matern32", num_landmarks=10, seed=3).fit(x)
    fresh = as_embedding("nystrom", kernel="matern32", num_landmarks=10, seed=4)
    fresh.load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh.features(x), fitted.features(x))
    median = as_embedding("nystrom", kernel=as_kernel("rbf", lengthscale="median"), num_landmarks=30).fit(x)
    assert median.kernel.lengthscale.item() == pytest.approx(np.median(pdist(x.numpy())), rel=1e-12)


@pytest.mark.parametrize("name", ["exact", "rff", "nystrom"])
def test_a_fitted_median_lengthscale_survives_a_state_dict_round_trip(name):
    x = cells(30, seed=21)
    params = {"nystrom": {"num_landmarks": 10}, "rff": {"num_features": 64}}.get(name, {})
    fitted = as_embedding(name, kernel="rbf", **params).fit(x)  # rbf's default lengthscale: median
    fresh = as_embedding(name, kernel="rbf", **params)
    fresh.load_state_dict(fitted.state_dict())
    assert not fresh.kernel.adaptive
    assert fresh.kernel.lengthscale.item() == pytest.approx(np.median(pdist(x.numpy())), rel=1e-12)
    y = cells(20, seed=22)
    torch.testing.assert_close(fresh.inner(x, y, None, None), fitted.inner(x, y, None, None))


def test_nystrom_bad_use():
    nystrom = as_embedding("nystrom", num_landmarks=5)
    with pytest.raises(NotFittedError, match=r"call fit\(cells\)"):
        nystrom.features(cells(5))
    nystrom.fit(cells(12))
    with pytest.raises(InputError, match="x has 3 genes but landmarks has 4"):
        nystrom.features(cells(5, genes=3))
    with pytest.raises(ConfigError, match="positive-definite kernel"):
        as_embedding("nystrom", kernel="energy")
    with pytest.raises(InputError, match="num_landmarks must be a positive integer"):
        as_embedding("nystrom", num_landmarks=-3)
    with pytest.raises(InputError, match="NaN or Inf"):
        as_embedding("nystrom").fit(cells(4) / 0.0)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownPluginError, match="known names: exact, nystrom, rff"):
        as_embedding("fourier")
    with pytest.raises(UnknownPluginError, match="known names:.*rbf"):
        as_embedding("rff", kernel="gauss")
