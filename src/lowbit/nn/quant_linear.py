"""`QuantLinear`: an ``nn.Linear`` replacement that holds a `QuantizedWeight`.

The packed tensors are registered as buffers named as in the checkpoint (``qdata``,
``scale``, ``zero_point``, ``scale_scale``, ``scale_offset``), so ``state_dict()``,
``.to()`` and loading with ``assign=True`` work as for any module. With static activations
(``activations.dynamic`` false) the calibrated per-tensor activation scale is the buffer
``input_scale``; activations are then quantised with it before the weight's kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.kernels import dispatch
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, expected_layout, fake_quantize_static


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored quantised (and x quantised per call for W8A8 / FP8)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None,
                 activations: QuantSpec | None = None, input_scale: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.spec = weight.spec
        self.activations = activations
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        if activations is not None and not activations.dynamic:
            if activations.granularity != "tensor":
                raise LowbitError(f"per-{activations.granularity} activation scales are computed on each forward: "
                                  "give the activation spec dynamic=True (static scales are per tensor).")
            if input_scale is None or input_scale.numel() != 1 or not bool(input_scale.float().gt(0).all()):
                raise LowbitError("static activations need one positive calibrated input_scale "
                                  "(quantise with --method smoothquant).")
            self.register_buffer("input_scale", input_scale.detach().reshape(1).float().clone())
        elif input_scale is not None:
            raise LowbitError("input_scale applies to static activations only.")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._memo: _Memo | None = None

    @classmethod
    def empty(cls, shape: tuple[int, int], spec: QuantSpec, bias: bool = False,
              activations: QuantSpec | None = None, g_idx: bool = False,
              device: torch.device | str = "cpu") -> QuantLinear:
        """A module with correctly shaped, uninitialised buffers, to be filled by loading."""
        tensors = {name: torch.empty(dims, dtype=dtype, device=device)
                   for name, (dims, dtype) in expected_layout(spec, shape, g_idx).items()}
        weight = QuantizedWeight.from_tensors(tensors, shape, spec)
        b = torch.empty(shape[0], device=device) if bias else None
        static = activations is not None and not activations.dynamic
        return cls(weight, b, activations, torch.ones(1, device=device) if static else None)

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
        memo = self._memo
        if memo is None or not memo.holds(self):
            memo = self._memo = _Memo(self)
        activations = self.activations
        if "input_scale" in self._buffers:  # static: quantised here with the calibrated scale, the kernel
            x = fake_quantize_static(x, activations, self._buffers["input_scale"])  # then sees the codes' values
            activations = None
        m = x.numel() // self.in_features
        call = memo.calls.get((x.device, m))
        if call is None:
            if len(memo.calls) > 64:  # prefill lengths vary; keep the memo small
                memo.calls.clear()
            call = memo.calls[x.device, m] = memo.call(x.device, m, activations)
        return call(x, self.bias)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), …: the memo would keep the old buffers alive
        self._memo = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # copies and pickles rebuild the memo on first use
        return {**super().__getstate__(), "_memo": None}

    def extra_repr(self) -> str:
        act = f", activations={self.activations.describe()}" if self.activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.spec.describe()}{act}"


class _Memo:
    """What `QuantLinear.forward` derives from the buffers, kept while they and the kernel registry
    stay as they are: decoding calls each layer once per token with the same M, and building the
    weight view and choosing the kernel cost a few µs per call. Replacing a buffer (``.to()``, loading
    with ``assign=True``) or changing the registry starts a new one, prepared layouts included."""

    def __init__(self, layer: QuantLinear) -> None:
        self.registry = dispatch.registry_state()
        self.buffers = tuple(layer._buffers.values())  # held, so that no other tensor can take their ids
        self.ids = tuple(map(id, self.buffers))
        self.weight = layer.weight
        # (device, M) → the chosen kernel's run as a function of (x, bias), or what its ``bind`` made
        self.calls: dict[tuple[torch.device, int], Callable[[Tensor, Tensor | None], Tensor]] = {}
        # a kernel's prepare function → its layout of the weight, one for the kernels that share the function
        # (the CPU GEMV and prefill kernels: act-order codes sorted into group order are held once)
        self.prepared: dict[Callable, dispatch.Prepared] = {}

    def call(self, device: torch.device, m: int,
             activations: QuantSpec | None) -> Callable[[Tensor, Tensor | None], Tensor]:
        """The kernel for M tokens on ``device``, with its prepared layout (made once, shared), as one function."""
        weight = self.weight
        kernel = dispatch.choose(weight, activations, device, m)
        prepared = self.prepared.get(kernel.prepare)
        if prepared is None:
            prepared = self.prepared[kernel.prepare] = kernel.prepare(weight)
        bound = kernel.bind(prepared, weight, activations) if kernel.bind is not None else None
        return bound or (lambda x, bias: kernel.run(x, prepared, weight, bias, activations))

    def holds(self, layer: QuantLinear) -> bool:
        return self.registry == dispatch.registry_state() and tuple(map(id, layer._buffers.values())) == self.ids


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


__all__ = ["QuantLinear", "quantized_modules"]
