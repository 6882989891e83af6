"""The layer Hessian H = 2·XᵀX / n of a linear layer's inputs, accumulated in a stream.

GPTQ, and the methods built on it, minimise ‖(W − Q)Xᵀ‖² for the inputs X (n, C) a
linear layer sees; its second derivative in each weight row is H = 2·XᵀX (Frantar et
al., arXiv 2210.17323, §3). The sum XᵀX and the count n are kept apart, so that partial
statistics from several batches — or several processes — add exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HessianAccumulator:
    """Running XᵀX (C, C) and the number of rows n it sums."""

    xtx: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, features: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
              ) -> HessianAccumulator:
        return cls(torch.zeros(features, features, dtype=dtype, device=device))

    def add(self, x: Tensor) -> None:
        """Add inputs x (..., C): every leading index is one more row of X."""
        rows = x.reshape(-1, x.shape[-1]).to(self.xtx.dtype)  # (n, C)
        self.xtx.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        self.xtx += other.xtx
        self.count += other.count

    def hessian(self) -> Tensor:
        """H = 2·XᵀX / n, float32 (C, C); zeros if nothing was seen."""
        if self.count == 0:
            return torch.zeros_like(self.xtx, dtype=torch.float32)
        return (2.0 * self.xtx / self.count).float()
