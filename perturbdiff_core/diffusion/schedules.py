r"""Noise schedules: :math:`\bar\alpha_t` over the integer time steps of a DDPM.

Convention (Ho et al. 2020): ``t = 0`` is clean data with :math:`\bar\alpha_0 = 1`; ``t = 1..T``
are the noisy steps, ``T = num_steps``, and
:math:`\bar\alpha_t = \prod_{s=1}^{t} (1 - \beta_s)`. Training draws ``t`` from ``1..T``;
sampling always starts at ``t = T`` and ends at ``t = 0``. A schedule is a plain object whose
constructor arguments the base class captures (:class:`~perturbdiff_core.arguments.CapturesArguments`):
``load("perturbdiff.schedules", name, **schedule.config())`` rebuilds it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..arguments import CapturesArguments
from ..constraints import Positive
from ..errors import ConfigError, InputError

#: Largest :math:`\bar\alpha_T` accepted: sampling starts from :math:`x_T \sim N(0, I)`, which is
#: only the true marginal of step ``T`` when almost no signal is left
#: (:math:`\sqrt{\bar\alpha_T} \le 0.03`).
MAX_FINAL_ALPHA_BAR = 1e-3


def expand_as_sets(a: Tensor, x: Tensor) -> Tensor:
    """Per-set coefficients ``(B,)`` (or a scalar) reshaped to broadcast over ``x`` ``(B, ...)``, in ``x``'s dtype."""
    a = a.to(device=x.device, dtype=x.dtype)
    return a.reshape(a.shape + (1,) * (x.dim() - a.dim()))


def betas_from_alpha_bar(alpha_bar: Tensor, max_beta: float) -> Tensor:
    r""":math:`\beta_t = \min(1 - \bar\alpha_t / \bar\alpha_{t-1}, \beta_{max})` for ``t = 1..T``.

    Turns a continuous :math:`\bar\alpha` given at ``t = 0..T`` (``(T + 1,)``, float64) into
    betas, clipping them as Nichol & Dhariwal (2021, section 3.2) do to avoid the
    singularity at ``t = T``.
    """
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class NoiseSchedule(CapturesArguments, ABC):
    r"""The forward process :math:`q(x_t \mid x_0) = N(\sqrt{\bar\alpha_t} x_0, (1 - \bar\alpha_t) I)`.

    Subclasses implement :meth:`betas` (float64, steps ``1..T``); :meth:`config` returns the
    constructor's keyword arguments, captured by the base class. Everything else derives from the betas.
    """

    def __init__(self, num_steps: int) -> None:
        self.num_steps = Positive.check(num_steps, "num_steps", integer=True)

    @abstractmethod
    def betas(self) -> Tensor:
        r""":math:`\beta_1, \dots, \beta_T` as a float64 tensor ``(T,)``, each in ``(0, 1)``."""

    @cached_property
    def alpha_bars(self) -> Tensor:
        r"""Float64 table ``(T + 1,)``: entry ``t`` is :math:`\bar\alpha_t`, entry ``0`` is 1."""
        betas = self.betas()
        name = type(self).__name__
        if betas.shape != (self.num_steps,) or betas.dtype != torch.float64:
            raise ConfigError(
                f"{name}.betas() must return float64 of shape ({self.num_steps},), got "
                f"{betas.dtype} {tuple(betas.shape)}; fix the schedule."
            )
        if not (torch.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()):
            raise ConfigError(f"{name} has betas outside (0, 1); check its parameters {self.config()}.")
        table = torch.cat([betas.new_ones(1), torch.cumprod(1.0 - betas, 0)])
        if table[-1] > MAX_FINAL_ALPHA_BAR:
            raise ConfigError(
                f"{name}({self.config()}) leaves alpha_bar(T) = {table[-1].item():.3g} > "
                f"{MAX_FINAL_ALPHA_BAR:g}: step T is not pure noise, so sampling from N(0, I) would "
                f"be biased. Use more steps or larger betas."
            )
        return table

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        r""":math:`\bar\alpha_t` (float64) for integer ``t`` in ``[0, T]``, same shape and device as ``t``."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise InputError(f"time steps must be integers, got {t.dtype}; pass a long tensor.")
        if t.numel() and (t.min() < 0 or t.max() > self.num_steps):
            raise InputError(
                f"time steps must lie in [0, {self.num_steps}], got values in "
                f"[{t.min().item()}, {t.max().item()}]."
            )
        return self.alpha_bars.to(t.device)[t]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        r""":math:`x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon` (Ho et al. 2020, eq. 4).

        ``x0`` and ``noise`` are ``(B, ...)``; ``t`` is ``(B,)`` long.
        """
        if noise.shape != x0.shape:
            raise InputError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}; give one noise value per entry.")
        ab = expand_as_sets(self.alpha_bar(t), x0)
        return torch.addcmul(ab.sqrt() * x0, (1.0 - ab).sqrt(), noise)  # one pass fewer than a product and a sum

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({params})"


def as_schedule(spec: Any, **params: Any) -> NoiseSchedule:
    """A :class:`NoiseSchedule` from a plug-in name (with parameters) or an instance."""
    from ..registry import resolve

    return resolve("perturbdiff.schedules", spec, **params)
