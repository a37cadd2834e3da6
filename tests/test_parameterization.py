"""x0 / eps / v / edm conversions: every route recovers the truth in float64, against NumPy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff_core.diffusion.parameterization import PARAMETERIZATIONS, DataScale, target, to_eps, to_v, to_x0
from perturbdiff_core.errors import ConfigError
from perturbdiff_core.registry import load

CONVERT = {
    "x0": to_x0,
    "eps": to_eps,
    "v": to_v,
    # edm's network output of a prediction: its target at the prediction's x0 and eps estimates
    "edm": lambda pred, kind, x_t, ab, data: target(
        "edm", to_x0(pred, kind, x_t, ab, data), to_eps(pred, kind, x_t, ab, data), ab, data
    ),
}
#: Per-gene mean and scale of the edm preconditioning (5 genes, scales over two orders of magnitude).
DATA = DataScale(torch.tensor([0.3, -1.0, 0.0, 2.0, 0.05], dtype=torch.float64),
                 torch.tensor([1.5, 0.05, 1.0, 0.4, 0.01], dtype=torch.float64))


def edm_truth(x0: np.ndarray, eps: np.ndarray, a: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Karras et al. (2022) eq. 7 in NumPy: F = (x0 - mu - c_skip (x_t / a - mu)) / c_out, sigma' = s / a."""
    mu, scale = DATA.mean.numpy(), DATA.scale.numpy()
    noise = s / a
    c_skip = scale**2 / (noise**2 + scale**2)
    c_out = noise * scale / np.sqrt(noise**2 + scale**2)
    return (x0 - mu - c_skip * (x0 + noise * eps - mu)) / c_out


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
    truth = {"x0": x0.numpy(), "eps": eps.numpy(), "v": a * eps.numpy() - s * x0.numpy(),  # Salimans & Ho, v
             "edm": edm_truth(x0.numpy(), eps.numpy(), a, s)}
    x_t = torch.from_numpy(a * x0.numpy() + s * eps.numpy())
    return x0, eps, ab, x_t, truth


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_target_is_the_quantity_named(draw, kind):
    x0, eps, ab, _, truth = draw
    np.testing.assert_allclose(target(kind, x0, eps, ab, DATA).numpy(), truth[kind], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("source", PARAMETERIZATIONS)
@pytest.mark.parametrize("dest", PARAMETERIZATIONS)
def test_every_conversion_recovers_the_truth(draw, source, dest):
    x0, eps, ab, x_t, truth = draw
    pred = torch.from_numpy(truth[source])
    out = CONVERT[dest](pred, source, x_t, ab, DATA)
    # eps -> x0 divides by sqrt(alpha_bar) ~ 4e-3 at t = 999: allow for that amplification.
    np.testing.assert_allclose(out.numpy(), truth[dest], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
def test_round_trips_through_the_other_parameterisations(draw, kind):
    x0, eps, ab, x_t, truth = draw
    pred = torch.from_numpy(truth[kind])
    for other in PARAMETERIZATIONS:
        there = CONVERT[other](pred, kind, x_t, ab, DATA)
        back = CONVERT[kind](there, other, x_t, ab, DATA)
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
    with pytest.raises(ConfigError, match="x0, eps, v, edm"):
        to_x0(x0, "score", x_t, ab)


def test_edm_is_x0_with_a_skip_of_the_noisy_input(draw):
    """With mean 0 and scale 1 edm is v with F = -v; as the noise vanishes the estimate is x_t / alpha itself."""
    x0, eps, ab, x_t, truth = draw
    unit = DataScale(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    np.testing.assert_allclose(to_x0(-torch.from_numpy(truth["v"]), "edm", x_t, ab, unit).numpy(), truth["x0"], atol=1e-9)
    tiny = torch.full((1,), 1e-12, dtype=torch.float64)
    skipped = to_x0(torch.zeros_like(x_t[:1]), "edm", x_t[:1], 1.0 - tiny, DATA)
    np.testing.assert_allclose(skipped.numpy(), x_t[:1].numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match="needs the data's per-gene mean and scale"):
        to_x0(x0, "edm", x_t, ab)
