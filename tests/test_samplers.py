"""Time-step grids, DDPM/DDIM steps against independent derivations, and the sampling loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perturbdiff_core.diffusion.samplers import DDIMStep, DDPMStep, sample, timestep_grid
from perturbdiff_core.errors import ConfigError, InputError
from perturbdiff_core.registry import load


@pytest.fixture(scope="module")
def sched():
    return load("perturbdiff.schedules", "cosine")


@pytest.mark.parametrize("T, n", [(1000, 50), (1000, 7), (1000, 1), (1000, 1000), (10, 3), (37, 36), (100, 100)])
def test_grid_starts_at_T_and_decreases_strictly(T, n):
    grid = timestep_grid(T, n)
    assert grid.dtype == torch.long and grid.shape == (n,)
    assert grid[0] == T
    assert (grid[1:] < grid[:-1]).all()
    assert grid[-1] >= 1
    # Evenly spaced: t_k = round(k T / n).
    expected = [math.floor(k * T / n + 0.5) for k in range(n, 0, -1)]
    assert grid.tolist() == expected


def test_full_grid_is_every_step():
    assert timestep_grid(20, 20).tolist() == list(range(20, 0, -1))


def test_grid_rejects_more_steps_than_the_schedule():
    with pytest.raises(ConfigError, match="at most 10"):
        timestep_grid(10, 11)
    with pytest.raises(ConfigError, match="num_sampling_steps = 0 is out of range; set num_sampling_steps to an integer > 0"):
        timestep_grid(10, 0)


def _random_state(seed: int = 0, shape=(3, 4, 5)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64) + 1


def _pairs(sched, n):
    grid = timestep_grid(sched.num_steps, n).tolist()
    return list(zip(grid, grid[1:] + [0]))


@pytest.mark.parametrize("n", [1000, 13])
def test_ddim_eta0_is_euler_step_of_the_probability_flow_ode(sched, n):
    # Song et al. (2021), eq. 14: with y = x / sqrt(ab) and s = sqrt((1 - ab) / ab), the
    # deterministic DDIM update is the Euler step dy = eps_hat ds.
    x_t, x0 = _random_state()
    step = DDIMStep(eta=0.0)
    for t, t_prev in _pairs(sched, n)[::7]:
        ab_t, ab_p = sched.alpha_bars[t].item(), sched.alpha_bars[t_prev].item()
        eps_hat = (x_t.numpy() - math.sqrt(ab_t) * x0.numpy()) / math.sqrt(1 - ab_t)
        s_t, s_p = math.sqrt((1 - ab_t) / ab_t), math.sqrt((1 - ab_p) / ab_p)
        y_prev = x_t.numpy() / math.sqrt(ab_t) + (s_p - s_t) * eps_hat
        out = step(x_t, x0, t, t_prev, sched)
        np.testing.assert_allclose(out.numpy(), math.sqrt(ab_p) * y_prev, rtol=1e-8, atol=1e-8)


def _gaussian_posterior(x_t, x0, ab_t, ab_s):
    """q(x_s | x_t, x0) by conditioning the joint Gaussian of (x_s, x_t) given x0."""
    cov = math.sqrt(ab_t / ab_s) * (1 - ab_s)  # Cov(x_s, x_t)
    mean = math.sqrt(ab_s) * x0 + cov / (1 - ab_t) * (x_t - math.sqrt(ab_t) * x0)
    return mean, (1 - ab_s) - cov**2 / (1 - ab_t)


@pytest.mark.parametrize("n", [1000, 20])
def test_ddpm_and_ddim_eta1_are_the_gaussian_posterior(sched, n):
    x_t, x0 = _random_state(1)
    for t, t_prev in _pairs(sched, n)[::3]:
        ab_t, ab_s = sched.alpha_bars[t].item(), sched.alpha_bars[t_prev].item()
        mean, var = _gaussian_posterior(x_t.numpy(), x0.numpy(), ab_t, ab_s)
        for step in (DDPMStep(), DDIMStep(eta=1.0)):
            m, std = step.mean_std(x_t, x0, sched.alpha_bars[t], sched.alpha_bars[t_prev])
            np.testing.assert_allclose(m.numpy(), mean, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(std.item() ** 2, var, rtol=1e-8, atol=1e-14)


def test_ddpm_full_steps_match_ho_et_al_eq7_with_betas(sched):
    # Ho et al. (2020), eq. 7, with the schedule's own betas.
    betas = sched.betas().numpy()
    x_t, x0 = _random_state(2)
    for t in (1, 2, 300, 999, 1000):
        ab_t, ab_p, beta = sched.alpha_bars[t].item(), sched.alpha_bars[t - 1].item(), betas[t - 1]
        mean = math.sqrt(ab_p) * beta / (1 - ab_t) * x0.numpy() + math.sqrt(1 - beta) * (1 - ab_p) / (1 - ab_t) * x_t.numpy()
        m, std = DDPMStep().mean_std(x_t, x0, sched.alpha_bars[t], sched.alpha_bars[t - 1])
        np.testing.assert_allclose(m.numpy(), mean, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(std.item() ** 2, (1 - ab_p) / (1 - ab_t) * beta, rtol=1e-8, atol=1e-300)


def test_stochastic_steps_draw_noise_with_the_stated_std(sched):
    x_t, x0 = _random_state(3, shape=(1, 1, 4))
    n = 100_000
    gen = torch.Generator().manual_seed(0)
    for step in (DDPMStep(), DDIMStep(eta=0.5)):
        out = step(x_t.expand(n, 1, 4), x0.expand(n, 1, 4), 600, 550, sched, gen)
        mean, std = step.mean_std(x_t, x0, sched.alpha_bars[600], sched.alpha_bars[550])
        np.testing.assert_allclose(out.mean(0).numpy(), mean[0].numpy(), atol=5 * std.item() / math.sqrt(n))
        np.testing.assert_allclose(out.std(0).numpy(), std.item(), rtol=0.02)


def test_deterministic_step_consumes_no_randomness(sched):
    x_t, x0 = _random_state(4)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    DDIMStep(0.0)(x_t, x0, 500, 400, sched, gen)
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("step", [DDIMStep(0.0), DDIMStep(0.5), DDPMStep()], ids=repr)
@pytest.mark.parametrize("n", [1, 10, 1000])
def test_oracle_x0_predictor_recovers_x0(sched, step, n):
    x0 = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 + 1
    out = sample(lambda x, t, prev: x0, x0.shape, sched, timestep_grid(1000, n), step,
                 generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(out.numpy(), x0.numpy(), rtol=1e-9, atol=1e-9)


def test_ddim_eta0_with_oracle_keeps_the_initial_noise_direction(sched):
    # With x0_hat = x0 throughout, DDIM keeps eps_hat fixed: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps_T.
    x0 = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    seen = []

    def oracle(x, t, prev):
        seen.append((int(t[0]), x.clone()))
        return x0

    sample(oracle, x0.shape, sched, timestep_grid(1000, 25), DDIMStep(0.0), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (t_first, x_first), rest = seen[0], seen[1:]
    ab = sched.alpha_bars
    eps = (x_first - ab[t_first].sqrt() * x0) / (1 - ab[t_first]).sqrt()
    for t, x in rest:
        np.testing.assert_allclose(x.numpy(), (ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps).numpy(), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("step", [DDIMStep(0.0), DDPMStep()], ids=repr)
def test_exact_gaussian_denoiser_samples_the_data_distribution(sched, step):
    # For x0 ~ N(m, s^2) per gene, E[x0 | x_t] = m + s^2 sqrt(ab) / (ab s^2 + 1 - ab) (x_t - sqrt(ab) m).
    m = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    s = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)

    def posterior_mean(x, t, prev):
        ab = sched.alpha_bar(t)[:, None, None]
        return m + s**2 * ab.sqrt() / (ab * s**2 + 1 - ab) * (x - ab.sqrt() * m)

    n = 8000
    x = sample(posterior_mean, (1, n, 3), sched, timestep_grid(1000, 1000), step,
               generator=torch.Generator().manual_seed(0), dtype=torch.float64)[0]
    # Four standard errors: s / sqrt(n) for the mean, about 1 / sqrt(2 n) relative for the std.
    assert ((x.mean(0) - m).abs() < 4 * s / math.sqrt(n)).all()
    np.testing.assert_allclose(x.std(0).numpy(), s.numpy(), rtol=4 / math.sqrt(2 * n))


def test_loop_calls_the_model_once_per_grid_entry_with_self_conditioning(sched):
    grid = timestep_grid(1000, 9)
    calls = []

    def model(x, t, prev):
        assert t.dtype == torch.long and t.shape == (4,) and (t == t[0]).all()
        calls.append((int(t[0]), prev))
        return torch.full_like(x, float(len(calls)))

    sample(model, (4, 3, 2), sched, grid, DDPMStep(), generator=torch.Generator().manual_seed(0))
    assert [t for t, _ in calls] == grid.tolist()
    assert calls[0][1] is None
    for k, (_, prev) in enumerate(calls[1:], start=1):
        assert torch.equal(prev, torch.full((4, 3, 2), float(k)))


def test_same_generator_seed_gives_the_same_samples(sched):
    def model(x, t, prev):
        return 0.5 * x

    grid = timestep_grid(1000, 5)
    a = sample(model, (2, 3, 4), sched, grid, DDPMStep(), generator=torch.Generator().manual_seed(3))
    b = sample(model, (2, 3, 4), sched, grid, DDPMStep(), generator=torch.Generator().manual_seed(3))
    c = sample(model, (2, 3, 4), sched, grid, DDPMStep(), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_grids_and_steps_raise_clear_errors(sched):
    def model(x, t, prev):
        return x

    with pytest.raises(InputError, match="start at t = T"):
        sample(model, (1, 2, 3), sched, torch.tensor([100, 50]), DDPMStep())
    with pytest.raises(InputError, match="decrease strictly"):
        sample(model, (1, 2, 3), sched, torch.tensor([1000, 500, 500]), DDPMStep())
    with pytest.raises(ConfigError, match="eta"):
        DDIMStep(eta=1.5)
    with pytest.raises(InputError, match="t_prev < t"):
        DDPMStep()(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), 10, 10, sched)
