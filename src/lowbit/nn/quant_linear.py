"""`QuantLinear`: an ``nn.Linear`` replacement that holds a `QuantizedWeight`.

The packed tensors are registered as buffers named as in the checkpoint (``qdata``,
``scale``, ``zero_point``, ``scale_scale``, ``scale_offset``), so ``state_dict()``,
``.to()`` and loading with ``assign=True`` work as for any module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.kernels import dispatch
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, expected_layout


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored quantised (and x quantised per call for W8A8 / FP8)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None,
                 activations: QuantSpec | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.spec = weight.spec
        self.activations = activations
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._prepared: dict[str, dispatch.Prepared] = {}  # kernel name → its layout, on the current device
        self._prepared_device: torch.device | None = None
        # forward's memo: the kernel registry's state and the buffers it was made for, their
        # QuantizedWeight, and (device, M) → kernel
        self._memo: tuple[tuple, QuantizedWeight, dict] | None = None

    @classmethod
    def empty(cls, shape: tuple[int, int], spec: QuantSpec, bias: bool = False,
              activations: QuantSpec | None = None, g_idx: bool = False,
              device: torch.device | str = "cpu") -> QuantLinear:
        """A module with correctly shaped, uninitialised buffers, to be filled by loading."""
        tensors = {name: torch.empty(dims, dtype=dtype, device=device)
                   for name, (dims, dtype) in expected_layout(spec, shape, g_idx).items()}
        weight = QuantizedWeight.from_tensors(tensors, shape, spec)
        b = torch.empty(shape[0], device=device) if bias else None
        return cls(weight, b, activations)

    @property
    def weight(self) -> QuantizedWeight:
        """The buffers as a `QuantizedWeight` (validated once, when the module was built)."""
        get = self._buffers.get
        return QuantizedWeight(get("qdata"), get("scale"), get("zero_point"),  # type: ignore[arg-type]
                               (self.out_features, self.in_features), self.spec,
                               get("scale_scale"), get("scale_offset"), get("g_idx"))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise LowbitError(f"{self.extra_repr()}: expects inputs (..., {self.in_features}), got {tuple(x.shape)}.")
        # Decoding calls each layer once per token with the same M: the weight view and the kernel
        # choice are remembered (a few µs per call) until a buffer is replaced (.to(), loading).
        buffers = (dispatch.registry_state(), *self._buffers.values())
        memo = self._memo
        if memo is None or len(memo[0]) != len(buffers) or any(a is not b for a, b in zip(memo[0][1:], buffers[1:])) \
                or memo[0][0] != buffers[0]:
            memo = self._memo = (buffers, self.weight, {})
        weight, chosen = memo[1], memo[2]
        key = (x.device, x.numel() // self.in_features)
        kernel = chosen.get(key)
        if kernel is None:
            if len(chosen) > 64:  # prefill lengths vary; keep the memo small
                chosen.clear()
            kernel = chosen[key] = dispatch.choose(weight, self.activations, x.device, key[1])
        if kernel is dispatch.REFERENCE:
            return kernel.run(x, {}, weight, self.bias, self.activations)
        if self._prepared_device != x.device:
            self._prepared, self._prepared_device = {}, x.device
        prepared = self._prepared.get(kernel.name)
        if prepared is None:
            prepared = self._prepared[kernel.name] = kernel.prepare(weight)
        return kernel.run(x, prepared, weight, self.bias, self.activations)

    def extra_repr(self) -> str:
        act = f", activations={self.activations.describe()}" if self.activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.spec.describe()}{act}"


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


__all__ = ["QuantLinear", "quantized_modules"]
