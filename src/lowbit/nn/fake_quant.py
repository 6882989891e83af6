"""`FakeQuantLinear` and `ActivationFakeQuant`: quantise-dequantise in the forward pass, for QAT.

The forward pass computes exactly what the real codec (`lowbit.formats`) would decode —
the same float operations in the same order — so `FakeQuantLinear.to_quant_linear` packs
codes whose dequantised weight equals the fake-quantised one bit for bit. The backward
pass treats rounding as the identity (the straight-through estimator, Bengio et al.,
arXiv 1308.3432) and clipping as a zero gradient, which makes the gradient of a learned
step size that of LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv
1902.08153): ``∂ŵ/∂s = round(w/s) − w/s`` inside the range, the clipped code outside.
A learned zero point (LSQ+, Bhalgat et al., arXiv 2004.09576) is a float rounded with the
straight-through estimator, so the stored zero point stays an integer.

``scale_grad="exact"`` replaces LSQ's step-size gradient by the true local derivative with the
integer codes q held fixed — ``ŵ = (q − z)·s``, so ``∂ŵ/∂s = q − z`` and ``∂ŵ/∂z = −s`` for every
element, clipped or not — as EfficientQAT's end-to-end training of the quantisation parameters
(E2E-QP; Chen et al., arXiv 2407.11062) does. It matters where training starts from a PTQ model
(GPTQ, AWQ, …): the latent weights then lie exactly on the grid, where LSQ's ``round(w/s) − w/s``
is zero up to float rounding and nothing is clipped, so LSQ hands the optimiser only rounding noise
for the scales. `FakeQuantLinear.freeze_codes` holds the codes themselves fixed (the latent weight
no longer enters), which is E2E-QP proper: only scales and zero points train.

Integer (any bits, symmetric or not, per tensor / channel / group, act-order ``g_idx``),
NF4 / FP4 (lookup tables, double-quantised NF4 scales included) and FP8 (e4m3, e5m2)
weights; int8 / fp8 activations, dynamic per token (no parameter) or static per tensor
with a learned scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lowbit.errors import LowbitError
from lowbit.formats import (
    FP8_BITS,
    FP8_MAX,
    dequantize_fp8,
    dequantize_lut,
    double_quantize,
    expand_groups,
    int_range,
    pack,
    pad_to_groups,
    quantize_fp8,
    quantize_lut,
    round_to_minifloat,
    table_lookup,
)
from lowbit.nn.quant_linear import QuantLinear
from lowbit.scheme import QuantSpec
from lowbit.tensor import (
    DOUBLE_QUANT_BLOCK,
    QuantizedWeight,
    _double_dequantized_scales,
    fake_quantize,
    from_int_codes,
    lut_levels,
    quantize_weight,
)


class _RoundSTE(torch.autograd.Function):
    """torch.round forward, identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _SnapSTE(torch.autograd.Function):
    """``snap(x)`` forward (any rounding onto a grid), identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, snap: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        return snap(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def round_ste(x: Tensor) -> Tensor:
    return _RoundSTE.apply(x)


def snap_ste(x: Tensor, snap: Callable[[Tensor], Tensor]) -> Tensor:
    return _SnapSTE.apply(x, snap)


def grid_limits(spec: QuantSpec) -> tuple[float, float]:
    """Smallest and largest value of w / s the format holds (int: the code range before the zero point)."""
    if spec.format == "int":
        qmin, qmax = int_range(spec.bits, spec.symmetric)
        return float(qmin), float(qmax)
    if spec.format.startswith("fp8_"):
        limit = FP8_MAX[spec.format[4:]]
        return -limit, limit
    levels = lut_levels(spec.format)
    return float(levels.min()), float(levels.max())


def _snap_float(spec: QuantSpec) -> Callable[[Tensor], Tensor]:
    """y (already within the grid's limits) → the nearest representable value, as the codec rounds."""
    if spec.format.startswith("fp8_"):
        exp_bits, man_bits = FP8_BITS[spec.format[4:]]
        limit = FP8_MAX[spec.format[4:]]
        return lambda y: round_to_minifloat(y, exp_bits, man_bits, limit)
    levels = lut_levels(spec.format)

    def snap(y: Tensor) -> Tensor:
        codes = quantize_lut(y, torch.ones(y.shape[0], 1, device=y.device), levels, y.shape[1])  # y / 1 is exact
        return table_lookup(levels.to(y.device), codes)

    return snap


def stored_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    """The scale the checkpoint will decode with, as float32, with a straight-through gradient.

    Positive (at least the storage dtype's smallest normal), cast to ``spec.scale_dtype``, and for
    double-quantised NF4 passed through the second-level int8 codec as `quantize_weight` does.
    """
    dtype = torch.float32 if spec.double_quant else spec.torch_scale_dtype
    s = scale.float().clamp(max=torch.finfo(dtype).max)
    if spec.double_quant:
        def snap(v: Tensor) -> Tensor:
            codes, block_scale, offset = double_quantize(_positive(v, dtype), DOUBLE_QUANT_BLOCK)
            return _double_dequantized_scales(codes, block_scale, offset, tuple(v.shape))
    else:
        def snap(v: Tensor) -> Tensor:
            return _positive(v, dtype)
    return snap_ste(s, snap)


def _positive(v: Tensor, dtype: torch.dtype) -> Tensor:
    """v cast to ``dtype`` and back; what casts to zero or below (a learned scale may) becomes the smallest
    normal, as `lowbit.formats.store_scale` stores an all-zero group's scale."""
    stored = v.to(dtype).float()
    return torch.where(stored > 0, stored, torch.full_like(stored, torch.finfo(dtype).smallest_normal))


def _per_column(t: Tensor, cols: int, group: int, g_idx: Tensor | None) -> Tensor:
    """(R, G) per-group values → (R, C) per column (contiguous groups, or act-order's g_idx)."""
    if g_idx is not None:
        return t[:, g_idx.long()]
    return expand_groups(t, cols, group)


class _AffineFakeQuant(torch.autograd.Function):
    """Integer quantise-dequantise of grouped x (R, G, g) with scales / zero points (R, G, 1), in one node.

    Forward: q = clamp(round(x / s) + z, lo, hi), out = (q − z) · s — the codec's operations in its
    order. Backward, ``exact`` False (straight-through rounding, LSQ / LSQ+): inside the range
    ∂out/∂x = 1, ∂out/∂s = round(x/s) − x/s; where clipped ∂out/∂x = 0, ∂out/∂s = q − z, ∂out/∂z = −s.
    ``exact`` True (EfficientQAT's E2E-QP): ∂out/∂x as before, but ∂out/∂s = q − z and ∂out/∂z = −s
    everywhere — the derivative of (q − z) · s with the codes q held fixed. One node instead of a
    chain of autograd ops keeps the per-step cost of fake quantisation small.
    """

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, z: Tensor | None, lo: float, hi: float,  # type: ignore[override]
                exact: bool = False) -> tuple[Tensor, Tensor]:
        q = torch.round(x / s)
        if z is not None:
            q = q.add_(z)
        codes = q.clamp(lo, hi)
        out = codes - z if z is not None else codes.clone()
        out = out.mul_(s)
        ctx.save_for_backward(x, s, z)
        ctx.limits = (lo, hi)
        ctx.exact = exact
        ctx.mark_non_differentiable(codes)
        return out, codes

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_codes: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, s, z = ctx.saved_tensors
        lo, hi = ctx.limits
        y = x / s
        pre = torch.round(y)
        if z is not None:
            pre = pre.add_(z)
        inside = (pre >= lo) & (pre <= hi)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            q_minus_z = pre.clamp_(lo, hi)
            if z is not None:
                q_minus_z = q_minus_z.sub_(z)
            if not ctx.exact:  # LSQ, inside: round(y) − y = (q − z) − y; clipped: q − z. Both: (q − z) − y · inside
                q_minus_z = q_minus_z.sub_(y.mul_(inside))
            grad_s = (grad * q_minus_z).sum(-1, keepdim=True)
        if z is not None and ctx.needs_input_grad[2]:
            grad_z = -(grad.sum(-1, keepdim=True) if ctx.exact else (grad * ~inside).sum(-1, keepdim=True)) * s
        return grad_x, grad_s, grad_z, None, None, None


