"""`LoRALinear`: a frozen quantised base layer plus trainable low-rank adapters (QLoRA).

``y = base(x) + (α / r) · x Aᵀ Bᵀ`` with A (r, in) and B (out, r); B starts at zero so the
adapted model starts exactly as the base (Hu et al., "LoRA", arXiv 2106.09685). With a 4-bit
NF4 or int4 base this is QLoRA (Dettmers et al., arXiv 2305.14314): while gradients flow the
base weight is decoded to float for the matmul, as QLoRA does, and only the adapters get
gradients; without gradients the base runs through its fast kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.kernels.reference import quantized_linear
from lowbit.nn.quant_linear import QuantLinear
from lowbit.tensor import quantize_weight


class LoRALinear(nn.Module):
    """A frozen `QuantLinear` base with trainable adapters ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def __init__(self, base: QuantLinear, rank: int, alpha: float | None = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise LowbitError(f"LoRA rank must be a positive integer, got {rank!r}.")
        if base.activations is not None:  # the training forward below decodes the weight only
            raise LowbitError("QLoRA trains adapters on weight-only bases (NF4, int4, ...); this base also "
                              "quantises its activations.")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else 2 * rank)
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.in_features)  # Kaiming-uniform (a = √5), as nn.Linear and PEFT
        a = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        device = base.qdata.device
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # the kernels have no backward: decode the frozen base for this matmul
            y = quantized_linear(self.base.in_kernel_order(x), self.base.kernel_weight, self.base.bias)
        else:
            y = self.base(x)
        update = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y + update * self.scaling

    @torch.no_grad()
    def delta(self) -> Tensor:
        """The adapters' weight update, (out, in) float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merged(self) -> QuantLinear:
        """Base + adapters re-quantised (round-to-nearest) in the base's format: one `QuantLinear`."""
        weight = self.base.weight.dequantize(torch.float32) + self.delta()
        qweight = quantize_weight(weight, self.base.spec)
        return QuantLinear(qweight, self.base.bias, self.base.activations, self.base._buffers.get("input_scale"))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


__all__ = ["LoRALinear", "lora_modules"]
