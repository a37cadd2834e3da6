"""Cell sets: the model's training and evaluation points, collated into :class:`SetBatch`.

One item is one condition: ``S`` of its cells (with replacement when it has fewer) and ``S``
control cells of its context chosen by the control pairing. The draw depends only on
``(seed, epoch, index)``, so the same seed gives the same sets with any number of workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constraints import Positive
from ..errors import DataError
from .batch import Conditioning, SetBatch
from .dataset import Condition, Context, PerturbationData
from .pairing import ControlPairing, draw, make_pairing


class ConditionSets(Dataset):
    """A torch Dataset of condition sets; item ``i`` is condition ``i % len(conditions)``.

    Args:
        data: prepared and fitted data (:meth:`PerturbationData.fit`).
        conditions: condition labels (or :class:`Condition`) to draw sets from.
        set_size: cells per set ``S`` (default ``data.config.set_size``).
        seed: base seed; item ``(epoch, i)`` draws from ``default_rng([seed, epoch, i])``.
        pairing: ``random``, ``ot`` or a :class:`ControlPairing` (default ``data.config.control_pairing``).
        samples_per_condition: sets per condition per epoch.
        shifts: condition label -> ``(G,)`` anchor shift (``model.anchor``, see
            :mod:`~perturbdiff_core.runs.anchor`), added to every item as ``shift``; ``None``: no anchor.

    Items are dicts: ``target`` and ``control`` ``(S, G)`` float32, ``perturbation`` ``(P,)``,
    ``cell_type`` and ``batch`` long scalars, ``condition`` the label (and ``shift`` ``(G,)``
    with ``shifts``); keys are ``i`` or ``(epoch, i)``.
    """

    def __init__(
        self,
        data: PerturbationData,
        conditions: Sequence[str | Condition],
        *,
        set_size: int | None = None,
        seed: int = 0,
        pairing: str | ControlPairing | None = None,
        samples_per_condition: int = 1,
        shifts: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.data = data
        self.conditions = [data.condition(c) for c in conditions]
        if not self.conditions:
            raise DataError("No conditions to draw sets from; check the split.")
        self.set_size = data.config.set_size if set_size is None else set_size
        Positive.check(self.set_size, "set_size", integer=True)
        Positive.check(samples_per_condition, "samples_per_condition", integer=True)
        self.seed = seed
        self.samples_per_condition = samples_per_condition
        self.pairing = make_pairing(data.config.control_pairing if pairing is None else pairing).fit(data)
        self.perturbation = data.encode(self.conditions)
        self.context_index = torch.tensor([data.context_indices(c.context) for c in self.conditions], dtype=torch.long)
        self.shift = None if shifts is None else condition_shifts(shifts, self.conditions, data.n_genes)

    def __len__(self) -> int:
        return len(self.conditions) * self.samples_per_condition

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self):
            raise IndexError(f"set index {index} out of range for {len(self)} sets")
        rng = np.random.default_rng([self.seed, epoch, index])
        i = index % len(self.conditions)
        condition = self.conditions[i]
        size, data = self.set_size, self.data
        target_rows = draw(data.cells(condition), size, rng)
        if self.pairing.uses_target:
            target = data.read(target_rows)
            control = data.read(self.pairing.pair(data, condition.context, target, size, rng))
        else:  # one read for both sets
            control_rows = self.pairing.pair(data, condition.context, None, size, rng)
            both = data.read(np.concatenate([target_rows, control_rows]))
            target, control = both[:size], both[size:]
        item = {
            "target": torch.from_numpy(np.ascontiguousarray(target)),
            "control": torch.from_numpy(np.ascontiguousarray(control)),
            "perturbation": self.perturbation[i],
            "cell_type": self.context_index[i, 0],
            "batch": self.context_index[i, 1],
            "condition": condition.label,
        }
        if self.shift is not None:
            item["shift"] = self.shift[i]
        return item


def condition_shifts(shifts: Mapping[str, np.ndarray], conditions: Sequence[Condition], n_genes: int) -> torch.Tensor:
    """``(len(conditions), G)`` float32 anchor shifts in condition order; DataError for a missing or misshapen one."""
    missing = [c.label for c in conditions if c.label not in shifts]
    if missing:
        raise DataError(f"No anchor shift for condition(s) {', '.join(missing[:5])}; compute shifts for every condition.")
    rows = [np.asarray(shifts[c.label], dtype=np.float32) for c in conditions]
    if any(r.shape != (n_genes,) for r in rows):
        raise DataError(f"Anchor shifts must have one value per gene ({n_genes}).")
    return torch.from_numpy(np.stack(rows))


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` through numpy: one plain copy, faster than torch.stack for big CPU sets."""
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def collate_sets(items: list[dict[str, Any]]) -> SetBatch:
    """Stack dataset items into a :class:`SetBatch` (``B`` sets)."""
    cond = Conditioning(
        control=_stack([it["control"] for it in items]),
        perturbation=torch.stack([it["perturbation"] for it in items]),
        cell_type=torch.stack([it["cell_type"] for it in items]),
        batch=torch.stack([it["batch"] for it in items]),
        shift=torch.stack([it["shift"] for it in items]) if "shift" in items[0] else None,
    )
    return SetBatch(
        target=_stack([it["target"] for it in items]), cond=cond, condition=[it["condition"] for it in items]
    )


def prediction_conditioning(
    data: PerturbationData,
    perturbations: Sequence[str],
    context: Context,
    *,
    set_size: int | None = None,
    doses: Sequence[float] | None = None,
    seed: int = 0,
    shift: np.ndarray | None = None,
) -> Conditioning:
    """Conditioning to predict ``perturbations`` (seen or, with a lookup encoder, unseen) in ``context``.

    Controls are drawn at random from the context (from ``default_rng(seed)``), whatever pairing
    was used in training: the perturbed cells are unknown here. The sets together take every
    control cell once, in random order, before any cell is taken again, so a prediction from
    several sets repeats no control cell while the context has enough. ``shift`` ``(G,)`` is the
    anchor's shift of the condition, given to every set (``model.anchor``).
    """
    if not perturbations:
        raise DataError("No perturbations to predict; give at least one perturbation name.")
    size = data.config.set_size if set_size is None else set_size
    n = len(perturbations)
    rows = shuffled_rounds(data.control_cells(context), n * size, np.random.default_rng(seed))
    control = torch.from_numpy(data.read(rows).reshape(n, size, data.n_genes))
    cell_type, batch = data.context_indices(context)
    return Conditioning(
        control=control,
        perturbation=data.encoder.encode(list(perturbations), doses),
        cell_type=torch.full((n,), cell_type, dtype=torch.long),
        batch=torch.full((n,), batch, dtype=torch.long),
        shift=None if shift is None else torch.as_tensor(shift, dtype=torch.float32).expand(n, data.n_genes).clone(),
    )


def shuffled_rounds(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``rows``: random permutations of all of them, one after another, cut at ``count``."""
    rounds = -(-count // len(rows))
    return np.concatenate([rng.permutation(rows) for _ in range(rounds)])[:count]
