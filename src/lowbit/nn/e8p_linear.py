"""`E8PLinear`: y = x Wᵀ (+ b) with W stored as E8P codes (`lowbit.formats.e8p`), 2 bits per weight.

Buffers: ``codes`` (R, C/8) int16 — one 16-bit code per 8 consecutive weights of a row — and
``scale`` (R,) float16. On CUDA (or under TRITON_INTERPRET=1) with Triton installed the fused
decode-matmul kernel (`lowbit.kernels.triton.e8p`) runs; elsewhere the reference decoder (rows of
the 65536-entry codebook) makes the float weight, kept while the buffers stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.algorithms.ldlq import E8PWeight
from lowbit.errors import LowbitError
from lowbit.formats import e8p


class E8PLinear(nn.Module):
    def __init__(self, weight: E8PWeight, bias: Tensor | None = None, use_kernel: bool | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scale", weight.scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.use_kernel = use_kernel  # None: the Triton kernel on CUDA tensors, the reference elsewhere
        self._dense: tuple[Tensor, Tensor, torch.dtype, Tensor] | None = None

    @classmethod
    def empty(cls, shape: tuple[int, int], bias: bool = False) -> E8PLinear:
        R, C = shape
        if C % e8p.DIM:
            raise LowbitError(f"an E8P layer needs a multiple of {e8p.DIM} input features, got {C}.")
        weight = E8PWeight(torch.zeros(R, C // e8p.DIM, dtype=torch.int16), torch.ones(R, dtype=torch.float16))
        return cls(weight, torch.zeros(R) if bias else None)

    @property
    def weight(self) -> E8PWeight:
        return E8PWeight(self._buffers["codes"], self._buffers["scale"])  # type: ignore[arg-type]

    def _reference_weight(self, dtype: torch.dtype) -> Tensor:
        codes, scale = self._buffers["codes"], self._buffers["scale"]
        cached = self._dense
        if cached is None or cached[0] is not codes or cached[1] is not scale or cached[2] != dtype:
            cached = self._dense = (codes, scale, dtype, self.weight.dequantize(dtype))  # type: ignore[arg-type]
        return cached[3]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise LowbitError(f"{self.extra_repr()}: expects inputs (..., {self.in_features}), got {tuple(x.shape)}.")
        use_kernel = self.use_kernel if self.use_kernel is not None else x.device.type == "cuda"
        if use_kernel:
            from lowbit.kernels.triton.e8p import e8p_linear

            return e8p_linear(x, self._buffers["codes"], self._buffers["scale"], self.bias)
        return F.linear(x, self._reference_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        self._dense = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_dense": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=e8p (2 bits, QuIP#)"


def e8p_modules(model: nn.Module) -> dict[str, E8PLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, E8PLinear)}


__all__ = ["E8PLinear", "e8p_modules"]
