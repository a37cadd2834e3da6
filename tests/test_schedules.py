"""Noise schedules against closed forms in float64 NumPy, and the forward process's moments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perturbdiff_core.diffusion.schedules import MAX_FINAL_ALPHA_BAR, NoiseSchedule
from perturbdiff_core.errors import ConfigError, InputError, UnknownPluginError
from perturbdiff_core.registry import load, names

SCHEDULES = ["linear", "cosine", "power_cosine"]


def _cosine_f(t: np.ndarray, T: int, s: float) -> np.ndarray:
    return np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


def test_builtin_schedules_are_registered():
    assert set(SCHEDULES) <= set(names("perturbdiff.schedules"))


def test_linear_alpha_bar_is_product_of_one_minus_beta():
    sched = load("perturbdiff.schedules", "linear")
    betas = np.linspace(1e-4, 0.02, 1000)
    expected = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
    np.testing.assert_allclose(sched.alpha_bars.numpy(), expected, rtol=1e-12, atol=0)
    t = torch.tensor([0, 1, 17, 500, 1000])
    np.testing.assert_allclose(sched.alpha_bar(t).numpy(), expected[t.numpy()], rtol=1e-12)


@pytest.mark.parametrize("T, s", [(1000, 0.008), (250, 0.02)])
def test_cosine_matches_nichol_dhariwal_formula(T, s):
    sched = load("perturbdiff.schedules", "cosine", num_steps=T, s=s)
    t = np.arange(T + 1)
    f = _cosine_f(t, T, s) / _cosine_f(np.zeros(1), T, s)
    ab = sched.alpha_bars.numpy()
    # Away from t = T no beta reaches the 0.999 clip, so alpha_bar is the formula itself.
    np.testing.assert_allclose(ab[:T], f[:T], rtol=1e-9, atol=1e-300)
    # At t = T the formula gives 0, i.e. beta_T = 1, clipped to 0.999.
    assert f[T] < 1e-30
    np.testing.assert_allclose(ab[T], ab[T - 1] * (1 - 0.999), rtol=1e-12)


@pytest.mark.parametrize("power", [0.5, 2.0, 3.0])
def test_power_cosine_is_cosine_to_a_power(power):
    T, s = 400, 0.008
    sched = load("perturbdiff.schedules", "power_cosine", num_steps=T, power=power)
    t = np.arange(T)
    expected = (_cosine_f(t, T, s) / _cosine_f(np.zeros(1), T, s)) ** power
    ab = sched.alpha_bars.numpy()
    unclipped = np.concatenate([[True], 1 - expected[1:] / expected[:-1] < 0.999])
    np.testing.assert_allclose(ab[:T][unclipped], expected[unclipped], rtol=1e-9)
    assert unclipped[: T - 2].all()


def test_power_one_is_the_cosine_schedule():
    a = load("perturbdiff.schedules", "power_cosine", num_steps=300, power=1.0).alpha_bars
    b = load("perturbdiff.schedules", "cosine", num_steps=300).alpha_bars
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", SCHEDULES)
def test_alpha_bar_is_one_at_zero_strictly_decreasing_and_in_unit_interval(name):
    ab = load("perturbdiff.schedules", name).alpha_bars
    assert ab.dtype == torch.float64 and ab.shape == (1001,)
    assert ab[0] == 1.0
    assert (ab[1:] < ab[:-1]).all()
    assert (ab > 0).all() and (ab <= 1).all()
    assert ab[-1] <= MAX_FINAL_ALPHA_BAR


@pytest.mark.parametrize("name", SCHEDULES)
def test_config_rebuilds_the_same_schedule(name):
    params = {"num_steps": 800} | ({"power": 1.7} if name == "power_cosine" else {})
    sched = load("perturbdiff.schedules", name, **params)
    rebuilt = load("perturbdiff.schedules", name, **sched.config())
    assert isinstance(rebuilt, NoiseSchedule) and rebuilt.config() == sched.config()
    torch.testing.assert_close(rebuilt.alpha_bars, sched.alpha_bars, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_moments(name):
    sched = load("perturbdiff.schedules", name)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 6, generator=gen, dtype=torch.float64) * 2 + 1
    n = 200_000
    for step in (1, 100, 500, 900):
        t = torch.full((n,), step)
        noise = torch.randn(n, 1, 6, generator=gen, dtype=torch.float64)
        xt = sched.q_sample(x0.expand(n, 1, 6), t, noise)
        ab = sched.alpha_bar(step).item()
        se = math.sqrt((1 - ab) / n)
        np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(ab) * x0[0].numpy(), atol=5 * se)
        # Var of a sample variance ~ 2 sigma^4 / n.
        np.testing.assert_allclose(xt.var(0).numpy(), 1 - ab, atol=5 * (1 - ab) * math.sqrt(2 / n))


def test_q_sample_is_exact_formula():
    sched = load("perturbdiff.schedules", "cosine", num_steps=50)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64), torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 25, 50])
    ab = sched.alpha_bars.numpy()[t.numpy()][:, None, None]
    expected = np.sqrt(ab) * x0.numpy() + np.sqrt(1 - ab) * noise.numpy()
    np.testing.assert_allclose(sched.q_sample(x0, t, noise).numpy(), expected, rtol=1e-12)


def test_bad_time_steps_and_parameters_raise_clear_errors():
    sched = load("perturbdiff.schedules", "cosine", num_steps=100)
    with pytest.raises(InputError, match=r"\[0, 100\]"):
        sched.alpha_bar(torch.tensor([101]))
    with pytest.raises(InputError, match="integers"):
        sched.alpha_bar(torch.tensor([0.5]))
    with pytest.raises(InputError, match="noise has shape"):
        sched.q_sample(torch.zeros(2, 3, 4), torch.tensor([1, 2]), torch.zeros(2, 3, 5))
    with pytest.raises(ConfigError, match="not pure noise"):
        _ = load("perturbdiff.schedules", "linear", num_steps=50).alpha_bars
    with pytest.raises(ConfigError, match="beta_start"):
        load("perturbdiff.schedules", "linear", beta_start=0.1, beta_end=0.01)
    with pytest.raises(ConfigError, match="num_steps"):
        load("perturbdiff.schedules", "cosine", num_steps=0)
    with pytest.raises(ConfigError, match="power"):
        load("perturbdiff.schedules", "power_cosine", power=-1.0)
    with pytest.raises(UnknownPluginError, match="powr"):
        load("perturbdiff.schedules", "cosine", powr=2.0)
