"""CrossDiT: a diffusion transformer over cells, with a noisy-set stream and a control-set stream.

Cells are tokens without positional encoding, so the network is permutation-equivariant over
the cells of the noisy set and invariant to the order of the control cells. Each block is a
two-stream joint-attention block in the style of MM-DiT (Esser et al. 2024, "Scaling rectified
flow transformers", section 4): each stream has its own adaLN-Zero modulation, QKV projection
and MLP (Peebles & Xie 2023, "Scalable diffusion models with transformers", section 3.2), and
one softmax runs over the concatenation of both streams' tokens, so every token attends within
its own set (self-attention) and to the other set (cross-attention) at once. Sets of a batch
never mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perturbdiff_core.constraints import Positive
from perturbdiff_core.data.batch import Conditioning
from perturbdiff_core.diffusion.denoisers import ConditionEmbedding, Denoiser, SelfConditionedInput, resolve_size
from perturbdiff_core.errors import ConfigError

#: Size presets; ``paper`` is the size of Yuan et al. (2026).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "depth": 2, "heads": 4},
    "small": {"hidden": 256, "depth": 4, "heads": 4},
    "paper": {"hidden": 512, "depth": 8, "heads": 8},
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    r"""adaLN: :math:`x (1 + \gamma) + \beta` with per-set :math:`\gamma, \beta` of shape ``(B, H)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _zero(layer: nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class _Stream(nn.Module):
    """One stream's half of a joint block; ``pre_only`` streams only supply keys and values."""

    def __init__(self, hidden: int, mlp_ratio: float, pre_only: bool) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        # adaLN-Zero: shift, scale (and, unless pre_only, gate for attention; shift, scale, gate for the MLP).
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, (2 if pre_only else 6) * hidden))
        if not pre_only:
            self.proj = nn.Linear(hidden, hidden)
            self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
            mlp_hidden = int(hidden * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))

    def pre_attention(self, x: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """``(B, N, 3H)`` queries, keys and values of the modulated tokens."""
        return self.qkv(modulate(self.norm1(x), mods[0], mods[1]))

    def post_attention(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """Gated residual updates by the attention output and the MLP."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Two-stream block: adaLN-Zero per stream, one joint attention over target and control tokens."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, last: bool) -> None:
        super().__init__()
        self.heads = heads
        self.target = _Stream(hidden, mlp_ratio, pre_only=False)
        self.control = _Stream(hidden, mlp_ratio, pre_only=last)  # the last block's control output is unused

    def _heads(self, qkv: Tensor) -> Tensor:
        b, n, _ = qkv.shape
        return qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)

    def forward(self, x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Update target tokens ``x`` ``(B, S, H)`` and control tokens ``y`` ``(B, Sc, H)`` under ``c`` ``(B, H)``."""
        mx = self.target.modulation(c).chunk(6, dim=-1)
        my = self.control.modulation(c).chunk(2 if self.control.pre_only else 6, dim=-1)
        q, k, v = torch.cat([self._heads(self.target.pre_attention(x, mx)), self._heads(self.control.pre_attention(y, my))], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, S + Sc, d)
        out = out.transpose(1, 2).flatten(2)
        s = x.shape[1]
        x = self.target.post_attention(x, out[:, :s], mx)
        if not self.control.pre_only:
            y = self.control.post_attention(y, out[:, s:], my)
        return x, y


class FinalLayer(nn.Module):
    """Zero-initialised adaLN output layer: hidden tokens -> genes (DiT's final layer)."""

    def __init__(self, hidden: int, num_genes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, num_genes)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class CrossDiT(Denoiser):
    """Diffusion transformer over cell sets with joint attention to the matched control set.

    Args:
        num_genes, perturbation_dim, num_cell_types, num_batches: data dimensions.
        size: preset ``"tiny"`` (hidden 64, depth 2, heads 4; tests and CPU demos),
            ``"small"`` (256, 4, 4) or ``"paper"`` (512, 8, 8).
        hidden, depth, heads: explicit overrides of the preset.
        mlp_ratio: MLP width as a multiple of ``hidden``.
        templates: read each target cell's template cell (``cond.template``) in the input layer.

    Example:
        >>> import torch
        >>> from perturbdiff_core.data.batch import Conditioning
        >>> net = CrossDiT(num_genes=10, perturbation_dim=3, size="tiny")
        >>> cond = Conditioning(torch.randn(2, 7, 10), torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
        ...                     torch.zeros(2, dtype=torch.long))
        >>> net(torch.randn(2, 5, 10), torch.tensor([10, 500]), cond).shape
        torch.Size([2, 5, 10])
    """

    def __init__(
        self,
        num_genes: int,
        perturbation_dim: int,
        num_cell_types: int = 1,
        num_batches: int = 1,
        size: str = "paper",
        hidden: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        templates: bool = False,
    ) -> None:
        super().__init__(num_genes, perturbation_dim, num_cell_types, num_batches, templates=templates)
        sizes = resolve_size(PRESETS, size, hidden=hidden, depth=depth, heads=heads)
        if sizes["hidden"] % sizes["heads"]:
            raise ConfigError(f"hidden ({sizes['hidden']}) must be a multiple of heads ({sizes['heads']}).")
        Positive.check(mlp_ratio, "mlp_ratio")
        self.record_arguments(**sizes)  # the configuration names the preset's sizes
        h = sizes["hidden"]
        self.embed_target = SelfConditionedInput(num_genes, h, templates)
        self.embed_control = nn.Linear(num_genes, h)
        self.condition = ConditionEmbedding(perturbation_dim, num_cell_types, num_batches, h)
        self.blocks = nn.ModuleList(
            JointBlock(h, sizes["heads"], mlp_ratio, last=i == sizes["depth"] - 1) for i in range(sizes["depth"])
        )
        self.final = FinalLayer(h, num_genes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform linears, then adaLN-Zero: every modulation and the output layer start at 0 (DiT)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            _zero(block.target.modulation[-1])
            _zero(block.control.modulation[-1])
        _zero(self.final.modulation[-1])
        _zero(self.final.linear)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        x = self.embed_target(x_t, self_cond, cond.template)
        y = self.embed_control(cond.control.to(x_t.dtype))
        c = self.condition(t, cond)
        for block in self.blocks:
            x, y = block(x, y, c)
        return self.final(x, c)
