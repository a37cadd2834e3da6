r"""Reverse-process sampling, kept as three separate pieces.

1. the schedule (:math:`\bar\alpha_t`, :mod:`perturbdiff_core.diffusion.schedules`);
2. the grid of time steps the model is called at, :func:`timestep_grid`, which always starts at
   ``t = T`` and is followed by ``t = 0``;
3. a :class:`SamplerStep` ``(x_t, x0_pred, t, t_prev) -> x_prev`` for any pair ``t_prev < t``
   of the grid (so respaced grids need no re-derivation of the previous step).

One loop, :func:`sample`, drives them. Both steps sample from a Gaussian
:math:`N(\mu(x_t, \hat x_0), \sigma^2 I)`; with ``t_prev = 0`` the variance is 0 and the
result is :math:`\hat x_0` itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from ..constraints import Positive, UnitInterval
from ..errors import ConfigError, InputError
from .parameterization import to_eps
from .schedules import NoiseSchedule, expand_as_sets

#: ``model_fn(x_t, t, prev_x0) -> x0_pred``: ``x_t`` is ``(B, S, G)``, ``t`` is ``(B,)`` long,
#: ``prev_x0`` is the previous step's estimate (``None`` at the first step; for self-conditioning).
ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def timestep_grid(num_steps_total: int, num_sampling_steps: int) -> Tensor:
    r"""Model-call time steps :math:`t_k = \lfloor kT/n + 1/2 \rfloor`, ``k = n, ..., 1`` (long ``(n,)``).

    Starts at ``t = T`` (the "trailing" spacing Lin et al. 2024, table 2, recommend, so the
    first call sees pure noise) and decreases strictly to :math:`\approx T/n \ge 1`; the
    loop then steps to ``t = 0``. ``n = T`` gives every step ``T, T-1, ..., 1``.
    """
    for name, value in (("num_steps_total", num_steps_total), ("num_sampling_steps", num_sampling_steps)):
        Positive.check(value, name, integer=True)
    if num_sampling_steps > num_steps_total:
        raise ConfigError(
            f"cannot sample in {num_sampling_steps} steps from a {num_steps_total}-step schedule; "
            f"use at most {num_steps_total} sampling steps."
        )
    k = torch.arange(num_sampling_steps, 0, -1, dtype=torch.long)
    # Round half up in integer arithmetic: floor((2 k T + n) / (2 n)).
    return (2 * k * num_steps_total + num_sampling_steps) // (2 * num_sampling_steps)


class SamplerStep(ABC):
    r"""One reverse step :math:`x_t \to x_{t'}`, :math:`t' < t`, given a clean-data estimate :math:`\hat x_0`."""

    @abstractmethod
    def mean_std(self, x_t: Tensor, x0_pred: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor) -> tuple[Tensor, Tensor]:
        r"""Mean ``(B, ...)`` and standard deviation (float64 scalar) of :math:`x_{t'}`.

        ``alpha_bar_t`` and ``alpha_bar_prev`` are float64 scalars :math:`\bar\alpha_t`, :math:`\bar\alpha_{t'}`.
        """

    def __call__(
        self,
        x_t: Tensor,
        x0_pred: Tensor,
        t: int,
        t_prev: int,
        schedule: NoiseSchedule,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw :math:`x_{t'}`; no noise is drawn when the step is deterministic."""
        if not 0 <= t_prev < t <= schedule.num_steps:
            raise InputError(f"a reverse step needs 0 <= t_prev < t <= {schedule.num_steps}, got t={t}, t_prev={t_prev}.")
        mean, std = self.mean_std(x_t, x0_pred, schedule.alpha_bar(t), schedule.alpha_bar(t_prev))
        if std == 0:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + expand_as_sets(std, mean) * noise


