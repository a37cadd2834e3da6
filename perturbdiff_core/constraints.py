"""Range constraints declared beside the values they constrain.

A config field states its range in its annotation, ``cond_drop_prob: Annotated[float, UnitInterval]``:
:func:`~perturbdiff_core.configuration.from_mapping` checks it when a config loads (a ConfigError
naming the key, the value, the range and the fix), ``docs/config.md`` shows it, and library code that
takes the same value from Python callers checks it with the same object
(``UnitInterval.check(cond_drop_prob, "cond_drop_prob")``), so a range is written once.

Put the marker outermost, ``Annotated[int | None, Positive]``: numbers are checked, ``null`` and the
other non-numeric choices of the type (``'auto'``) pass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, PerturbDiffError


@dataclass(frozen=True)
class Range:
    """The numbers between ``low`` and ``high`` (``None``: unbounded), each end closed or open.

    ``Range(0, 1)`` is [0, 1], ``Range(0, 1, closed_right=False)`` is [0, 1), ``Range(0, closed_left=False)``
    is every number above 0 (for an integer field: 1 and up). NaN lies in no range.
    """

    low: float | None = None
    high: float | None = None
    closed_left: bool = True
    closed_right: bool = True

    def __contains__(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.low is not None and not (value >= self.low if self.closed_left else value > self.low):
            return False
        return self.high is None or (value <= self.high if self.closed_right else value < self.high)

    @property
    def text(self) -> str:
        """The range as a reader writes it: ``in [0, 1)``, ``> 0``, ``>= 0``, ``<= 1``."""
        if self.low is not None and self.high is not None:
            left, right = "[" if self.closed_left else "(", "]" if self.closed_right else ")"
            return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>=' if self.closed_left else '>'} {_number(self.low)}"
        if self.high is not None:
            return f"{'<=' if self.closed_right else '<'} {_number(self.high)}"
        return "of any value"

    def check(
        self,
        value: Any,
        name: str,
        *,
        integer: bool = False,
        alternatives: tuple[str, ...] = (),
        error: type[PerturbDiffError] = ConfigError,
    ) -> Any:
        """``value`` when it is a number (an ``integer`` when asked) in this range, else ``error`` naming
        ``name``, the value and what to give instead (a number in the range, or one of ``alternatives``,
        the other values the caller accepts, such as ``null``)."""
        kind = "an integer" if integer else "a number"
        wanted = " or ".join((f"{kind} {self.text}", *alternatives))
        is_number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
        if is_number and value in self:
            return value
        problem = "is out of range" if is_number else f"is not {kind}"
        raise error(f"{name} = {value!r} {problem}; set {name} to {wanted}.")


def _number(x: float) -> str:
    """``1`` rather than ``1.0`` for whole bounds."""
    return str(int(x)) if float(x).is_integer() else str(x)


#: Above 0: sizes, counts, steps, learning rates.
Positive = Range(0, closed_left=False)
#: 0 or more: seeds, weights, intervals where 0 means never.
NonNegative = Range(0)
#: [0, 1]: probabilities, shares that may be 0 or 1.
UnitInterval = Range(0, 1)
#: [0, 1): shares that must leave something over, decay rates.
HalfOpenUnit = Range(0, 1, closed_right=False)
#: (0, 1): shares of which both sides must get something.
OpenUnit = Range(0, 1, closed_left=False, closed_right=False)
