"""Built-in noise schedules (steps ``t = 1..T``, :math:`\\bar\\alpha_0 = 1`; see perturbdiff_core.diffusion.schedules)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from perturbdiff_core.diffusion.schedules import NoiseSchedule, betas_from_alpha_bar
from perturbdiff_core.errors import ConfigError


class LinearSchedule(NoiseSchedule):
    r"""Linearly increasing :math:`\beta_t` from ``beta_start`` to ``beta_end`` (Ho et al. 2020, section 4).

    :math:`\bar\alpha_t = \prod_{s \le t} (1 - \beta_s)`. The defaults are tuned for 1000 steps;
    with far fewer steps :math:`\bar\alpha_T` stays large, which the schedule rejects.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        super().__init__(num_steps)
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start!r}, {beta_end!r}.")
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)

    def betas(self) -> Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)


class CosineSchedule(NoiseSchedule):
    r"""Cosine schedule of Nichol & Dhariwal (2021, eq. 17).

    .. math::
        \bar\alpha_t = f(t) / f(0), \qquad f(t) = \cos^2\!\Big(\frac{t/T + s}{1 + s} \cdot \frac{\pi}{2}\Big),

    with :math:`\beta_t = 1 - \bar\alpha_t / \bar\alpha_{t-1}` clipped at ``max_beta`` (0.999),
    which only changes the last step(s), where :math:`f` reaches 0.
    """

    def __init__(self, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> None:
        super().__init__(num_steps)
        if not s >= 0:
            raise ConfigError(f"cosine offset s must be >= 0, got {s!r}.")
        if not 0 < max_beta < 1:
            raise ConfigError(f"max_beta must lie in (0, 1), got {max_beta!r}.")
        self.s, self.max_beta = float(s), float(max_beta)

    def unclipped_alpha_bar(self) -> Tensor:
        r""":math:`f(t)/f(0)` at ``t = 0..T`` before beta clipping, float64 ``(T + 1,)``."""
        t = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        f = torch.cos((t + self.s) / (1 + self.s) * (math.pi / 2)).square()
        return f / f[0]

    def betas(self) -> Tensor:
        return betas_from_alpha_bar(self.unclipped_alpha_bar(), self.max_beta)


class PowerCosineSchedule(CosineSchedule):
    r"""Cosine schedule raised to a power: :math:`\bar\alpha_t = (f(t) / f(0))^{p}`.

    This is the ``cosine_schedule(t, tau)`` of Chen (2023, "On the importance of noise
    scheduling for diffusion models", algorithm 1), :math:`\cos(t\pi/2)^{2\tau}` with
    :math:`\tau = p`, on Nichol & Dhariwal's offset cosine :math:`f`. ``power > 1`` adds noise
    faster (lower SNR at every ``t``), ``power < 1`` slower; ``power = 1`` is
    :class:`CosineSchedule`. Betas are clipped at ``max_beta`` as there.
    """

    def __init__(self, num_steps: int = 1000, power: float = 2.0, s: float = 0.008, max_beta: float = 0.999) -> None:
        super().__init__(num_steps, s=s, max_beta=max_beta)
        if not power > 0:
            raise ConfigError(f"power must be positive, got {power!r}.")
        self.power = float(power)

    def unclipped_alpha_bar(self) -> Tensor:
        return super().unclipped_alpha_bar().pow(self.power)
