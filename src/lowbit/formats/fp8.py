"""8-bit floating point (FP8) with absmax scales: e4m3 (max 448) and e5m2 (max 57344).

Formats as in Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv 2209.05433)
and the OCP 8-bit floating point specification: e4m3 has no infinities (the "fn"
variant torch calls ``float8_e4m3fn``), e5m2 follows IEEE 754 conventions.

`minifloat_arithmetic` rounds in plain arithmetic (no float8 casts) for any small float
format, so it also gives FP4 e2m1; it agrees exactly with torch's float8 casts on every
finite in-range value (tested), rounding half to even and saturating at ±max.
`round_to_minifloat` takes torch's cast for e4m3 and e5m2 themselves (the same values, 4x
faster on this project's 2-core machine) and the arithmetic for any other format.
Codes are the 8-bit patterns, stored as uint8. FP4 e2m1 codes go through
`lowbit.formats.lut.quantize_lut` with `fp4_e2m1_levels` (nearest level), or through
`fp4_codes_from_values` after `round_to_minifloat(y, 2, 1, 6.0)` (round half to even).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.integer import expand_groups, pad_to_groups, store_scale
from lowbit.formats.lut import FP4_E2M1_MAGNITUDES, table_lookup

FP8_MAX: dict[str, float] = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_BITS: dict[str, tuple[int, int]] = {"e4m3": (4, 3), "e5m2": (5, 2)}
FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# (exp_bits, man_bits, max) of the formats torch casts to: `round_to_minifloat` uses the cast
_TORCH_MINIFLOATS = {(*FP8_BITS[fmt], FP8_MAX[fmt]): FP8_DTYPES[fmt] for fmt in FP8_MAX}


def _check_fmt(fmt: str) -> None:
    if fmt not in FP8_MAX:
        raise LowbitError(f"FP8 format must be one of {', '.join(FP8_MAX)}, got {fmt!r}.")


def round_to_minifloat(x: Tensor, exp_bits: int, man_bits: int, max_value: float) -> Tensor:
    """Nearest value of a (1, exp_bits, man_bits) float with IEEE bias, subnormals included.

    Halfway cases go to the even mantissa; magnitudes beyond ``max_value`` saturate (so
    do infinities); NaN stays NaN; the sign of zero is kept. Returns float32.
    """
    dtype = _TORCH_MINIFLOATS.get((exp_bits, man_bits, max_value))
    if dtype is None:
        return minifloat_arithmetic(x, exp_bits, man_bits, max_value)
    # saturated first (the cast would make an out-of-range value NaN), then rounded half to even by the cast
    return x.float().clamp(-max_value, max_value).to(dtype).float()


def minifloat_arithmetic(x: Tensor, exp_bits: int, man_bits: int, max_value: float) -> Tensor:
    """`round_to_minifloat` in float32 arithmetic, for any format."""
    if not isinstance(exp_bits, int) or not isinstance(man_bits, int) or exp_bits < 1 or man_bits < 0:
        raise LowbitError(f"minifloat needs exp_bits >= 1 and man_bits >= 0, got ({exp_bits!r}, {man_bits!r}).")
    if not max_value > 0:
        raise LowbitError(f"minifloat max_value must be positive, got {max_value!r}.")
    bias = (1 << (exp_bits - 1)) - 1
    xf = x.float()
    mag = xf.abs()
    _, exponent = torch.frexp(mag)  # mag = m · 2^exponent with m in [0.5, 1)
    binade = (exponent - 1).clamp(min=1 - bias)  # floor(log2 |x|); subnormals share the lowest binade
    step = torch.pow(2.0, (binade - man_bits).float())  # spacing of representable values there
    rounded = torch.round(mag / step) * step  # torch.round rounds half to even
    rounded = rounded.clamp(max=max_value)
    return torch.copysign(rounded, xf)


def fp4_codes_from_values(v: Tensor) -> Tensor:
    """FP4 e2m1 codes (sign << 3 | magnitude index, as `fp4_e2m1_levels`) of e2m1 values, uint8.

    ``fp4_codes_from_values(round_to_minifloat(y, 2, 1, 6.0))`` encodes with round half to
    even; `quantize_lut` with the FP4 levels gives the same values except at exact ties.
    """
    mags = torch.tensor(FP4_E2M1_MAGNITUDES, dtype=torch.float32, device=v.device)  # (8,)
    vf = v.float()
    index = torch.searchsorted(mags, vf.abs().contiguous())
    index = index.clamp(max=mags.numel() - 1)
    if not bool((mags[index] == vf.abs()).all()):
        raise LowbitError("values must be FP4 e2m1 values (±0, 0.5, 1, 1.5, 2, 3, 4, 6) to be encoded.")
    return (torch.signbit(vf).to(torch.uint8) << 3) | index.to(torch.uint8)


@functools.cache
def _fp8_values(fmt: str, device: torch.device) -> Tensor:
    """The value of every 8-bit pattern of ``fmt``, (256,) float32 (NaN where the pattern is NaN)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(FP8_DTYPES[fmt]).float()


def choose_scale_fp8(x: Tensor, group_size: int, fmt: str, scale_dtype: torch.dtype = torch.float32) -> Tensor:
    """absmax / FP8_MAX per group, (R, G); an all-zero group gets the smallest normal."""
    _check_fmt(fmt)
    absmax = pad_to_groups(x.float().abs(), group_size).amax(dim=-1)
    return store_scale(absmax / FP8_MAX[fmt], scale_dtype)


def quantize_fp8(x: Tensor, scale: Tensor, fmt: str, group_size: int) -> Tensor:
    """FP8 bit patterns of x / s, (R, C) uint8."""
    _check_fmt(fmt)
    limit = FP8_MAX[fmt]
    y = (x.float() / expand_groups(scale.float(), x.shape[1], group_size)).clamp(-limit, limit)
    # torch's cast rounds half to even, as `round_to_minifloat` does for these formats (the same cast)
    return y.to(FP8_DTYPES[fmt]).view(torch.uint8)


def dequantize_fp8(codes: Tensor, scale: Tensor, fmt: str, group_size: int,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """value(code) * s, (R, C)."""
    _check_fmt(fmt)
    values = table_lookup(_fp8_values(fmt, codes.device), codes)  # the float8 view's cast, 1.7x faster on CPU
    return (values * expand_groups(scale.float(), codes.shape[1], group_size)).to(dtype)
