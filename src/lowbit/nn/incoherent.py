"""`IncoherentLinear`: a linear layer computed in randomised-Hadamard coordinates.

Incoherence processing (QuIP, Chee et al. 2023, arXiv 2307.13304, §4; QuIP#, Tseng et al.
2024, arXiv 2402.04396, §3): with orthogonal U = H_R·diag(s_out)/√R and V = H_C·diag(s_in)/√C
(`lowbit.formats.hadamard`), a layer y = W x is rewritten as

    y = Uᵀ W̃ V x,    W̃ = U W Vᵀ,

and W̃ is what gets quantised. Its entries are spread evenly (no outliers), and the input
Hessian that GPTQ/LDLQ sees for W̃ is that of the transformed inputs, H̃ = V H Vᵀ. Wrapping
the linear does this without touching the quantisation pipeline: the wrapper's ``inner``
module (an ``nn.Linear`` holding W̃, later replaced by its quantised form) receives V x, so the
Hessian every calibration hook gathers for it *is* H̃; the wrapper applies V to x before and
Uᵀ to the result after (each an O(n log n) transform per token), then adds the bias.

The signs are buffers (``input_signs`` and ``output_signs``, packed one bit each), so a
checkpoint holds them and `lowbit.io.native` rebuilds the wrapper; ``seed`` records where
they came from.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import (
    hadamard_size,
    pack_signs,
    random_signs,
    randomized_hadamard,
    randomized_hadamard_inverse,
    unpack_signs,
)
from lowbit.models.layers import select_linears, set_submodule


def module_seed(seed: int, name: str) -> int:
    """A per-module seed from the model-wide ``seed`` and the module's name (stable across runs)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class IncoherentLinear(nn.Module):
    """y = Uᵀ · inner(V x) + b, with ``inner`` a linear map (float or quantised) holding W̃ = U W Vᵀ."""

    def __init__(self, inner: nn.Module, in_features: int, out_features: int, input_signs: Tensor,
                 output_signs: Tensor, bias: Tensor | None = None, seed: int | None = None) -> None:
        super().__init__()
        hadamard_size(in_features)  # refuses an unsupported size with a clear sentence
        hadamard_size(out_features)
        self.in_features, self.out_features, self.seed = in_features, out_features, seed
        self.inner = inner
        self.register_buffer("input_signs", pack_signs(input_signs))
        self.register_buffer("output_signs", pack_signs(output_signs))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._signs: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (packed in, packed out, s_in, s_out)

    @classmethod
    def from_linear(cls, linear: nn.Linear, seed: int) -> IncoherentLinear:
        """Wrap ``linear``: W̃ = U W Vᵀ computed in float64, stored in the linear's dtype. The float
        function is unchanged up to rounding."""
        R, C = linear.out_features, linear.in_features
        s_in = random_signs(C, seed)
        s_out = random_signs(R, seed + 1)
        W = linear.weight.detach().double()
        W_t = randomized_hadamard(W, s_in.double())  # W Vᵀ: each row transformed by V
        W_t = randomized_hadamard(W_t.T, s_out.double()).T  # U (W Vᵀ)
        inner = nn.Linear(C, R, bias=False, device=linear.weight.device, dtype=linear.weight.dtype)
        inner.weight.data = W_t.to(linear.weight.dtype).contiguous()
        inner.weight.requires_grad_(False)
        return cls(inner, C, R, s_in, s_out, linear.bias, seed)

    @classmethod
    def empty(cls, inner: nn.Module, in_features: int, out_features: int, bias: bool = False,
              seed: int | None = None) -> IncoherentLinear:
        """A shell for loading: signs and bias are overwritten by the state dict."""
        ones_in, ones_out = torch.ones(in_features), torch.ones(out_features)
        return cls(inner, in_features, out_features, ones_in, ones_out,
                   torch.zeros(out_features) if bias else None, seed)

    def signs(self) -> tuple[Tensor, Tensor]:
        """(s_in, s_out) as float ±1 vectors, unpacked once per buffer change."""
        packed_in, packed_out = self._buffers["input_signs"], self._buffers["output_signs"]
        cached = self._signs
        if cached is None or cached[0] is not packed_in or cached[1] is not packed_out:
            cached = self._signs = (packed_in, packed_out, unpack_signs(packed_in, self.in_features),
                                    unpack_signs(packed_out, self.out_features))
        return cached[2], cached[3]

    def input_transform(self, x: Tensor) -> Tensor:
        """x ↦ V x for each row vector (what ``inner`` reads)."""
        return randomized_hadamard(x, self.signs()[0])

    def output_transform(self, y: Tensor) -> Tensor:
        """ỹ ↦ Uᵀ ỹ for each row vector (back to the layer's own output coordinates)."""
        return randomized_hadamard_inverse(y, self.signs()[1])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise LowbitError(f"{self.extra_repr()}: expects inputs (..., {self.in_features}), got {tuple(x.shape)}.")
        y = self.output_transform(self.inner(self.input_transform(x)))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @property
    def signs_bytes(self) -> int:
        return self._buffers["input_signs"].numel() + self._buffers["output_signs"].numel()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, seed={self.seed}"


def incoherent_modules(model: nn.Module) -> dict[str, IncoherentLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IncoherentLinear)}


def make_incoherent(model: nn.Module, targets: Iterable[str] = (r".*",), ignore: Iterable[str] = (r"(.*\.)?lm_head",),
                    seed: int = 0) -> dict[str, IncoherentLinear]:
    """Replace, in place, every ``nn.Linear`` matched by ``targets`` and no ``ignore`` pattern by its
    `IncoherentLinear` (signs seeded from ``seed`` and the module's name). The wrapped model computes
    the same function; quantising it afterwards (any method: the linears it selects are the wrappers'
    ``inner`` ones, named ``<module>.inner``) quantises W̃ against H̃. Returns the wrappers by name.
    Layers whose sizes have no Hadamard transform here are refused before anything is changed."""
    linears = select_linears(model, targets, ignore)
    for name, linear in linears.items():
        for size in (linear.in_features, linear.out_features):
            try:
                hadamard_size(size)
            except LowbitError as err:
                raise LowbitError(f"{name} ({linear.out_features}×{linear.in_features}): {err}") from err
    wrapped = {}
    for name, linear in linears.items():
        wrapped[name] = IncoherentLinear.from_linear(linear, module_seed(seed, name))
        set_submodule(model, name, wrapped[name])
    return wrapped


__all__ = ["IncoherentLinear", "incoherent_modules", "make_incoherent", "module_seed"]
