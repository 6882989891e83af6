"""4-bit lookup-table formats: NF4 (NormalFloat) and FP4 (e2m1), with absmax scales.

NF4 (Dettmers et al., "QLoRA", arXiv 2305.14314, §3): 16 levels placed at quantiles of
a standard normal so that each level is equally used by normally distributed weights,
with an exact zero; positive and negative halves are built separately (8 positive, 7
negative levels), then the whole set is normalised to [-1, 1]. The outermost
probability is ``offset = ((1 - 1/(2·15)) + (1 - 1/(2·16))) / 2``, the mean of the
centres of the end bins for 15 and 16 bins, which keeps Φ⁻¹ finite.

Double quantisation (QLoRA §3): the fp32 absmax scales of the blocks are themselves
quantised in blocks of 256 after subtracting their mean, so that a symmetric code fits
them. The paper stores the second level as 8-bit floats; here it is symmetric absmax
int8 (codes in [-127, 127]), whose error is at most half a block step, absmax / 254.

FP4 e2m1 (OCP Microscaling formats spec v1.0): sign, 2 exponent bits, 1 mantissa bit;
magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. Code c = sign << 3 | magnitude index.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.integer import expand_groups, pad_to_groups, store_scale

NF4_OFFSET = ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2
FP4_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_CHUNK = 1 << 20  # values per step of `quantize_lut` (~40 MB of temporaries)


def nf4_levels() -> Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1], with an exact 0, (16,) float32."""
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels > 0
    negative = -ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels < 0
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    levels = levels / levels.abs().max()
    return levels.sort().values.float()


def fp4_e2m1_levels() -> Tensor:
    """Value of each FP4 e2m1 code 0..15 (code order, not sorted), (16,) float32."""
    mags = torch.tensor(FP4_E2M1_MAGNITUDES, dtype=torch.float32)
    return torch.cat([mags, -mags])


def choose_scale_absmax(x: Tensor, group_size: int, level_max: float,
                        scale_dtype: torch.dtype = torch.float16) -> Tensor:
    """absmax / level_max per group, (R, G), zeros replaced by the smallest normal."""
    absmax = pad_to_groups(x.float().abs(), group_size).amax(dim=-1)
    return store_scale(absmax / level_max, scale_dtype)


def quantize_lut(x: Tensor, scale: Tensor, levels: Tensor, group_size: int) -> Tensor:
    """Code (index into ``levels``) of the level nearest to x / s, (R, C) uint8.

    Ties go to the lower index; beyond the table's ends, the end level. For y = x / s within the table's range
    these are the codes of ``argmin`` over every level's distance |y - l| (float32), computed without that
    (elements × levels) matrix: between two neighbouring levels the argmin's choice flips once, at a float32
    value found once per table (`_flip_points`), and y's code is the count of flip points at or below it (the
    codes of every float16 value are tested for NF4 and FP4; 5x faster for NF4 than the matrix on this
    project's 2-core machine). Far beyond the range, float32 distances to several levels round to one value and
    the argmin's choice among them is an artefact of that rounding; absmax scales never put y there.
    """
    if levels.dim() != 1 or not 1 <= levels.numel() <= 256:
        raise LowbitError(f"levels must be a 1-D table of 1 to 256 values, got shape {tuple(levels.shape)}.")
    rows, cols = x.shape
    flips, first = _flip_points(tuple(levels.float().tolist()))
    flips, first = flips.to(x.device), first.to(x.device)
    y = (x.float() / expand_groups(scale.float(), cols, group_size)).reshape(-1)  # (R·C,)
    codes = torch.empty(y.numel(), dtype=torch.uint8, device=x.device)
    for start in range(0, y.numel(), _CHUNK):
        part = y[start : start + _CHUNK]
        if flips.numel() <= 16:  # a compare and an add per flip point beat a binary search per value
            rank = torch.zeros(part.shape, dtype=torch.uint8, device=x.device)
            for flip in flips.tolist():
                rank += part >= flip
        else:
            rank = torch.bucketize(part, flips, right=True, out_int32=True)
        codes[start : start + _CHUNK] = table_lookup(first, rank)
    return codes.reshape(rows, cols)