SCALE_GRADS = ("lsq", "exact")


def _check_scale_grad(scale_grad: str) -> None:
    if scale_grad not in SCALE_GRADS:
        raise LowbitError(f"scale_grad must be one of {', '.join(SCALE_GRADS)}, got {scale_grad!r}.")


def _fake_and_codes(w: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec,
                    g_idx: Tensor | None, scale_grad: str = "lsq") -> tuple[Tensor, Tensor]:
    """(fake-quantised weight (R, C) float32, codes (R, C)) of w (R, C) with these (R, G) parameters.

    Differentiable in w, scale and zero (straight-through rounding; ``scale_grad`` ``lsq``: LSQ's
    step-size gradient, ``exact``: that of (q − z)·s with the codes fixed, see `_AffineFakeQuant`).
    Int codes are float-valued integers, as stored before the symmetric offset (signed when
    symmetric); LUT / FP8 codes are the codec's uint8 codes.
    """
    _check_scale_grad(scale_grad)
    exact = scale_grad == "exact"
    rows, cols = w.shape
    x = w.float()
    if spec.granularity == "tensor":
        x = x.reshape(1, rows * cols)
    group = spec.group_size_for(x.shape[1], x.shape[0])
    s_groups = stored_scale(scale, spec)  # (R, G)
    lo, hi = grid_limits(spec)
    z_groups = None if zero is None else round_ste(zero.float()).clamp(lo, hi)
    if spec.format == "int" and g_idx is None:
        x3 = pad_to_groups(x, group)  # the padded copies of the last column are sliced off below
        out, codes = _AffineFakeQuant.apply(x3, s_groups[..., None], None if z_groups is None else z_groups[..., None],
                                            lo, hi, exact)
        width = x.shape[1]
        out, codes = out.reshape(x.shape[0], -1)[:, :width], codes.reshape(x.shape[0], -1)[:, :width]
        if spec.granularity == "tensor":
            out, codes = out.reshape(rows, cols), codes.reshape(rows, cols)
        return out, codes  # a strided view of the padded groups: F.linear takes it as it is
    s = _per_column(s_groups, x.shape[1], group, g_idx)  # (R, C)
    if spec.format == "int":  # act-order groups: per-column parameters
        out, codes = _AffineFakeQuant.apply(x[..., None], s[..., None],
                                            None if z_groups is None else _per_column(z_groups, x.shape[1], group,
                                                                                      g_idx)[..., None], lo, hi, exact)
        return out.reshape(rows, cols), codes.reshape(rows, cols)
    # exact: the step size reaches the output only through value · s, so ∂out/∂s = value (the decoded level)
    y = (x / (s.detach() if exact else s)).clamp(lo, hi)
    with torch.no_grad():  # encoded once: the codes, and the values they decode to (y / 1 is exact)
        ones = torch.ones(y.shape[0], 1, device=y.device)
        if spec.format.startswith("fp8_"):
            codes = quantize_fp8(y, ones, spec.format[4:], y.shape[1])
            decoded = dequantize_fp8(codes, ones, spec.format[4:], y.shape[1])
        else:
            codes = quantize_lut(y, ones, lut_levels(spec.format), y.shape[1])
            decoded = dequantize_lut(codes, ones, lut_levels(spec.format), y.shape[1])
    value = snap_ste(y, lambda _: decoded)
    return (value * s).reshape(rows, cols), codes.reshape(rows, cols)


