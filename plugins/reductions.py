"""Dense and memory-bounded (blocked) kernel reductions."""

from __future__ import annotations

import torch
from torch import Tensor

from perturbdiff_core.kernels import Kernel
from perturbdiff_core.reductions import KernelReduction


class DenseReduction(KernelReduction):
    """Forms the full ``N x M`` kernel matrix: fastest for small sets, O(N M) memory."""

    def weighted_sum(self, kernel: Kernel, x: Tensor, y: Tensor, wx: Tensor, wy: Tensor, *, same: bool = False, exclude_diagonal: bool = False) -> Tensor:
        k = kernel.forward(x, y, same=same)
        if exclude_diagonal:
            k = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
        return (wx.unsqueeze(-2) @ k @ wy.unsqueeze(-1)).squeeze(-1).squeeze(-1)
