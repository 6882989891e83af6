"""Uniform affine integer quantisation, 2–8 bits, along groups of the last dimension.

A (R, C) tensor is cut into groups of ``group_size`` consecutive columns per row; when
``group_size`` does not divide C the last group of each row is smaller (as GPTQ's
``g_idx`` and compressed-tensors allow). Scales and zero points are (R, G), G =
ceil(C / group_size).

- symmetric: codes in [-2^(b-1), 2^(b-1) - 1], z = 0, s = max|x| / (2^(b-1) - 1);
- asymmetric: codes in [0, 2^b - 1], the range widened to contain 0 so that zero is
  exactly representable, s = (max - min) / (2^b - 1), z = round(-min / s).

Reference: Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018 (arXiv 1712.05877).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise LowbitError(f"bits must be an integer from 2 to 8, got {bits!r}.")


def check_group_size(group_size: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0:
        raise LowbitError(f"group size must be a positive integer, got {group_size!r}.")


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the codes."""
    check_bits(bits)
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def num_groups(cols: int, group_size: int) -> int:
    check_group_size(group_size)
    return -(-cols // group_size)  # ceil, exact for any int


def group_index(cols: int, group_size: int, device: torch.device | str | None = None) -> Tensor:
    """Group of each column, (C,) int64: ``arange(C) // group_size``."""
    check_group_size(group_size)
    return torch.arange(cols, device=device) // group_size


def expand_groups(t: Tensor, cols: int, group_size: int) -> Tensor:
    """Per-group values (R, G) → per-column values (R, C); R may be 1 to broadcast. A view of ``t`` where there is
    one group, else a new tensor; not for writing into either way."""
    groups = num_groups(cols, group_size)
    if t.dim() != 2 or t.shape[1] != groups:
        raise LowbitError(
            f"per-group parameters must have {groups} columns for {cols} columns in groups of "
            f"{group_size}, got shape {tuple(t.shape)}."
        )
    rows = t.shape[0]
    if groups == 1:
        return t.expand(rows, cols)
    # each value repeated group_size times, the ragged tail cut off: a copy, not a gather by group_index (7-11x
    # faster on this project's 2-core machine for a 576 x 1536 weight's scales)
    return t[:, :, None].expand(rows, groups, group_size).reshape(rows, groups * group_size)[:, :cols]  # (R, C)


def pad_to_groups(x: Tensor, group_size: int) -> Tensor:
    """(R, C) → (R, G, group_size), the ragged last group padded by repeating its last column.

    Repeating a column leaves every min, max and absmax unchanged.
    """
    if x.dim() != 2:
        raise LowbitError(f"grouped tensors must be 2-D (rows, cols), got shape {tuple(x.shape)}.")
    rows, cols = x.shape
    g = num_groups(cols, group_size)
    pad = g * group_size - cols
    if pad:
        x = torch.cat([x, x[:, -1:].expand(rows, pad)], dim=1)
    return x.reshape(rows, g, group_size)


def group_minmax(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Per-group minimum and maximum, each (R, G)."""
    groups = pad_to_groups(x, group_size)
    return groups.amin(dim=-1), groups.amax(dim=-1)


def store_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast float32 scales to their storage dtype, never down and never to zero.

    Rounding a scale down would shrink the grid below the range it must cover (fp16
    subnormals lose whole percent of precision), so a scale the cast lowered is moved
    up to the next representable value; a zero scale (all-zero group) becomes the
    dtype's smallest normal, so nothing ever divides by zero.
    """
    stored = scale.to(dtype)
    lowered = stored.float() < scale.float()
    if lowered.any():
        stored = torch.where(lowered, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    tiny = torch.finfo(dtype).smallest_normal
    return torch.where(stored == 0, torch.full_like(stored, tiny), stored)


def choose_qparams_affine(xmin: Tensor, xmax: Tensor, bits: int, symmetric: bool,
                          scale_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor | None]:
    """Scale (R, G) in ``scale_dtype`` and, if asymmetric, zero point (R, G) int32.

    The zero point is computed from the scale as stored, so that dequantising with the
    stored scale reproduces exactly what quantisation assumed.
    """
    qmin, qmax = int_range(bits, symmetric)
    xmin, xmax = xmin.float(), xmax.float()
    if symmetric:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        return store_scale(amax / qmax, scale_dtype), None
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    scale = store_scale((xmax - xmin) / qmax, scale_dtype)
    zero = torch.round(-xmin / scale.float()).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def quantize_affine(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, symmetric: bool,
                    group_size: int) -> Tensor:
    """Codes (R, C) int32: clamp(round(x / s) + z, qmin, qmax)."""
    qmin, qmax = int_range(bits, symmetric)
    cols = x.shape[1]
    s = expand_groups(scale.float(), cols, group_size)  # (R, C)
    q = torch.round(x.float() / s)
    if zero_point is not None:
        q = q + expand_groups(zero_point.float(), cols, group_size)
    return q.clamp(qmin, qmax).to(torch.int32)


def dequantize_affine(codes: Tensor, scale: Tensor, zero_point: Tensor | None, group_size: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """(codes - z) * s, (R, C)."""
    cols = codes.shape[1]
    q = codes.float()
    if zero_point is not None:
        q = q - expand_groups(zero_point.float(), cols, group_size)
    return (q * expand_groups(scale.float(), cols, group_size)).to(dtype)


def fake_quantize_affine(x: Tensor, bits: int, symmetric: bool, group_size: int,
                         scale_dtype: torch.dtype = torch.float16, xmin: Tensor | None = None,
                         xmax: Tensor | None = None) -> Tensor:
    """Quantise and dequantise ``x`` (min-max range unless ``xmin``/``xmax`` are given)."""
    if xmin is None or xmax is None:
        xmin, xmax = group_minmax(x.float(), group_size)
    scale, zero = choose_qparams_affine(xmin, xmax, bits, symmetric, scale_dtype)
    codes = quantize_affine(x, scale, zero, bits, symmetric, group_size)
    return dequantize_affine(codes, scale, zero, group_size, dtype=x.dtype)