def fake_quantize_weight(w: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec,
                         g_idx: Tensor | None = None, scale_grad: str = "lsq") -> Tensor:
    """Quantise-dequantise w (R, C) with (R, G) scale / zero point, straight-through; equals the codec's decode."""
    return _fake_and_codes(w, scale, zero, spec, g_idx, scale_grad)[0]


def decode_codes(codes: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec,
                 g_idx: Tensor | None = None) -> Tensor:
    """The weight (R, C) float32 that fixed ``codes`` (R, C; as `_fake_and_codes` returns them) decode to with
    these (R, G) parameters — the same float operations as the fake-quant forward, so the same bits.

    Differentiable in scale and zero by plain autograd: ∂ŵ/∂s = q − z (int) or the decoded level
    (LUT / FP8), ∂ŵ/∂z = −s — the exact gradients of EfficientQAT's E2E-QP (arXiv 2407.11062).
    """
    rows, cols = codes.shape
    shape = (1, rows * cols) if spec.granularity == "tensor" else (rows, cols)
    group = spec.group_size_for(shape[1], shape[0])
    s = _per_column(stored_scale(scale, spec), shape[1], group, g_idx)
    if spec.format == "int":
        q = codes.reshape(shape).float()
        if zero is not None:
            lo, hi = grid_limits(spec)
            q = q - _per_column(round_ste(zero.float()).clamp(lo, hi), shape[1], group, g_idx)
        return (q * s).reshape(rows, cols)
    ones = torch.ones(shape[0], 1, device=codes.device)
    if spec.format.startswith("fp8_"):
        decoded = dequantize_fp8(codes.reshape(shape), ones, spec.format[4:], shape[1])
    else:
        decoded = dequantize_lut(codes.reshape(shape), ones, lut_levels(spec.format), shape[1])
    return (decoded * s).reshape(rows, cols)


