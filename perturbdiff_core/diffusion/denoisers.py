r"""Denoiser interface: a network that predicts the clean set (or noise, or velocity) from a noisy set.

Contract: ``forward(x_t (B, S, G), t (B,) long, cond: Conditioning, self_cond (B, S, G) | None)
-> (B, S, G)``, a prediction in the parameterisation the diffusion model is configured with.
Cells carry no position, so a denoiser must be permutation-equivariant over the cells of
``x_t`` (and ``self_cond``), invariant to the order of the control cells, and treat the sets of
a batch independently. The constructor takes the data dimensions (``num_genes``,
``perturbation_dim``, ``num_cell_types``, ``num_batches``) plus size parameters; the base class
captures them (:class:`~perturbdiff_core.arguments.CapturesArguments`) and :meth:`Denoiser.config`
returns all of them, so ``load("perturbdiff.denoisers", name, **config)`` rebuilds the network from
a saved configuration.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arguments import CapturesArguments
from ..constraints import Positive
from ..data.batch import Conditioning
from ..errors import ConfigError, InputError


class Denoiser(CapturesArguments, nn.Module, ABC):
    """A network ``(x_t, t, cond, self_cond) -> prediction`` over batches of cell sets.

    ``templates=True`` (injected by a model with per-cell origins) says ``cond.template`` gives
    each target cell the cell it is a change of; such a network reads it next to ``x_t``.
    """

    def __init__(
        self, num_genes: int, perturbation_dim: int, num_cell_types: int = 1, num_batches: int = 1, *, templates: bool = False
    ) -> None:
        super().__init__()
        self.templates = bool(templates)
        for name, value, low in (
            ("num_genes", num_genes, 1),
            ("perturbation_dim", perturbation_dim, 1),
            ("num_cell_types", num_cell_types, 1),
            ("num_batches", num_batches, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")
        self.num_genes = num_genes
        self.perturbation_dim = perturbation_dim
        self.num_cell_types = num_cell_types
        self.num_batches = num_batches

    def __call__(self, x_t: Tensor, t: Tensor, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        self.check_inputs(x_t, t, cond, self_cond)
        return super().__call__(x_t, t, cond, self_cond)

    @abstractmethod
    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        """Prediction ``(B, S, G)`` for noisy sets ``x_t`` at steps ``t``; ``self_cond`` is a previous x0 estimate."""

    def config(self) -> dict[str, Any]:
        """Every constructor keyword argument (data dimensions and sizes, as captured), JSON/YAML-serialisable;
        ``templates`` only when set, as checkpoints have always stored it (a model with per-cell origins sets it)."""
        config = super().config()
        if not config.get("templates"):
            config.pop("templates", None)
        return config

    def data_config(self) -> dict[str, Any]:
        """The data dimensions (and ``templates`` when set), the part of :meth:`config` every denoiser shares."""
        dims: dict[str, Any] = {
            "num_genes": self.num_genes,
            "perturbation_dim": self.perturbation_dim,
            "num_cell_types": self.num_cell_types,
            "num_batches": self.num_batches,
        }
        return dims | ({"templates": True} if self.templates else {})

    def check_inputs(self, x_t: Tensor, t: Tensor, cond: Conditioning, self_cond: Tensor | None) -> None:
        """Raise :class:`InputError` when the inputs break the documented shapes or index ranges."""
        if x_t.dim() != 3 or x_t.shape[-1] != self.num_genes:
            raise InputError(
                f"x_t must be (sets, cells, {self.num_genes} genes), got {tuple(x_t.shape)}; the "
                f"denoiser was built for {self.num_genes} genes."
            )
        b = x_t.shape[0]
        if t.shape != (b,) or t.dtype != torch.long:
            raise InputError(f"t must be a long tensor of shape ({b},), got {t.dtype} {tuple(t.shape)}.")
        if self_cond is not None and self_cond.shape != x_t.shape:
            raise InputError(f"self_cond has shape {tuple(self_cond.shape)} but x_t has {tuple(x_t.shape)}.")
        if self.templates and (cond.template is None or cond.template.shape != x_t.shape):
            shape = None if cond.template is None else tuple(cond.template.shape)
            raise InputError(f"this denoiser reads one template cell per target cell: cond.template {shape}, x_t {tuple(x_t.shape)}.")
        control = cond.control
        if control.dim() != 3 or control.shape[0] != b or control.shape[-1] != self.num_genes or control.shape[1] < 1:
            raise InputError(
                f"cond.control must be ({b} sets, >= 1 cells, {self.num_genes} genes), got {tuple(control.shape)}."
            )
        if cond.perturbation.shape != (b, self.perturbation_dim):
            raise InputError(
                f"cond.perturbation must be ({b}, {self.perturbation_dim}), got {tuple(cond.perturbation.shape)}; "
                f"the denoiser was built for perturbation_dim={self.perturbation_dim}."
            )
        for name, index, size in (("cell_type", cond.cell_type, self.num_cell_types), ("batch", cond.batch, self.num_batches)):
            if index.shape != (b,) or index.dtype != torch.long:
                raise InputError(f"cond.{name} must be a long tensor of shape ({b},), got {index.dtype} {tuple(index.shape)}.")
            if b and (index.min() < 0 or index.max() >= size):
                raise InputError(
                    f"cond.{name} has indices in [{index.min().item()}, {index.max().item()}] but the "
                    f"denoiser knows {size} values (num_{name}s={size}); rebuild it for this data."
                )


def resolve_size(presets: Mapping[str, Mapping[str, int]], size: str, **overrides: int | None) -> dict[str, int]:
    """Size parameters of preset ``size`` with every non-``None`` override applied."""
    if size not in presets:
        raise ConfigError(f"size must be one of {', '.join(presets)}, got {size!r}.")
    sizes = dict(presets[size])
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    for name, value in sizes.items():
        Positive.check(value, name, integer=True)
    return sizes


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    r"""Sinusoidal features :math:`[\cos(t f_k), \sin(t f_k)]`, :math:`f_k = P^{-k/(d/2)}` (Vaswani et al. 2017), ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class SelfConditionedInput(nn.Linear):
    r"""The input layer of a self-conditioned denoiser: :math:`W [x_t, \hat x_0 (, c)] + b`,
    ``2 G`` (``3 G`` with ``templates``) ``-> hidden``, a missing estimate :math:`\hat x_0` read as zeros;
    :math:`c` is each target cell's template cell (``cond.template``).

    Applied as one product per block of the weight, so the sets are never concatenated and, without
    an estimate (half of the training steps), no product runs over zeros. Values and gradients
    equal ``nn.Linear(k * G, hidden)`` on the concatenation, and so do the parameters' names.
    """

    def __init__(self, num_genes: int, hidden: int, templates: bool = False) -> None:
        super().__init__((3 if templates else 2) * num_genes, hidden)
        self.num_genes = num_genes

    def forward(self, x_t: Tensor, self_cond: Tensor | None = None, template: Tensor | None = None) -> Tensor:
        g = self.num_genes
        out = F.linear(x_t, self.weight[:, :g], self.bias)
        if self_cond is not None:
            out = out + F.linear(self_cond, self.weight[:, g : 2 * g])
        if template is not None:
            out = out + F.linear(template.to(x_t.dtype), self.weight[:, 2 * g :])
        return out


