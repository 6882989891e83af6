"""The reference quantised linear: dequantise, then an ordinary matmul in float.

Always available and always right; every faster kernel is tested against it. With an
activation spec, activations are quantised and dequantised per call first (dynamic
per-token or per-tensor ranges), which is exactly what a W8A8 / FP8 integer kernel
computes up to the accumulation order.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, fake_quantize


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Tensor | None = None,
                     activations: QuantSpec | None = None) -> Tensor:
    """``y = q(x) @ dequant(W).T + b`` for x (..., C) → (..., R), in x's dtype."""
    if activations is not None:
        x = fake_quantize(x, activations)
    w = weight.dequantize(x.dtype)  # (R, C)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


__all__ = ["quantized_linear"]