class _ActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, spec: QuantSpec) -> Tensor:  # type: ignore[override]
        return fake_quantize(x, spec)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class ActivationFakeQuant(nn.Module):
    """Fake-quantise activations: dynamic per token (as the W8A8 / FP8 kernels do), or static per tensor
    with a learned scale (LSQ), initialised from ``input_scale`` or from the first batch's absmax."""

    def __init__(self, spec: QuantSpec, input_scale: Tensor | None = None, learn_scale: bool = True) -> None:
        super().__init__()
        if spec.format not in ("int", "fp8_e4m3", "fp8_e5m2") or (spec.format == "int" and not spec.symmetric):
            raise LowbitError(f"activations can be fake-quantised to symmetric int or fp8 only, not {spec.describe()}.")
        self.spec = spec
        if spec.dynamic:
            self.scale = None
            return
        if spec.granularity != "tensor":
            raise LowbitError("static activation scales are per tensor; give a per-token spec dynamic=True.")
        init = torch.zeros(1) if input_scale is None else input_scale.detach().float().reshape(1).clone()
        self.scale = nn.Parameter(init, requires_grad=learn_scale)
        self.register_buffer("initialised", torch.tensor(input_scale is not None))

    def forward(self, x: Tensor) -> Tensor:
        if self.scale is None:
            return _ActivationSTE.apply(x, self.spec)
        lo, hi = grid_limits(self.spec)
        if not bool(self.initialised):
            with torch.no_grad():
                self.scale.copy_(x.detach().abs().amax().float().clamp_min(1e-8).reshape(1) / hi)
                self.initialised.fill_(True)
        s = self.scale.float().clamp_min(torch.finfo(torch.float32).smallest_normal)
        y = x.float() / s
        if self.spec.format == "int":
            q = round_ste(y).clamp(lo, hi)
        else:
            q = snap_ste(y.clamp(lo, hi), _snap_float(self.spec))
        return (q * s).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """``y = fq_a(x) · fq_w(W)ᵀ + b`` with a float latent weight W trained through the straight-through estimator.

    ``scale`` (R, G) and, for asymmetric int, ``zero_point`` (R, G) are parameters when learned (LSQ / LSQ+),
    buffers otherwise. `to_quant_linear` packs the current codes into a `QuantLinear`.

    ``scale_grad`` picks the step-size / zero-point gradient: ``lsq`` (Esser et al., arXiv 1902.08153:
    ∂ŵ/∂s = round(w/s) − w/s inside the range) or ``exact`` (EfficientQAT, arXiv 2407.11062:
    ∂ŵ/∂s = q − z, ∂ŵ/∂z = −s everywhere, the codes held fixed). After `freeze_codes` the codes are a
    buffer, the latent weight is frozen and unused, and only the quantisation parameters can train.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, spec: QuantSpec, scale: Tensor,
                 zero_point: Tensor | None = None, activations: QuantSpec | None = None,
                 input_scale: Tensor | None = None, g_idx: Tensor | None = None,
                 learn_scale: bool = True, learn_zero_point: bool = True, scale_grad: str = "lsq") -> None:
        super().__init__()
        _check_scale_grad(scale_grad)
        self.scale_grad = scale_grad
        if weight.dim() != 2:
            raise LowbitError(f"FakeQuantLinear needs a 2-D weight, got shape {tuple(weight.shape)}.")
        self.out_features, self.in_features = weight.shape
        self.spec = spec
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        scale = scale.detach().float().clone()
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if zero_point is None:
            self.zero_point = None
        elif learn_zero_point:
            self.zero_point = nn.Parameter(zero_point.detach().float().clone())
        else:
            self.register_buffer("zero_point", zero_point.detach().float().clone())
        self.register_buffer("g_idx", None if g_idx is None else g_idx.to(torch.int32).clone())
        self.register_buffer("frozen_codes", None)
        self.activations = activations
        self.act_quant = None if activations is None else ActivationFakeQuant(activations, input_scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, activations: QuantSpec | None = None,
                    name: str = "weight", **learn: bool) -> FakeQuantLinear:
        """Initialised from round-to-nearest: the float weight as latent, RTN's scales and zero points."""
        if spec.double_quant:  # the first-level float32 scales: the forward pass double-quantises them
            qweight = quantize_weight(linear.weight.detach(), spec.replace(double_quant=False, scale_dtype="float32"),
                                      name=name)
        else:
            qweight = quantize_weight(linear.weight.detach(), spec, name=name)
        scale = qweight.scale.float().reshape(qweight.scale_shape)
        zero = qweight.zero_points()
        return cls(linear.weight.detach(), linear.bias, spec, scale, None if zero is None else zero.float(),
                   activations, **learn)

    @classmethod
    def from_quant_linear(cls, module: QuantLinear, **learn: bool) -> FakeQuantLinear:
        """Initialised from a quantised layer (GPTQ, AWQ, …): its decoded weight as latent, its codes' parameters.

        Double-quantised NF4 scales start from their decoded values, which a second double quantisation
        moves slightly; every other format starts exactly where the layer is."""
        qweight = module.weight
        scale = qweight.scales()
        zero = qweight.zero_points()
        return cls(qweight.dequantize(torch.float32), module.bias, qweight.spec, scale,
                   None if zero is None else zero.float(), module.activations,
                   module._buffers.get("input_scale"), qweight.g_idx, **learn)

    def _fake_and_codes(self) -> tuple[Tensor, Tensor]:
        if self.frozen_codes is not None:
            codes = self.frozen_codes.float() if self.spec.format == "int" else self.frozen_codes
            return decode_codes(self.frozen_codes, self.scale, self.zero_point, self.spec, self.g_idx), codes
        return _fake_and_codes(self.weight, self.scale, self.zero_point, self.spec, self.g_idx, self.scale_grad)

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Hold the current codes fixed (a buffer; int16 for int, the codec's uint8 otherwise) and freeze the latent
        weight: from now on only the scales and zero points can change the layer (EfficientQAT's E2E-QP)."""
        if self.frozen_codes is None:
            _, codes = self._fake_and_codes()
            self.frozen_codes = codes.to(torch.int16) if self.spec.format == "int" else codes.clone()
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def unfreeze_codes(self) -> None:
        """Back to a trainable latent weight, started on the grid: the weight the frozen codes decode to now."""
        if self.frozen_codes is not None:
            self.weight.copy_(self._fake_and_codes()[0])
            self.frozen_codes = None
        self.weight.requires_grad_(True)

    def fake_weight(self) -> Tensor:
        """The weight the forward pass uses, (R, C) float32: exactly what the packed codes will decode to."""
        return self._fake_and_codes()[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, self.fake_weight().to(x.dtype), self.bias)

    @torch.no_grad()
    def quantized_weight(self) -> QuantizedWeight:
        """The packed `QuantizedWeight` of the current latent weight and parameters."""
        spec = self.spec
        _, codes = self._fake_and_codes()
        s = stored_scale(self.scale, spec)
        shape = (self.out_features, self.in_features)
        if spec.format == "int":
            zero = None
            if self.zero_point is not None:
                lo, hi = grid_limits(spec)
                zero = torch.round(self.zero_point.float()).clamp(lo, hi).to(torch.int32)
            return from_int_codes(codes.to(torch.int32), s.to(spec.torch_scale_dtype), zero, spec, self.g_idx)
        qdata = pack(codes.to(torch.int32), spec.bits)
        if spec.double_quant:
            codes8, block_scale, offset = double_quantize(_positive(self.scale.float(), torch.float32),
                                                          DOUBLE_QUANT_BLOCK)
            return QuantizedWeight(qdata, codes8, None, shape, spec, block_scale, offset)
        return QuantizedWeight(qdata, s.to(spec.torch_scale_dtype), None, shape, spec)

    def to_quant_linear(self) -> QuantLinear:
        """A `QuantLinear` with packed weights whose decode equals `fake_weight` exactly."""
        input_scale = None
        if self.act_quant is not None and self.act_quant.scale is not None:
            input_scale = self.act_quant.scale.detach().float().clamp_min(torch.finfo(torch.float32).smallest_normal)
        bias = None if self.bias is None else self.bias.detach()
        return QuantLinear(self.quantized_weight(), bias, self.activations, input_scale)

    def extra_repr(self) -> str:
        learned = [n for n, p in (("weight", self.weight), ("scale", self.scale), ("zero_point", self.zero_point))
                   if isinstance(p, nn.Parameter) and (n != "weight" or self.frozen_codes is None)]
        act = f", activations={self.activations.describe()}" if self.activations else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.spec.describe()}"
                f"{act}, learned={'+'.join(learned) or 'nothing'}, scale_grad={self.scale_grad}")


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


__all__ = ["SCALE_GRADS", "ActivationFakeQuant", "FakeQuantLinear", "decode_codes", "fake_quant_modules",
           "fake_quantize_weight", "round_ste", "snap_ste", "stored_scale"]