class ConditionEmbedding(nn.Module):
    r"""The conditioning vector :math:`c = \mathrm{MLP}(\mathrm{sin}(t)) + \mathrm{MLP}(p) + E_{type}[k] + E_{batch}[b]`, ``(B, hidden)``.

    The time-step embedding follows DiT (Peebles & Xie 2023): sinusoidal features, then a
    two-layer SiLU MLP. A zero perturbation vector is the null condition of classifier-free
    guidance.
    """

    def __init__(self, perturbation_dim: int, num_cell_types: int, num_batches: int, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.perturbation = nn.Sequential(nn.Linear(perturbation_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cell_type = nn.Embedding(num_cell_types, hidden)
        self.batch = nn.Embedding(num_batches, hidden)
        for emb in (self.cell_type, self.batch):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.cell_type.weight.dtype
        return (
            self.time(timestep_embedding(t, self.frequency_dim).to(dtype))
            + self.perturbation(cond.perturbation.to(dtype))
            + self.cell_type(cond.cell_type)
            + self.batch(cond.batch)
        )


def as_denoiser(spec: Any, **params: Any) -> Denoiser:
    """A :class:`Denoiser` from a plug-in name (with parameters) or an instance."""
    from ..registry import resolve

    return resolve("perturbdiff.denoisers", spec, **params)
