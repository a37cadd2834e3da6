"""Docstring markup as plain text: what ``perturbdiff plugins`` and the generated docs show."""

from __future__ import annotations

import pytest

from perturbdiff_core.docstrings import latex_text, plain_text


@pytest.mark.parametrize(
    ("formula", "text"),
    [
        (r"k(x, y) = -\|x - y\|^\beta", "k(x, y) = -‖x - y‖^β"),
        (r"0 < \beta \le 2", "0 < β ≤ 2"),
        (r"(1 + \|x - y\|^2 / l^2)^{-1/2}", "(1 + ‖x - y‖^2 / l^2)^(-1/2)"),
        (r"w_x^\top K_{xx} w_x", "w_xᵀ K_xx w_x"),
        (r"\phi(x) = \sqrt{2/D}\,[\cos(W x), \sin(W x)]", "φ(x) = √(2/D) [cos(W x), sin(W x)]"),
        (r"(1 + \sqrt3 r/l) \exp(-\sqrt3 r/l)", "(1 + √3 r/l) exp(-√3 r/l)"),
        (r"\bar\alpha_t = (f(t) / f(0))^{p}", "\u03b1\u0304_t = (f(t) / f(0))^p"),
        (r"\tfrac12(1 + \cos(\pi p))", "½(1 + cos(π p))"),
        (r"\mathrm{MMD}^2", "MMD^2"),
    ],
)
def test_latex_becomes_unicode(formula: str, text: str) -> None:
    assert latex_text(formula) == text


def test_roles_and_literals_lose_their_markup() -> None:
    doc = r"Kernel :math:`\exp(-s)` over ``(..., N, G)``; see :mod:`~perturbdiff_core.runs.training` and :class:`Kernel`."
    assert plain_text(doc) == "Kernel exp(-s) over (..., N, G); see perturbdiff_core.runs.training and Kernel."
    assert plain_text(doc, code="`") == "Kernel exp(-s) over `(..., N, G)`; see `perturbdiff_core.runs.training` and `Kernel`."
    assert plain_text(":func:`~perturbdiff_core.runs.training.resolve_workers`") == "resolve_workers"
    assert plain_text("no markup at all") == "no markup at all"
