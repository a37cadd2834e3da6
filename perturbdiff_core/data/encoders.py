"""Perturbation encoders: a perturbation name (single, combined ``A+B``, with a dose) -> a vector.

.. math::  e(A_1 + \\dots + A_k,\\ d) = \\Big[\\textstyle\\sum_i v(A_i),\\ \\log(1 + d)\\Big]

A plug-in (group ``perturbdiff.encoders``) only says how a *single* perturbation becomes a vector
``v`` (one-hot, a lookup table of gene or compound embeddings, ...); the sum over the parts of a
combination, the zero vector of control cells and the optional dose feature live here, once.
The dose column is present only when the encoder was fitted with ``use_dose=True``; control
cells get the all-zero vector (dose feature included), the "unperturbed" condition of the model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError


def perturbation_parts(name: str, separator: str = "+", control_label: str = "control") -> list[str]:
    """The single perturbations of ``name`` (``"A+B"`` -> ``["A", "B"]``); control parts are dropped."""
    return [part for part in (p.strip() for p in str(name).split(separator)) if part and part != control_label]


class PerturbationEncoder(ABC):
    """Maps perturbation names (and doses) to ``(n, dim)`` float32 feature vectors.

    Subclasses implement :meth:`_fit_parts`, :attr:`part_dim`, :meth:`_part_vectors` and the
    ``_state`` / ``_load_state`` pair; :meth:`_part_vectors` raises DataError naming every
    single perturbation it cannot encode (never a silent zero).

    Example:
        >>> enc = SomeEncoder().fit(["A", "B", "A+B", "control"])  # doctest: +SKIP
        >>> enc.encode(["A+B", "control"])  # [v(A) + v(B), 0]      # doctest: +SKIP
    """

    control_label: str
    separator: str
    use_dose: bool

    def fit(
        self,
        perturbations: Sequence[str],
        *,
        control_label: str = "control",
        separator: str = "+",
        use_dose: bool = False,
    ) -> PerturbationEncoder:
        """Learn the single perturbations of ``perturbations`` (the training conditions)."""
        self.control_label, self.separator, self.use_dose = control_label, separator, use_dose
        parts = sorted({p for name in perturbations for p in self.parts(name)})
        self._fit_parts(parts)
        self._fitted = True
        return self

    @property
    def fitted(self) -> bool:
        """True once :meth:`fit` or :meth:`load_state_dict` has run."""
        return getattr(self, "_fitted", False)

    @property
    def dim(self) -> int:
        """Length of an encoding: the part vector length, plus one with a dose feature."""
        self._require_fitted()
        return self.part_dim + int(self.use_dose)

    def parts(self, name: str) -> list[str]:
        """The single perturbations of ``name`` under this encoder's separator and control label."""
        return perturbation_parts(name, self.separator, self.control_label)

    def encode(self, perturbations: Sequence[str], doses: Sequence[float] | None = None) -> Tensor:
        """``(n, dim)`` float32 encodings: sum of part vectors, then ``log1p(dose)`` if fitted with doses."""
        self._require_fitted()
        names = [str(p) for p in perturbations]
        split = [self.parts(name) for name in names]
        known = sorted({p for parts in split for p in parts})
        vectors = np.asarray(self._part_vectors(known), dtype=np.float64).reshape(len(known), self.part_dim)
        position = {p: i for i, p in enumerate(known)}
        incidence = np.zeros((len(names), len(known)))
        for row, parts in enumerate(split):
            for p in parts:
                incidence[row, position[p]] += 1.0
        out = incidence @ vectors
        if self.use_dose:
            out = np.concatenate([out, self._dose_feature(names, split, doses)[:, None]], axis=1)
        elif doses is not None:
            raise DataError(
                "Doses were given but this encoder was fitted without a dose feature; "
                "set data.dose_key when training to use doses."
            )
        return torch.from_numpy(out.astype(np.float32))

    def _dose_feature(self, names: list[str], split: list[list[str]], doses: Sequence[float] | None) -> np.ndarray:
        """``log1p(dose)`` per row; zero for controls."""
        if doses is None:
            raise DataError("This encoder was fitted with a dose feature; give one dose per perturbation.")
        values = np.asarray(doses, dtype=np.float64).reshape(-1)
        if len(values) != len(names):
            raise DataError(f"Got {len(values)} doses for {len(names)} perturbations; give one dose each.")
        perturbed = np.array([bool(parts) for parts in split])
        bad = perturbed & ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            raise DataError(
                f"Dose {values[bad][0]!r} of {np.array(names)[bad][0]!r} is not a finite non-negative "
                f"number; give doses as numbers (0 or more)."
            )
        return np.where(perturbed, np.log1p(np.where(perturbed, values, 0.0)), 0.0)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable state; :meth:`load_state_dict` restores the fitted encoder from it."""
        self._require_fitted()
        return {
            "control_label": self.control_label,
            "separator": self.separator,
            "use_dose": self.use_dose,
            "parts": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> PerturbationEncoder:
        """Restore a fitted encoder from :meth:`state_dict` output."""
        self.control_label, self.separator = state["control_label"], state["separator"]
        self.use_dose = bool(state["use_dose"])
        self._load_state(state["parts"])
        self._fitted = True
        return self

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise DataError(
                f"{type(self).__name__} is not fitted; call fit(training perturbations) or "
                f"load_state_dict(...) before encoding."
            )

    @property
    @abstractmethod
    def part_dim(self) -> int:
        """Length of the vector of one single perturbation."""

    @abstractmethod
    def _fit_parts(self, parts: list[str]) -> None:
        """Learn from the sorted single perturbations seen in training."""

    @abstractmethod
    def _part_vectors(self, parts: list[str]) -> np.ndarray:
        """``(len(parts), part_dim)`` vectors; DataError naming every part without a vector."""

    @abstractmethod
    def _state(self) -> dict[str, Any]:
        """JSON-serialisable plug-in state."""

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None:
        """Restore the plug-in state written by :meth:`_state`."""
