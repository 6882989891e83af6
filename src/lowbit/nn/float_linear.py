"""`FloatLinear`: an ``nn.Linear`` left in float whose few-token CPU forward runs lowbit's float GEMV.

A quantised model's layers that stay in float still run once per generated token: above all the
output projection, which in a small model is tied to the embedding and is its largest matrix
(49152 × 576 in the default model). On this project's 2-core machine torch's float32 GEMV took
10.7 ms per token on that head, ``lowbit::float_gemv_cpu`` 5.5 ms (torch 2.13.0, 2026-11-28,
bench/results/cpu_float_gemv.md), with float32 sums of float32 products as ``F.linear``'s (only
their order differs).

`use_float_gemv` swaps the class of a model's plain ``nn.Linear`` modules in place: their parameters,
ties and state-dict keys stay as they were, and ``isinstance(m, nn.Linear)`` still holds.
Everything but a few tokens on CPU in inference — more tokens, another device, a graph that needs
gradients, mixed dtypes, `lowbit.kernels.dispatch.reference_only` — is ``F.linear`` as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.kernels import cpu, dispatch

# The tokens per call the GEMV takes, by weight dtype (first, last): elsewhere torch's own call was as fast or faster.
# Read off bench/results/cpu_float_gemv.md (this project's machine, 2 threads, 2026-11-28, on the default model's
# head and linear shapes and two LLaMA-7B ones): float32 weights were 1.3–4.4× F.linear from 1 to 12 tokens;
# bfloat16 ones 1.1–1.9× up to 8 tokens and 0.86–1.01× at 12; float16 ones 1.0–3.7× from 2 to 12 tokens, but
# 0.70–0.79× at one token on the default model's shapes, where torch has a fast half-precision GEMV of its own.
TOKENS = {torch.float32: (1, 12), torch.bfloat16: (1, 8), torch.float16: (2, 12)}


class FloatLinear(nn.Linear):
    """``nn.Linear`` whose forward for a few tokens (`TOKENS`) on CPU, without gradients, is lowbit's float GEMV."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        first, last = TOKENS.get(weight.dtype, (1, 0))
        tokens = x.numel() // max(1, self.in_features)
        if (first <= tokens <= last and x.device.type == "cpu" and weight.device.type == "cpu"
                and x.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
                and x.dim() > 0 and x.shape[-1] == self.in_features
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                      or bias is not None and bias.requires_grad))
                and dispatch.kernels_enabled() and cpu.extension() is None):
            return cpu.FLOAT_GEMV_OP(x, weight, bias)
        return F.linear(x, weight, bias)


def use_float_gemv(model: nn.Module) -> list[str]:
    """Make every plain ``nn.Linear`` of ``model`` a `FloatLinear`, in place; returns their names."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = FloatLinear
            names.append(name)
    return names


__all__ = ["FloatLinear", "TOKENS", "use_float_gemv"]
