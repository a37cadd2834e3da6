"""The unit the model trains on: a batch of (control set, perturbed set, condition) triples.

The data layer produces :class:`SetBatch`; the denoisers and the diffusion model consume it.
Shapes: ``B`` sets per batch, ``S`` cells per set, ``G`` genes, ``P`` perturbation features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """What a denoiser is conditioned on besides the noisy set and the time step.

    Attributes:
        control: ``(B, S, G)`` matched control cells (same cell type / batch as the target).
        perturbation: ``(B, P)`` perturbation encoding (all zeros means "unperturbed", as in
            marginal pre-training and the null condition of classifier-free guidance).
        cell_type: ``(B,)`` long index of the cell type (``0`` when the data has none).
        batch: ``(B,)`` long index of the experimental batch (``0`` when the data has none).
        shift: ``(B, G)`` an anchor's predicted change of each set's mean expression from its
            control cells' mean (``model.anchor``), or ``None`` without an anchor.
        template: ``(B, S, G)`` for each target cell the cell it is a change of (a model with
            per-cell origins pairs target cell ``i`` with control cell ``i``), or ``None``.
    """

    control: Tensor
    perturbation: Tensor
    cell_type: Tensor
    batch: Tensor
    shift: Tensor | None = None
    template: Tensor | None = None

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """A copy with ``fn`` applied to every tensor (optional fields stay ``None`` when they are)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: None if value is None else fn(value) for name, value in values.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Conditioning:
        """A copy with every tensor on ``device`` (``non_blocking``: asynchronous from pinned memory)."""
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class SetBatch:
    """A batch of training or evaluation points.

    Attributes:
        target: ``(B, S, G)`` perturbed cells (the clean sample ``x_0`` of the diffusion).
        cond: the :class:`Conditioning` of each set.
        condition: ``B`` condition labels, e.g. ``"IFNB|CD4T|batch1"``, for logging and metrics.
    """

    target: Tensor
    cond: Conditioning
    condition: list[str] = field(default_factory=list)

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> SetBatch:
        """A copy with ``fn`` applied to every tensor (the target and the conditioning's)."""
        return replace(self, target=fn(self.target), cond=self.cond.map_tensors(fn))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SetBatch:
        """A copy with every tensor on ``device`` (``non_blocking``: asynchronous from pinned memory)."""
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SetBatch:
        """A copy in page-locked memory, so a later ``to(cuda, non_blocking=True)`` overlaps compute
        (called by a DataLoader with ``pin_memory=True``)."""
        return self.map_tensors(Tensor.pin_memory)
