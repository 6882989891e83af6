"""`QuantizedWeight`: one quantised 2-D weight, packed as it is stored.

The container holds exactly the tensors that go to disk — packed codes, scales, packed
zero points, and for double-quantised NF4 the second-level scale codes — so that
``bits_per_weight`` counts every byte, metadata included, and cannot drift from what a
checkpoint holds.

Layout (all row-major, groups along the input dimension, the last group of a row may be
smaller when the group size does not divide the number of columns):

================  ===========================================  =========================
field             shape / dtype                                 meaning
================  ===========================================  =========================
``qdata``         (R, ceil(C*bits/8)) uint8                     codes, LSB-first bitstream
``scale``         (R, G) ``spec.scale_dtype``; (R*G,) int8       per-group step / absmax
                  when double-quantised
``zero_point``    (R, ceil(G*bits/8)) uint8 or None             asymmetric int only
``scale_scale``   (ceil(R*G/256),) float32 or None              double quantisation only
``scale_offset``  () float32 or None                            double quantisation only
``g_idx``         (C,) int32 or None                            group of each column when
                                                               act-order reorders groups
================  ===========================================  =========================

Symmetric integer codes are stored offset by 2**(bits-1) so that every stored code is
unsigned. Per-tensor granularity keeps the (R, C) code layout with a (1, 1) scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lowbit import observers
from lowbit.errors import LowbitError
from lowbit.formats import (
    FP8_MAX,
    choose_qparams_affine,
    dequantize_affine,
    dequantize_fp8,
    dequantize_lut,
    double_dequantize,
    double_quantize,
    fp4_e2m1_levels,
    int_range,
    nf4_levels,
    num_groups,
    pack,
    packed_length,
    quantize_affine,
    quantize_fp8,
    quantize_lut,
    store_scale,
    unpack,
)
from lowbit.formats.packing import row_blocks
from lowbit.scheme import QuantSpec

DOUBLE_QUANT_BLOCK = 256
DEQUANT_CODES = 1 << 22  # codes `QuantizedWeight.dequantize` decodes per step (float32 temporaries of 16 MB)


def lut_levels(fmt: str) -> Tensor:
    """The 16 levels a 4-bit lookup format's codes index (``nf4`` or ``fp4``), (16,) float32."""
    return nf4_levels() if fmt == "nf4" else fp4_e2m1_levels()


def _level_max(fmt: str) -> float:
    if fmt.startswith("fp8_"):
        return FP8_MAX[fmt[4:]]
    return float(lut_levels(fmt).abs().max())


def _scale_from_absmax(absmax: Tensor, level_max: float, dtype: torch.dtype) -> Tensor:
    """Absmax scale in ``dtype``, rounded up, never zero (see `store_scale`)."""
    return store_scale(absmax.float() / level_max, dtype)


def _double_dequantized_scales(codes: Tensor, block_scale: Tensor, offset: Tensor,
                               shape: tuple[int, int]) -> Tensor:
    """Second-level decode of NF4 block scales; kept positive so codes never flip sign."""
    scale = double_dequantize(codes, block_scale, offset, shape, DOUBLE_QUANT_BLOCK)
    return scale.clamp_min(torch.finfo(torch.float32).smallest_normal)