class DDPMStep(SamplerStep):
    r"""Ancestral step from the posterior :math:`q(x_{t'} \mid x_t, \hat x_0)` (Ho et al. 2020, eqs. 6-7).

    Generalised to any :math:`t' < t` with :math:`\alpha_{t|t'} = \bar\alpha_t / \bar\alpha_{t'}`,
    :math:`\beta_{t|t'} = 1 - \alpha_{t|t'}`:

    .. math::
        \mu = \frac{\sqrt{\bar\alpha_{t'}}\,\beta_{t|t'}}{1 - \bar\alpha_t} \hat x_0
            + \frac{\sqrt{\alpha_{t|t'}}\,(1 - \bar\alpha_{t'})}{1 - \bar\alpha_t} x_t,
        \qquad
        \sigma^2 = \tilde\beta = \frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}\,\beta_{t|t'}.
    """

    def mean_std(self, x_t: Tensor, x0_pred: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor) -> tuple[Tensor, Tensor]:
        alpha = alpha_bar_t / alpha_bar_prev
        beta = 1.0 - alpha
        coef_x0 = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar_t)
        coef_xt = alpha.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
        mean = expand_as_sets(coef_x0, x0_pred) * x0_pred + expand_as_sets(coef_xt, x_t) * x_t
        return mean, ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta).sqrt()

    def __repr__(self) -> str:
        return "DDPMStep()"


class DDIMStep(SamplerStep):
    r"""DDIM step (Song et al. 2021, eq. 12), :math:`0 \le \eta \le 1`.

    .. math::
        x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t'} - \sigma^2}\,\hat\epsilon + \sigma z,
        \qquad \sigma = \eta \sqrt{\frac{1 - \bar\alpha_{t'}}{1 - \bar\alpha_t}}
        \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_{t'}}},

    with :math:`\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\hat x_0) / \sqrt{1 - \bar\alpha_t}`.
    ``eta = 0`` is deterministic; ``eta = 1`` is the DDPM posterior (same mean and variance).
    """

    def __init__(self, eta: float = 0.0) -> None:
        self.eta = float(UnitInterval.check(eta, "eta"))

    def mean_std(self, x_t: Tensor, x0_pred: Tensor, alpha_bar_t: Tensor, alpha_bar_prev: Tensor) -> tuple[Tensor, Tensor]:
        eps = to_eps(x0_pred, "x0", x_t, alpha_bar_t)
        sigma = self.eta * ((1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)).sqrt()
        coef_eps = (1.0 - alpha_bar_prev - sigma.square()).clamp_min(0.0).sqrt()
        mean = expand_as_sets(alpha_bar_prev.sqrt(), x0_pred) * x0_pred + expand_as_sets(coef_eps, eps) * eps
        return mean, sigma

    def __repr__(self) -> str:
        return f"DDIMStep(eta={self.eta})"


def _check_grid(grid: Tensor, schedule: NoiseSchedule) -> list[int]:
    steps = torch.as_tensor(grid).tolist()
    if not steps or steps[0] != schedule.num_steps:
        raise InputError(
            f"the sampling grid must start at t = T = {schedule.num_steps} (pure noise), got "
            f"{steps[:1]}; build it with timestep_grid(T, n)."
        )
    if any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] < 1:
        raise InputError("the sampling grid must decrease strictly and stay >= 1; build it with timestep_grid(T, n).")
    return steps


def sample(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    grid: Tensor,
    step: SamplerStep,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> Tensor:
    r"""Run the reverse process from :math:`x_T \sim N(0, I)` down to :math:`x_0`.

    Calls ``model_fn`` once per grid entry (``len(grid)`` calls), each time passing the
    previous :math:`\hat x_0` for self-conditioning, then ``step`` from that entry to the next
    (and from the last entry to ``t = 0``).

    Example:
        >>> from perturbdiff_core.diffusion.samplers import DDIMStep, sample, timestep_grid
        >>> from perturbdiff_core.registry import load
        >>> sched = load("perturbdiff.schedules", "cosine", num_steps=100)
        >>> x = sample(lambda x, t, prev: 0.0 * x, (2, 5, 3), sched, timestep_grid(100, 10), DDIMStep())
        >>> bool((x == 0).all())
        True
    """
    steps = _check_grid(grid, schedule)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    x0 = None
    pairs = list(zip(steps, steps[1:] + [0]))
    if progress:
        from ..progress import progress_bar

        pairs = progress_bar(pairs, desc="sampling", unit="steps")
    for t, t_prev in pairs:
        x0 = model_fn(x, torch.full(shape[:1], t, dtype=torch.long, device=x.device), x0)
        x = step(x, x0, t, t_prev, schedule, generator)
    return x