@functools.lru_cache(maxsize=64)
def _flip_points(levels: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """For the table's distinct values v_0 < ... < v_U-1: the lowest code holding each (U,) uint8, and for each
    pair of neighbours the least float32 y in [v_i, v_i+1] that ``argmin`` over |y - l| assigns to v_i+1 (U - 1,)
    float32 — the upper level wins where fl(v_i+1 - y) < fl(y - v_i), or on equality if its code is the lower.
    Both distances are monotone in y, so that choice flips once; each flip point is bisected over the float32
    values between the pair, as ordered integers."""
    table = torch.tensor(levels, dtype=torch.float32)
    values, inverse = torch.unique(table, sorted=True, return_inverse=True)
    first = torch.full((values.numel(),), table.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(table.numel()), reduce="amin")
    below, above = values[:-1], values[1:]
    upper_first = first[1:] < first[:-1]

    def upper(y: Tensor) -> Tensor:
        d_hi, d_lo = above - y, y - below
        return (d_hi < d_lo) | ((d_hi == d_lo) & upper_first)

    lo, hi = _ordered(below), _ordered(above)  # upper(lo) is False, upper(hi) True
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        flipped = upper(_from_ordered(mid))
        hi, lo = torch.where(flipped, mid, hi), torch.where(flipped, lo, mid)
    return _from_ordered(hi), first.to(torch.uint8)


def _ordered(v: Tensor) -> Tensor:
    """float32 → int64 keys in the floats' order (-0 and +0 both 0)."""
    bits = v.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _from_ordered(k: Tensor) -> Tensor:
    bits = torch.where(k < 0, (-k) | -0x80000000, k)  # the sign bit set for negative keys
    return bits.to(torch.int32).view(torch.float32)


def table_lookup(table: Tensor, codes: Tensor) -> Tensor:
    """``table[codes]`` (codes' shape) for a small 1-D table: a gather by int32 indices, about 1.7x faster on
    this project's CPU than indexing by int64 ones."""
    return table.index_select(0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)


def dequantize_lut(codes: Tensor, scale: Tensor, levels: Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """levels[code] * s, (R, C)."""
    values = table_lookup(levels.to(codes.device, torch.float32), codes)
    return (values * expand_groups(scale.float(), codes.shape[1], group_size)).to(dtype)


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size <= 0:
        raise LowbitError(f"double-quantisation block size must be a positive integer, got {block_size!r}.")


def double_quantize(scale: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """int8 codes (N,), per-block fp32 scales (ceil(N/block),) and the fp32 mean offset ().

    N = scale.numel(); the last block is smaller when ``block_size`` does not divide N.
    A block whose scales all equal the mean gets block scale 1 (its codes are all 0).
    """
    _check_block_size(block_size)
    flat = scale.float().reshape(-1)  # (N,)
    offset = flat.mean() if flat.numel() else torch.zeros((), device=flat.device)
    centred = (flat - offset)[None]  # (1, N)
    absmax = pad_to_groups(centred.abs(), block_size).amax(dim=-1)[0]  # (B,)
    block_scale = absmax / 127.0
    block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
    per_elem = expand_groups(block_scale[None], flat.numel(), block_size)[0]  # (N,)
    codes = torch.round(centred[0] / per_elem).clamp(-127, 127).to(torch.int8)
    return codes, block_scale, offset


def double_dequantize(codes: Tensor, block_scale: Tensor, offset: Tensor, shape: tuple[int, ...],
                      block_size: int = 256) -> Tensor:
    """Inverse of `double_quantize`: codes · block scale + offset, reshaped to ``shape``, float32."""
    _check_block_size(block_size)
    per_elem = expand_groups(block_scale.float()[None], codes.numel(), block_size)[0]  # (N,)
    return (codes.float() * per_elem + offset.float()).reshape(shape)