@dataclass
class QuantizedWeight:
    """A quantised (R, C) weight; see the module docstring for the stored layout."""

    qdata: Tensor
    scale: Tensor
    zero_point: Tensor | None
    shape: tuple[int, int]
    spec: QuantSpec
    scale_scale: Tensor | None = None
    scale_offset: Tensor | None = None
    g_idx: Tensor | None = None

    # -- geometry -------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        rows, cols = self.shape
        return self.spec.group_size_for(cols, rows)

    @property
    def scale_shape(self) -> tuple[int, int]:
        rows, cols = self.shape
        if self.spec.granularity == "tensor":
            return (1, 1)
        return (rows, num_groups(cols, self.group_size))

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    # -- accounting -----------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (what a checkpoint holds for this weight)."""
        out = {"qdata": self.qdata, "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        if self.scale_scale is not None and self.scale_offset is not None:
            out["scale_scale"] = self.scale_scale
            out["scale_offset"] = self.scale_offset
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # -- decoding -------------------------------------------------------------------
    def scales(self) -> Tensor:
        """Per-group scales as float32, (R, G) (or (1, 1) per tensor)."""
        if self.scale_scale is not None and self.scale_offset is not None:
            return _double_dequantized_scales(self.scale, self.scale_scale, self.scale_offset, self.scale_shape)
        return self.scale.float().reshape(self.scale_shape)

    def codes(self, rows: slice = slice(None)) -> Tensor:
        """Unpacked integer codes (R, C) (or those of the ``rows`` given), int32; symmetric int codes are signed."""
        codes = unpack(self.qdata[rows], self.spec.bits, self.shape[1])
        if self.spec.format == "int" and self.spec.symmetric:
            codes -= 1 << (self.spec.bits - 1)  # a fresh tensor from unpack
        return codes

    def zero_points(self) -> Tensor | None:
        if self.zero_point is None:
            return None
        return unpack(self.zero_point, self.spec.bits, self.scale_shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight these codes stand for, (R, C).

        Decoded a block of rows at a time into the result, so the float32 temporaries (codes, zero points
        and scales widened to one per column) stay small beside it: whole, a 7B down projection's would
        take five copies of 0.18 GB."""
        rows, cols = self.shape
        if self.spec.granularity == "tensor":
            codes = self.codes().reshape(1, rows * cols)
            return self._decode(codes, self.scales(), self.zero_points(), self.group_size).reshape(rows, cols).to(dtype)
        scale, zero = self.scales(), self.zero_points()
        out = torch.empty(rows, cols, dtype=dtype, device=self.qdata.device)
        for block in row_blocks(rows, cols, DEQUANT_CODES):
            out[block] = self._decode(self.codes(block), scale[block], None if zero is None else zero[block],
                                      self.group_size)
        return out

    def _decode(self, codes: Tensor, scale: Tensor, zero: Tensor | None, group: int) -> Tensor:
        """float32 weights of ``codes`` (rows, cols) with their rows' scales and zero points."""
        if self.g_idx is not None:  # groups are not contiguous: expand to one scale per column
            index = self.g_idx.long()
            scale, group = scale[:, index], 1
            zero = None if zero is None else zero[:, index]
        fmt = self.spec.format
        if fmt == "int":
            return dequantize_affine(codes, scale, zero, group, dtype=torch.float32)
        if fmt in ("nf4", "fp4"):
            return dequantize_lut(codes.to(torch.uint8), scale, lut_levels(fmt), group, dtype=torch.float32)
        return dequantize_fp8(codes.to(torch.uint8), scale, fmt[4:], group, dtype=torch.float32)

    # -- act-order --------------------------------------------------------------------
    def group_order(self) -> tuple[Tensor, Tensor | None] | None:
        """For act-order weights, ``(perm, groups)``: ``perm`` (C,) int64 lists the columns group by group (a
        stable argsort of ``g_idx``), and ``groups`` gives each listed column's group, or is None where these
        are plain runs of ``group_size`` columns, as GPTQ's desc_act writes them. None without a ``g_idx``."""
        if self.g_idx is None:
            return None
        g_idx = self.g_idx.long()
        perm = torch.argsort(g_idx, stable=True)
        groups = g_idx[perm]
        runs = torch.arange(g_idx.numel(), device=g_idx.device) // self.group_size
        return perm, None if torch.equal(groups, runs) else groups

    def in_group_order(self) -> tuple[Tensor, QuantizedWeight] | None:
        """``(perm, plain)`` where `group_order` finds plain runs: ``plain`` holds the same codes with its columns
        in ``perm`` order and contiguous groups (no ``g_idx``), so ``plain.dequantize() == dequantize()[:, perm]``
        and ``x[..., perm] @ plain.T`` is this layer's product, summed in another order. Else None. The codes are
        repacked a block of rows at a time (a copy of ``qdata``; scales and zero points are shared)."""
        order = self.group_order()
        if order is None or order[1] is not None:
            return None
        perm, (rows, cols), bits = order[0], self.shape, self.spec.bits
        qdata = torch.empty_like(self.qdata)
        for block in row_blocks(rows, cols):
            qdata[block] = pack(unpack(self.qdata[block], bits, cols)[:, perm], bits)
        return perm, replace(self, qdata=qdata, g_idx=None)

    def in_column_order(self, perm: Tensor) -> QuantizedWeight:
        """The act-order weight whose `in_group_order` is ``(perm, self)``, for a weight without a ``g_idx``: its
        columns put back where ``perm`` took them from, and each column's group in a ``g_idx`` (a copy of
        ``qdata``)."""
        if self.g_idx is not None:
            raise LowbitError("in_column_order takes a weight in group order, without a g_idx.")
        (rows, cols), bits = self.shape, self.spec.bits
        perm = perm.long()
        qdata = torch.empty_like(self.qdata)
        for block in row_blocks(rows, cols):
            codes = unpack(self.qdata[block], bits, cols)
            qdata[block] = pack(torch.empty_like(codes).index_copy_(1, perm, codes), bits)
        return replace(self, qdata=qdata, g_idx=groups_of_columns(perm, self.group_size))

    def group_layout_issue(self) -> str | None:
        """Why this weight's columns cannot be read as contiguous groups of its group size that start on whole
        bytes (3-bit codes: whole 3-byte words of 8 codes), or None."""
        group, cols, bits = self.group_size, self.shape[1], self.spec.bits
        if bits == 3 and (group % 8 or cols % 8):
            return f"3-bit codes need the group size and in_features to be multiples of 8, not {group} and {cols}"
        if group * bits % 8 and group < cols:
            return f"groups of {group} do not fill whole bytes"
        return None

    # -- serialisation --------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], shape: tuple[int, int], spec: QuantSpec,
                     name: str = "weight") -> QuantizedWeight:
        """Rebuild from stored tensors, checking every shape and dtype against the spec."""
        expected = expected_layout(spec, shape, g_idx="g_idx" in tensors)
        for key, (exp_shape, exp_dtype) in expected.items():
            if key not in tensors:
                raise LowbitError(f"tensor {name}.{key} is missing.")
            t = tensors[key]
            if tuple(t.shape) != exp_shape or t.dtype != exp_dtype:
                raise LowbitError(
                    f"tensor {name}.{key} has shape {tuple(t.shape)} and dtype {t.dtype}, "
                    f"expected {exp_shape} and {exp_dtype}."
                )
        return cls(
            qdata=tensors["qdata"],
            scale=tensors["scale"],
            zero_point=tensors.get("zero_point"),
            shape=(int(shape[0]), int(shape[1])),
            spec=spec,
            scale_scale=tensors.get("scale_scale"),
            scale_offset=tensors.get("scale_offset"),
            g_idx=tensors.get("g_idx"),
        )


def groups_of_columns(perm: Tensor, group_size: int) -> Tensor:
    """The ``g_idx`` (C,) int32 under which ``perm`` lists the columns group by group, in runs of ``group_size``."""
    g_idx = torch.empty(perm.numel(), dtype=torch.int32, device=perm.device)
    g_idx[perm.long()] = (torch.arange(perm.numel(), device=perm.device) // group_size).to(torch.int32)
    return g_idx


def expected_layout(spec: QuantSpec, shape: tuple[int, int], g_idx: bool = False
                    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of every tensor stored for a weight of this shape and spec."""
    rows, cols = shape
    if spec.granularity == "tensor":
        n_rows, n_groups = 1, 1
    else:
        n_rows, n_groups = rows, num_groups(cols, spec.group_size_for(cols, rows))
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "qdata": ((rows, packed_length(cols, spec.bits)), torch.uint8),
    }
    if spec.double_quant:
        n_scales = n_rows * n_groups
        layout["scale"] = ((n_scales,), torch.int8)
        layout["scale_scale"] = ((math.ceil(n_scales / DOUBLE_QUANT_BLOCK),), torch.float32)
        layout["scale_offset"] = ((), torch.float32)
    else:
        layout["scale"] = ((n_rows, n_groups), spec.torch_scale_dtype)
    if spec.format == "int" and not spec.symmetric:
        layout["zero_point"] = ((n_rows, packed_length(n_groups, spec.bits)), torch.uint8)
    if g_idx:
        layout["g_idx"] = ((cols,), torch.int32)
    return layout


def storage_bytes(spec: QuantSpec, shape: tuple[int, int], g_idx: bool = False) -> int:
    """Bytes a weight of ``shape`` takes in this spec, without quantising anything."""
    total = 0
    for dims, dtype in expected_layout(spec, shape, g_idx).values():
        total += math.prod(dims) * torch.empty((), dtype=dtype).element_size()
    return total


# -- quantisation ------------------------------------------------------------------------

def check_finite(w: Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise LowbitError(f"tensor {name} contains {bad} NaN or Inf value(s); refusing to quantise it.")


def _observe(x: Tensor, group: int, spec: QuantSpec, fake_quant: Callable[[Tensor, Tensor, Tensor], Tensor]
             ) -> tuple[Tensor, Tensor]:
    if spec.observer == "percentile":
        return observers.percentile(x, group, spec.percentile)
    if spec.observer == "mse":
        return observers.mse_search(x, group, fake_quant)
    return observers.minmax(x, group)


def int_qparams(x: Tensor, spec: QuantSpec, group_size: int) -> tuple[Tensor, Tensor | None]:
    """Integer scale and zero point of each group of ``x`` (R, n), with the spec's observer."""
    sdtype = spec.torch_scale_dtype

    def fake_quant(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        s, z = choose_qparams_affine(lo, hi, spec.bits, spec.symmetric, sdtype)
        return dequantize_affine(quantize_affine(v, s, z, spec.bits, spec.symmetric, group_size), s, z, group_size)

    lo, hi = _observe(x.float(), group_size, spec, fake_quant)
    return choose_qparams_affine(lo, hi, spec.bits, spec.symmetric, sdtype)


def from_int_codes(codes: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec,
                   g_idx: Tensor | None = None) -> QuantizedWeight:
    """Pack integer codes (R, C) (signed when symmetric) with their (R, G) parameters."""
    rows, cols = codes.shape
    stored = codes + (1 << (spec.bits - 1)) if spec.symmetric else codes
    zero_packed = None if zero is None else pack(zero, spec.bits)
    index = None if g_idx is None else g_idx.to(torch.int32)
    return QuantizedWeight(pack(stored.to(torch.int32), spec.bits), scale, zero_packed, (rows, cols), spec,
                           g_idx=index)


def _rtn_input(w: Tensor, spec: QuantSpec, name: str) -> tuple[Tensor, int]:
    """A 2-D, finite weight as float32 (one row for per-tensor scales) and its group size."""
    if w.dim() != 2:
        raise LowbitError(f"tensor {name} must be 2-D to be quantised, got shape {tuple(w.shape)}.")
    check_finite(w, name)
    rows, cols = w.shape
    x = w.detach().float()
    return (x.reshape(1, rows * cols) if spec.granularity == "tensor" else x), spec.group_size_for(cols, rows)


def _int_rtn(x: Tensor, spec: QuantSpec, group: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Integer codes of ``x`` (signed when symmetric) with the scales and zero points the spec's observer picks."""
    scale, zero = int_qparams(x, spec, group)
    return quantize_affine(x, scale, zero, spec.bits, spec.symmetric, group), scale, zero


def quantize_weight(w: Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest quantisation of a 2-D weight with the range the spec's observer picks."""
    x, group = _rtn_input(w, spec, name)
    rows, cols = w.shape
    sdtype = spec.torch_scale_dtype
    fmt = spec.format
    scale_scale = scale_offset = None

    if fmt == "int":
        codes, scale, zero = _int_rtn(x, spec, group)
        return from_int_codes(codes.reshape(rows, cols), scale, zero, spec)

    level_max = _level_max(fmt)

    def encode(v: Tensor, s: Tensor) -> Tensor:
        if fmt.startswith("fp8_"):
            return quantize_fp8(v, s, fmt[4:], group)
        return quantize_lut(v, s, lut_levels(fmt), group)

    def decode(c: Tensor, s: Tensor) -> Tensor:
        if fmt.startswith("fp8_"):
            return dequantize_fp8(c, s, fmt[4:], group)
        return dequantize_lut(c, s, lut_levels(fmt), group)

    def fake_quant(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        s = _scale_from_absmax(torch.maximum(-lo, hi), level_max, sdtype)
        return decode(encode(v, s), s)

    lo, hi = _observe(x, group, spec, fake_quant)
    absmax = torch.maximum(-lo, hi)
    if spec.double_quant:
        scale_f = _scale_from_absmax(absmax, level_max, torch.float32)
        scale, scale_scale, scale_offset = double_quantize(scale_f, DOUBLE_QUANT_BLOCK)
        # Encode against the scales the checkpoint will actually decode with.
        scale_used = _double_dequantized_scales(scale, scale_scale, scale_offset, tuple(scale_f.shape))
        codes = encode(x, scale_used)
    else:
        scale = _scale_from_absmax(absmax, level_max, sdtype)
        codes = encode(x, scale)

    qdata = pack(codes.reshape(rows, cols).to(torch.int32), spec.bits)
    return QuantizedWeight(qdata, scale, None, (rows, cols), spec, scale_scale, scale_offset)


def rtn_dequantized(w: Tensor, spec: QuantSpec, name: str = "weight") -> Tensor:
    """``quantize_weight(w, spec).dequantize()``, bit for bit, without packing the integer codes and reading them
    back (a third of the round trip's time: 11-14 ms against 33-45 ms for the default model's layers, int3/int4,
    an AMD Zen 3, 2026-11-29): what the bit planner compares each candidate spec by. Formats other
    than integers take the round trip itself."""
    if spec.format != "int":
        return quantize_weight(w, spec, name).dequantize()
    x, group = _rtn_input(w, spec, name)
    codes, scale, zero = _int_rtn(x, spec, group)
    return dequantize_affine(codes, scale, zero, group).reshape(w.shape)


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Quantise then dequantise ``x`` (any shape, last dim = features) with min-max ranges.

    This is dynamic activation quantisation as the reference kernels define it: per
    token means one scale per row of the flattened (tokens, features) matrix, per tensor
    one scale for all of it. No packing happens: the codes never leave this function.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    if spec.granularity == "tensor":
        x2 = x2.reshape(1, -1)
    group = spec.group_size_for(x2.shape[1], x2.shape[0]) if spec.granularity == "group" else x2.shape[1]
    sdtype = spec.torch_scale_dtype
    if spec.format == "int" and spec.symmetric and group == x2.shape[1] and sdtype == torch.float32:
        # One float32 scale per row (W8A8's per-token activations, on every call): the same
        # values as the general path below, in five ops instead of twenty.
        qmin, qmax = int_range(spec.bits, True)
        s = x2.abs().amax(dim=1, keepdim=True) / qmax
        s = s.masked_fill(s == 0, torch.finfo(torch.float32).smallest_normal)
        return torch.round(x2 / s).clamp_(qmin, qmax).mul_(s).reshape(shape).to(x.dtype)
    if spec.format == "int":
        lo, hi = observers.minmax(x2, group)
        s, z = choose_qparams_affine(lo, hi, spec.bits, spec.symmetric, sdtype)
        out = dequantize_affine(quantize_affine(x2, s, z, spec.bits, spec.symmetric, group), s, z, group)
    elif spec.format.startswith("fp8_"):
        lo, hi = observers.minmax(x2, group)
        s = _scale_from_absmax(torch.maximum(-lo, hi), _level_max(spec.format), sdtype)
        out = dequantize_fp8(quantize_fp8(x2, s, spec.format[4:], group), s, spec.format[4:], group)
    else:
        raise LowbitError(f"activations cannot use the {spec.format!r} format.")
    return out.reshape(shape).to(x.dtype)


def fake_quantize_static(x: Tensor, spec: QuantSpec, scale: Tensor) -> Tensor:
    """Quantise then dequantise ``x`` with a fixed per-tensor ``scale`` (static activations, calibrated once).

    Values beyond the calibrated range saturate at the largest code, as an integer kernel's would.
    """
    if spec.format == "int":
        qmin, qmax = int_range(spec.bits, True)
        s = scale.float()
        return torch.round(x.float() / s).clamp_(qmin, qmax).mul_(s).to(x.dtype)
    if spec.format.startswith("fp8_"):
        flat = x.reshape(1, -1).float()
        s = scale.float().reshape(1, 1)
        out = dequantize_fp8(quantize_fp8(flat, s, spec.format[4:], flat.shape[1]), s, spec.format[4:], flat.shape[1])
        return out.reshape(x.shape).to(x.dtype)
    raise LowbitError(f"activations cannot use the {spec.format!r} format.")
