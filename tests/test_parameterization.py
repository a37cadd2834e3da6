"""x0 / eps / v conversions: every route recovers the truth in float64, against NumPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff_core.errors import ConfigError
from perturbdiff_core.parameterization import PARAMETERIZATIONS, target, to_eps, to_v, to_x0
from perturbdiff_core.registry import load

CONVERT = {"x0": to_x0, "eps": to_eps, "v": to_v}


@pytest.fixture(scope="module")
def draw():
    """Random sets at time steps across the whole cosine schedule, and their NumPy truths."""
    sched = load("perturbdiff.schedules", "cosine")
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 3, 50, 250, 500, 750, 950, 999])
    x0 = torch.randn(len(t), 7, 5, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    eps = torch.randn(len(t), 7, 5, generator=gen, dtype=torch.float64)
    ab = sched.alpha_bar(t)
    a = np.sqrt(ab.numpy())[:, None, None]
    s = np.sqrt(1 - ab.numpy())[:, None, None]
    truth = {"x0": x0.numpy(), "eps": eps.numpy(), "v": a * eps.numpy() - s * x0.numpy()}  # Salimans & Ho, v
    x_t = torch.from_numpy(a * x0.numpy() + s * eps.numpy())
    return x0, eps, ab, x_t, truth


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_target_is_the_quantity_named(draw, kind):
    x0, eps, ab, _, truth = draw
    np.testing.assert_allclose(target(kind, x0, eps, ab).numpy(), truth[kind], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("source", PARAMETERIZATIONS)
@pytest.mark.parametrize("dest", PARAMETERIZATIONS)
def test_every_conversion_recovers_the_truth(draw, source, dest):
    x0, eps, ab, x_t, truth = draw
    pred = torch.from_numpy(truth[source])
    out = CONVERT[dest](pred, source, x_t, ab)
    # eps -> x0 divides by sqrt(alpha_bar) ~ 4e-3 at t = 999: allow for that amplification.
    np.testing.assert_allclose(out.numpy(), truth[dest], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_round_trips_through_the_other_parameterisations(draw, kind):
    x0, eps, ab, x_t, truth = draw
    pred = torch.from_numpy(truth[kind])
    for other in PARAMETERIZATIONS:
        there = CONVERT[other](pred, kind, x_t, ab)
        back = CONVERT[kind](there, other, x_t, ab)
        np.testing.assert_allclose(back.numpy(), pred.numpy(), rtol=1e-9, atol=1e-9)


def test_scalar_alpha_bar_broadcasts_like_per_set_values(draw):
    x0, eps, ab, x_t, truth = draw
    one = to_eps(x0[:1], "x0", x_t[:1], ab[0])
    np.testing.assert_allclose(one.numpy(), truth["eps"][:1], rtol=1e-9, atol=1e-9)


def test_float32_conversions_follow_the_data_dtype(draw):
    x0, eps, ab, x_t, truth = draw
    out = to_x0(torch.from_numpy(truth["v"]).float(), "v", x_t.float(), ab)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), truth["x0"], atol=1e-5)


def test_unknown_parameterisation_is_a_config_error(draw):
    x0, eps, ab, x_t, _ = draw
    with pytest.raises(ConfigError, match="x0, eps, v"):
        to_x0(x0, "score", x_t, ab)
