"""lowbit's quantised matmuls as ``torch.library`` custom ops.

Each op takes plain tensors (the `QuantizedWeight` fields) and its format as a JSON
string, so that ``torch.compile`` and ``torch.export`` see one opaque node with a fake
(meta) implementation that gives the output's shape and dtype without computing it.
``lowbit::dequant_linear`` is the reference — dequantise, then ``F.linear`` — and is
what every faster kernel is checked against.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import Tensor

from lowbit.kernels.reference import quantized_linear
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight


@functools.lru_cache(maxsize=256)
def spec_from_json(text: str) -> QuantSpec:
    return QuantSpec.from_dict(json.loads(text))


@functools.lru_cache(maxsize=256)  # called on every forward of a QuantLinear
def spec_to_json(spec: QuantSpec | None) -> str:
    return "" if spec is None else json.dumps(spec.to_dict(), sort_keys=True)


@torch.library.custom_op("lowbit::dequant_linear", mutates_args=())
def dequant_linear(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None, scale_scale: Tensor | None,
                   scale_offset: Tensor | None, g_idx: Tensor | None, bias: Tensor | None, out_features: int,
                   in_features: int, spec: str, activations: str) -> Tensor:
    """``q(x) @ dequant(W).T + b`` (the reference quantised linear)."""
    weight = QuantizedWeight(qdata, scale, zero_point, (out_features, in_features), spec_from_json(spec),
                             scale_scale, scale_offset, g_idx)
    act = spec_from_json(activations) if activations else None
    return quantized_linear(x, weight, bias, act).clone()  # custom ops may not return views of inputs


@dequant_linear.register_fake
def _(x, qdata, scale, zero_point, scale_scale, scale_offset, g_idx, bias, out_features, in_features, spec,
      activations):
    torch._check(x.shape[-1] == in_features, lambda: f"input has {x.shape[-1]} features, the weight {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


def reference_op(x: Tensor, weight: QuantizedWeight, bias: Tensor | None, activations: QuantSpec | None) -> Tensor:
    """Call `dequant_linear` with a `QuantizedWeight`."""
    return torch.ops.lowbit.dequant_linear(x, weight.qdata, weight.scale, weight.zero_point, weight.scale_scale,
                                           weight.scale_offset, weight.g_idx, bias, weight.shape[0], weight.shape[1],
                                           spec_to_json(weight.spec), spec_to_json(activations))
