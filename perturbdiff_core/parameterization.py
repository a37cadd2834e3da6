r"""What the denoiser predicts (``x0``, ``eps`` or ``v``) and the conversions between them.

With :math:`x_t = \alpha x_0 + \sigma \epsilon`, :math:`\alpha = \sqrt{\bar\alpha_t}`,
:math:`\sigma = \sqrt{1 - \bar\alpha_t}` (so :math:`\alpha^2 + \sigma^2 = 1`), the velocity of
Salimans & Ho (2022, section 4) is :math:`v = \alpha \epsilon - \sigma x_0`, and

.. math::
    x_0 = \alpha x_t - \sigma v, \qquad \epsilon = \sigma x_t + \alpha v,
    \qquad x_0 = (x_t - \sigma \epsilon) / \alpha, \qquad \epsilon = (x_t - \alpha x_0) / \sigma.

Every conversion lives here, in one place. ``alpha_bar`` is ``(B,)`` (one value per set) or a
scalar; ``x_t`` and predictions are ``(B, ...)``. Note that ``eps -> x0`` divides by
:math:`\alpha`, which is tiny near ``t = T``: x0 estimates from an eps-predictor are noisy there.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from .errors import ConfigError
from .schedules import expand_as_sets

Parameterization = Literal["x0", "eps", "v"]
PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)


def check_parameterization(kind: str) -> Parameterization:
    """``kind`` itself when it is one of ``x0``, ``eps``, ``v``; a :class:`ConfigError` otherwise."""
    if kind not in PARAMETERIZATIONS:
        raise ConfigError(f"prediction must be one of {', '.join(PARAMETERIZATIONS)}, got {kind!r}.")
    return kind  # type: ignore[return-value]


def _alpha_sigma(alpha_bar: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    ab = expand_as_sets(alpha_bar, x)
    return ab.sqrt(), (1.0 - ab).sqrt()


def target(kind: Parameterization, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    r"""The regression target of a ``kind``-predictor: :math:`x_0`, :math:`\epsilon` or :math:`v = \alpha\epsilon - \sigma x_0`."""
    check_parameterization(kind)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    alpha, sigma = _alpha_sigma(alpha_bar, x0)
    return alpha * eps - sigma * x0


def to_x0(pred: Tensor, kind: Parameterization, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    r"""Clean-data estimate :math:`\hat x_0` from a ``kind`` prediction at :math:`x_t`."""
    check_parameterization(kind)
    if kind == "x0":
        return pred
    alpha, sigma = _alpha_sigma(alpha_bar, x_t)
    if kind == "eps":
        return (x_t - sigma * pred) / alpha
    return alpha * x_t - sigma * pred  # Salimans & Ho (2022), x = alpha z - sigma v


def to_eps(pred: Tensor, kind: Parameterization, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    r"""Noise estimate :math:`\hat\epsilon` from a ``kind`` prediction at :math:`x_t`."""
    check_parameterization(kind)
    if kind == "eps":
        return pred
    alpha, sigma = _alpha_sigma(alpha_bar, x_t)
    if kind == "x0":
        return (x_t - alpha * pred) / sigma
    return sigma * x_t + alpha * pred  # Salimans & Ho (2022), eps = sigma z + alpha v


def to_v(pred: Tensor, kind: Parameterization, x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    r"""Velocity estimate :math:`\hat v = \alpha \hat\epsilon - \sigma \hat x_0` from a ``kind`` prediction."""
    check_parameterization(kind)
    if kind == "v":
        return pred
    alpha, sigma = _alpha_sigma(alpha_bar, x_t)
    return alpha * to_eps(pred, kind, x_t, alpha_bar) - sigma * to_x0(pred, kind, x_t, alpha_bar)
