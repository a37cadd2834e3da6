r"""What the denoiser predicts (``x0``, ``eps``, ``v`` or ``edm``) and the conversions between them.

With :math:`x_t = \alpha x_0 + \sigma \epsilon`, :math:`\alpha = \sqrt{\bar\alpha_t}`,
:math:`\sigma = \sqrt{1 - \bar\alpha_t}` (so :math:`\alpha^2 + \sigma^2 = 1`), the velocity of
Salimans & Ho (2022, section 4) is :math:`v = \alpha \epsilon - \sigma x_0`, and

.. math::
    x_0 = \alpha x_t - \sigma v, \qquad \epsilon = \sigma x_t + \alpha v,
    \qquad x_0 = (x_t - \sigma \epsilon) / \alpha, \qquad \epsilon = (x_t - \alpha x_0) / \sigma.

``edm`` is the preconditioned clean-set prediction of Karras et al. (2022, "Elucidating the design
space of diffusion-based generative models", section 5, eq. 7) with a mean :math:`\mu` and scale
:math:`s` per gene (:class:`DataScale`): with :math:`\sigma' = \sigma / \alpha`, the noise level of
:math:`x_t / \alpha = x_0 + \sigma' \epsilon`,

.. math::
    \hat x_0 = \mu + c_{skip} (x_t / \alpha - \mu) + c_{out} F, \qquad
    c_{skip} = \frac{s^2}{\sigma'^2 + s^2}, \qquad c_{out} = \frac{\sigma' s}{\sqrt{\sigma'^2 + s^2}},

so the network output :math:`F` has a unit-variance target at every noise level and, as the
noise vanishes, :math:`x_t` itself carries each cell's gene-level detail (zeros, counts) to the
estimate: a network whose tokens are narrower than the genes cannot carry it alone. ``v`` is
this with :math:`\mu = 0, s = 1`.

Every conversion lives here, in one place. ``alpha_bar`` is ``(B,)`` (one value per set) or a
scalar; ``x_t`` and predictions are ``(B, ...)``. Note that ``eps -> x0`` divides by
:math:`\alpha`, which is tiny near ``t = T``: x0 estimates from an eps-predictor are noisy there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from torch import Tensor

from ..errors import ConfigError
from .schedules import expand_as_sets

Parameterization = Literal["x0", "eps", "v", "edm"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)


def check_parameterization(kind: str) -> Parameterization:
    """``kind`` itself when it is one of ``x0``, ``eps``, ``v``; a :class:`ConfigError` otherwise."""
    if kind not in PARAMETERIZATIONS:
        raise ConfigError(f"prediction must be one of {', '.join(PARAMETERIZATIONS)}, got {kind!r}.")
    return kind  # type: ignore[return-value]


@dataclass(frozen=True)
class DataScale:
    """Per-gene mean and scale ``(G,)`` of the clean sets, for the ``edm`` preconditioning."""

    mean: Tensor
    scale: Tensor


def _alpha_sigma(alpha_bar: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    ab = expand_as_sets(alpha_bar, x)
    return ab.sqrt(), (1.0 - ab).sqrt()


def _edm(alpha: Tensor, sigma: Tensor, x_t: Tensor, data: DataScale | None) -> tuple[Tensor, Tensor]:
    r""":math:`\mu + c_{skip}(x_t/\alpha - \mu)` and :math:`c_{out}`, written without dividing by :math:`\alpha` (0 at ``t = T``)."""
    if data is None:
        raise ConfigError("prediction 'edm' needs the data's per-gene mean and scale (a DataScale).")
    mean, s2 = data.mean.to(x_t.dtype), data.scale.to(x_t.dtype).square()
    denominator = sigma.square() + alpha.square() * s2
    skipped = mean + alpha * s2 * (x_t - alpha * mean) / denominator
    return skipped, sigma * s2.sqrt() / denominator.sqrt()


def target(kind: Parameterization, x0: Tensor, eps: Tensor, alpha_bar: Tensor, data: DataScale | None = None) -> Tensor:
    r"""The regression target of a ``kind``-predictor: :math:`x_0`, :math:`\epsilon`,
    :math:`v = \alpha\epsilon - \sigma x_0`, or ``edm``'s :math:`F = (x_0 - \text{skipped}) / c_{out}`."""
    check_parameterization(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    alpha, sigma = _alpha_sigma(alpha_bar, x0)
    if kind == "edm":
        skipped, c_out = _edm(alpha, sigma, alpha * x0 + sigma * eps, data)
        return (x0 - skipped) / c_out
    return alpha * eps - sigma * x0


def to_x0(pred: Tensor, kind: Parameterization, x_t: Tensor, alpha_bar: Tensor, data: DataScale | None = None) -> Tensor:
    r"""Clean-data estimate :math:`\hat x_0` from a ``kind`` prediction at :math:`x_t`."""
    check_parameterization(kind)
    if kind == "x0":
        return pred
    alpha, sigma = _alpha_sigma(alpha_bar, x_t)
    if kind == "eps":
        return (x_t - sigma * pred) / alpha
    if kind == "edm":
        skipped, c_out = _edm(alpha, sigma, x_t, data)
        return skipped + c_out * pred
    return alpha * x_t - sigma * pred  # Salimans & Ho (2022), x = alpha z - sigma v


def to_eps(pred: Tensor, kind: Parameterization, x_t: Tensor, alpha_bar: Tensor, data: DataScale | None = None) -> Tensor:
    r"""Noise estimate :math:`\hat\epsilon` from a ``kind`` prediction at :math:`x_t`."""
    check_parameterization(kind)
    if kind == "eps":
        return pred
    alpha, sigma = _alpha_sigma(alpha_bar, x_t)
    if kind in ("x0", "edm"):
        return (x_t - alpha * to_x0(pred, kind, x_t, alpha_bar, data)) / sigma
    return sigma * x_t + alpha * pred  # Salimans & Ho (2022), eps = sigma z + alpha v


def to_v(pred: Tensor, kind: Parameterization, x_t: Tensor, alpha_bar: Tensor, data: DataScale | None = None) -> Tensor:
    r"""Velocity estimate :math:`\hat v = \alpha \hat\epsilon - \sigma \hat x_0` from a ``kind`` prediction."""
    check_parameterization(kind)
    if kind == "v":
        return pred
    alpha, sigma = _alpha_sigma(alpha_bar, x_t)
    return alpha * to_eps(pred, kind, x_t, alpha_bar, data) - sigma * to_x0(pred, kind, x_t, alpha_bar, data)
