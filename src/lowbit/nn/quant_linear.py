"""`QuantLinear`: an ``nn.Linear`` replacement that holds a `QuantizedWeight`.

The packed tensors are registered as buffers named as in the checkpoint (``qdata``,
``scale``, ``zero_point``, ``scale_scale``, ``scale_offset``), so ``state_dict()``,
``.to()`` and loading with ``assign=True`` work as for any module. With static activations
(``activations.dynamic`` false) the calibrated per-tensor activation scale is the buffer
``input_scale``; activations are then quantised with it before the weight's kernel runs.

Act-order weights whose groups are runs of ``group_size`` columns once sorted (GPTQ's desc_act ``g_idx``) are
kept with their columns in group order, as plain grouped codes, and the column order as the buffer ``perm``
(int32): each call gathers x's columns into that order, so every kernel reads them as a plain grouped weight (as
vLLM's GPTQ and Marlin layers reorder theirs on load), and the codes are held once. ``state_dict()`` and `weight`
give them back as checkpoints hold them — column order and ``g_idx``, rebuilt (a copy of the codes) — and
loading takes that form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.kernels import dispatch
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, expected_layout, fake_quantize_static, groups_of_columns

_layout_only = False  # within `checkpoint_layout`


@contextlib.contextmanager
def checkpoint_layout() -> Iterator[None]:
    """Within the block, ``state_dict()`` gives act-order layers held in group order with the checkpoint's keys,
    shapes and dtypes but without rebuilding their codes in column order: ``qdata`` is the layer's own (in group
    order), ``g_idx`` the true one (K values). For code that checks a state dict's layout or leaves the quantised
    layers' tensors out — never for writing those."""
    global _layout_only
    saved, _layout_only = _layout_only, True
    try:
        yield
    finally:
        _layout_only = saved


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored quantised (and x quantised per call for W8A8 / FP8)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None,
                 activations: QuantSpec | None = None, input_scale: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.spec = weight.spec
        self.activations = activations
        self._set_weight(weight)
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

    def _set_weight(self, weight: QuantizedWeight) -> None:
        """The weight's tensors as the buffers: act-order codes in group order with their ``perm`` where that order
        is a plain grouped layout (module docstring)."""
        ordered = weight.in_group_order() if weight.g_idx is not None and weight.group_layout_issue() is None else None
        for name in ("g_idx", "perm"):
            self._buffers.pop(name, None)
        if ordered is not None:
            perm, weight = ordered
        for name, tensor in weight.tensors().items():
            self.register_buffer(name, tensor)
        if ordered is not None:
            self.register_buffer("perm", perm.to(torch.int32))

    @property
    def kernel_weight(self) -> QuantizedWeight:
        """The buffers as a `QuantizedWeight`: what the kernels multiply `in_kernel_order` (x) with."""
        get = self._buffers.get
        return QuantizedWeight(get("qdata"), get("scale"), get("zero_point"),  # type: ignore[arg-type]
                               (self.out_features, self.in_features), self.spec,
                               get("scale_scale"), get("scale_offset"), get("g_idx"))

    @property
    def weight(self) -> QuantizedWeight:
        """The weight as a checkpoint stores it; for act-order codes kept in group order, rebuilt in column order
        with their ``g_idx`` (a copy of the codes; the layer's own are `kernel_weight`)."""
        perm = self._buffers.get("perm")
        return self.kernel_weight if perm is None else self.kernel_weight.in_column_order(perm)

    @property
    def has_g_idx(self) -> bool:
        """Whether the stored weight (`weight`, a checkpoint) has a ``g_idx``."""
        return "g_idx" in self._buffers or "perm" in self._buffers

    def buffer_keys(self) -> list[str]:
        """The names of the buffers in ``state_dict()`` (the checkpoint's: a g_idx where the layer holds a perm)."""
        return [("g_idx" if name == "perm" else name) for name in self._buffers]

    @property
    def stored_nbytes(self) -> int:
        """``weight.nbytes`` without rebuilding it: ``perm`` stands for the ``g_idx``, (K,) int32 both."""
        perm = self._buffers.get("perm")
        return self.kernel_weight.nbytes + (0 if perm is None else perm.numel() * perm.element_size())

    @property
    def bits_per_weight(self) -> float:
        """``weight.bits_per_weight`` without rebuilding it."""
        return 8.0 * self.stored_nbytes / (self.out_features * self.in_features)

    def in_kernel_order(self, x: Tensor) -> Tensor:
        """x's columns in the order of the codes the layer holds (act-order kept in group order), else x."""
        perm = self._buffers.get("perm")
        return x if perm is None else x.index_select(-1, perm)

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
        x = self.in_kernel_order(x)
        m = x.numel() // self.in_features
        call = memo.calls.get((x.device, m))
        if call is None:
            if len(memo.calls) > 64:  # prefill lengths vary; keep the memo small
                memo.calls.clear()
            call = memo.calls[x.device, m] = memo.call(x.device, m, activations)
        return call(x, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        perm = self._buffers.get("perm")
        if perm is not None:  # checkpoints hold act-order codes in column order, with their g_idx
            del destination[prefix + "perm"]
            if _layout_only:
                destination[prefix + "g_idx"] = groups_of_columns(perm, self.kernel_weight.group_size)
            else:
                destination.update((prefix + name, t) for name, t in self.weight.tensors().items())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        perm = self._buffers.get("perm")
        if perm is not None and prefix + "g_idx" in state_dict:  # a checkpoint's column order: loaded as it is,
            del self._buffers["perm"]  # then sorted again below (qdata has the same shape in either order)
            self.register_buffer("g_idx", torch.empty(perm.shape, dtype=torch.int32, device=perm.device))
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if "g_idx" in self._buffers and len(error_msgs) == errors:
            self._set_weight(self.kernel_weight)

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
        self.weight = layer.kernel_weight
        # (device, M) → the chosen kernel's run as a function of (x, bias), or what its ``bind`` made
        self.calls: dict[tuple[torch.device, int], Callable[[Tensor, Tensor | None], Tensor]] = {}
        # a kernel's prepare function → its layout of the weight, one for the kernels that share the function
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


__all__ = ["QuantLinear", "checkpoint_layout", "quantized_modules"]
