"""Docstring markup as plain text, for terminals (``perturbdiff plugins``) and generated docs.

Docstrings here are written for Sphinx: ``:math:`...``` with LaTeX, ````literals````,
``:mod:`~a.b```-style cross references. :func:`plain_text` turns that into text a person reads
without a renderer: roles drop their markup (a ``~`` reference keeps its last part, a module its whole name), literals lose
their backticks (or keep one pair, for Markdown), and the LaTeX of formulas becomes Unicode.
"""

from __future__ import annotations

import re

#: LaTeX commands and their plain-text form (longest names first when applied).
LATEX = {
    r"\|": "‖",
    r"\,": " ",
    r"\;": " ",
    r"\!": "",
    r"\langle": "⟨",
    r"\rangle": "⟩",
    r"\le": "≤",
    r"\leq": "≤",
    r"\ge": "≥",
    r"\geq": "≥",
    r"\ne": "≠",
    r"\approx": "≈",
    r"\times": "×",
    r"\cdot": "·",
    r"\top": "ᵀ",
    r"\sum": "Σ",
    r"\prod": "Π",
    r"\infty": "∞",
    r"\sqrt": "√",
    r"\exp": "exp",
    r"\log": "log",
    r"\cos": "cos",
    r"\sin": "sin",
    r"\min": "min",
    r"\max": "max",
    r"\in": "∈",
    r"\alpha": "α",
    r"\beta": "β",
    r"\gamma": "γ",
    r"\delta": "δ",
    r"\epsilon": "ε",
    r"\varepsilon": "ε",
    r"\eta": "η",
    r"\theta": "θ",
    r"\kappa": "κ",
    r"\lambda": "λ",
    r"\Lambda": "Λ",
    r"\mu": "μ",
    r"\nu": "ν",
    r"\pi": "π",
    r"\rho": "ρ",
    r"\sigma": "σ",
    r"\Sigma": "Σ",
    r"\tau": "τ",
    r"\phi": "φ",
    r"\Phi": "Φ",
    r"\psi": "ψ",
    r"\omega": "ω",
}

#: LaTeX written out before the commands above are replaced.
_SPELLED = {r"\tfrac12": "½", r"\frac12": "½", r"^\top": "ᵀ"}

#: Accents as Unicode combining marks: ``\bar\alpha`` -> ``ᾱ``.
_ACCENTS = {"bar": "\u0304", "hat": "\u0302", "tilde": "\u0303"}

_ROLE = re.compile(r":(?P<role>[a-z]+):`(?P<body>[^`]*)`")
_LITERAL = re.compile(r"``(?P<body>.+?)``")
_COMMAND = re.compile(r"\\[A-Za-z]+|\\[|,;!]")
_WRAPPER = re.compile(r"\\(?:mathrm|text|mathbf|operatorname)\{(?P<body>[^{}]*)\}")
_ACCENT = re.compile(r"\\(?P<accent>bar|hat|tilde)(?:\{(?P<group>[^{}]*)\}|(?P<body>\\[A-Za-z]+|[A-Za-z]))")
_SQRT = re.compile(r"\\sqrt\{(?P<body>[^{}]*)\}")
_SCRIPT = re.compile(r"(?P<mark>[_^])\{(?P<body>[^{}]*)\}")


def latex_text(formula: str) -> str:
    """A LaTeX formula as Unicode text: ``\\|x - y\\|^\\beta`` -> ``‖x - y‖^β``."""
    text = formula
    for command, spelled in _SPELLED.items():
        text = text.replace(command, spelled)
    text = _WRAPPER.sub(lambda m: m["body"], text)
    text = _SQRT.sub(lambda m: f"√({m['body']})", text)
    text = _ACCENT.sub(lambda m: (m["group"] or m["body"]) + _ACCENTS[m["accent"]], text)
    text = _SCRIPT.sub(lambda m: m["mark"] + (m["body"] if len(m["body"]) <= 1 or m["mark"] == "_" else f"({m['body']})"), text)
    text = _COMMAND.sub(lambda m: LATEX.get(m[0], m[0].lstrip("\\")), text)
    text = text.replace("{", "").replace("}", "")
    return re.sub(r"(?<=\S) {2,}", " ", text)


def plain_text(doc: str, *, code: str = "") -> str:
    """``doc`` without Sphinx markup: formulas as Unicode, literals wrapped in ``code`` (``"`"`` for Markdown)."""

    def role(match: re.Match[str]) -> str:
        body = match["body"]
        if match["role"] == "math":
            return latex_text(body)
        if body.startswith("~"):  # Sphinx shows the last part; a module keeps its whole name, which says more
            body = body[1:] if match["role"] == "mod" else body[1:].rsplit(".", 1)[-1]
        return f"{code}{body}{code}"

    text = _ROLE.sub(role, doc)
    return _LITERAL.sub(lambda m: f"{code}{m['body']}{code}", text)
