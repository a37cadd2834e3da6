"""DeepSets denoiser: the set-MLP baseline (Zaheer et al. 2017, "Deep sets", equivariant layers).

Each layer updates every cell from its own features, the mean over its set, the mean control
features and the conditioning vector, so the output is permutation-equivariant over the noisy
cells, invariant to the order of the control cells, and each set is processed on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from perturbdiff_core.data.batch import Conditioning
from perturbdiff_core.diffusion.denoisers import ConditionEmbedding, Denoiser, SelfConditionedInput, resolve_size

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "depth": 2},
    "small": {"hidden": 256, "depth": 3},
    "paper": {"hidden": 512, "depth": 4},
}


class EquivariantLayer(nn.Module):
    r"""Residual update :math:`h_i \leftarrow h_i + \mathrm{MLP}([\bar h_i, \mathrm{mean}_j \bar h_j, u, c])`, :math:`\bar h = \mathrm{LN}(h)`."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(4 * hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h: Tensor, control: Tensor, c: Tensor) -> Tensor:
        """``h`` ``(B, S, H)``; ``control`` (pooled control features) and ``c`` are ``(B, H)``."""
        hn = self.norm(h)
        shared = torch.cat([hn.mean(1), control, c], dim=-1).unsqueeze(1).expand(-1, h.shape[1], -1)
        return h + self.mlp(torch.cat([hn, shared], dim=-1))


class DeepSetsDenoiser(Denoiser):
    """Set-MLP baseline: per-cell MLP on ``[x_t, self_cond]`` with mean-pooled set and control features.

    Args:
        num_genes, perturbation_dim, num_cell_types, num_batches: data dimensions.
        size: preset ``"tiny"`` (hidden 64, depth 2), ``"small"`` (256, 3) or ``"paper"`` (512, 4).
        hidden, depth: explicit overrides of the preset.
        templates: read each target cell's template cell (``cond.template``) in the input layer.
    """

    def __init__(
        self,
        num_genes: int,
        perturbation_dim: int,
        num_cell_types: int = 1,
        num_batches: int = 1,
        size: str = "small",
        hidden: int | None = None,
        depth: int | None = None,
        templates: bool = False,
    ) -> None:
        super().__init__(num_genes, perturbation_dim, num_cell_types, num_batches, templates=templates)
        sizes = resolve_size(PRESETS, size, hidden=hidden, depth=depth)
        self.record_arguments(**sizes)  # the configuration names the preset's sizes
        h = sizes["hidden"]
        self.embed_target = SelfConditionedInput(num_genes, h, templates)
        self.embed_control = nn.Sequential(nn.Linear(num_genes, h), nn.SiLU(), nn.Linear(h, h))
        self.condition = ConditionEmbedding(perturbation_dim, num_cell_types, num_batches, h)
        self.layers = nn.ModuleList(EquivariantLayer(h) for _ in range(sizes["depth"]))
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, num_genes)
        nn.init.zeros_(self.out.weight)  # the prediction starts at 0, like CrossDiT's adaLN-Zero output
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        h = self.embed_target(x_t, self_cond, cond.template)
        control = self.embed_control(cond.control.to(x_t.dtype)).mean(1)
        c = self.condition(t, cond)
        for layer in self.layers:
            h = layer(h, control, c)
        return self.out(self.out_norm(h))
