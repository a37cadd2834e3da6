"""Tests of the example plug-in: perturbdiff's conformance kit and the closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from perturbdiff_example_kernel import RationalQuadratic
from scipy.spatial.distance import cdist


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_conformance(alpha: float) -> None:
    testing = pytest.importorskip(
        "perturbdiff_core.testing", reason="this perturbdiff has no perturbdiff_core.testing.check_kernel yet"
    )
    testing.check_kernel(RationalQuadratic(lengthscale=1.3, alpha=alpha))


@pytest.mark.parametrize("alpha", [0.3, 1.0, 5.0])
def test_matches_numpy_formula(alpha: float) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    kernel = RationalQuadratic(lengthscale=1.7, alpha=alpha)
    l2 = kernel.lengthscale.square().item()  # the core keeps l as a float32 log: use the value kept
    expected = (1 + cdist(x.numpy(), y.numpy(), "sqeuclidean") / (2 * alpha * l2)) ** -alpha
    got = kernel(x, y)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_random_features_approximate_kernel() -> None:
    # E[cos(w.(x - y))] over the spectral density is the kernel (Bochner).
    kernel = RationalQuadratic(lengthscale=1.5, alpha=0.8)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    w = kernel.sample_spectral(200_000, 3, generator=generator)
    estimate = torch.cos((x[:, None] - x[None]) @ w.T).mean(-1)
    torch.testing.assert_close(estimate, kernel(x).detach(), atol=1e-2, rtol=0)


def test_rejects_bad_alpha() -> None:
    from perturbdiff_core.errors import InputError

    with pytest.raises(InputError, match="positive alpha"):
        RationalQuadratic(alpha=0.0)
