"""Pure number-format codecs (no nn.Module): affine integers, NF4/FP4 lookups, FP8, bit packing."""

from lowbit.formats.fp8 import (
    FP8_BITS,
    FP8_DTYPES,
    FP8_MAX,
    choose_scale_fp8,
    dequantize_fp8,
    fp4_codes_from_values,
    minifloat_arithmetic,
    quantize_fp8,
    round_to_minifloat,
)
from lowbit.formats.integer import (
    check_bits,
    check_group_size,
    choose_qparams_affine,
    dequantize_affine,
    expand_groups,
    fake_quantize_affine,
    group_index,
    group_minmax,
    int_range,
    num_groups,
    pad_to_groups,
    quantize_affine,
    store_scale,
)
from lowbit.formats.lut import (
    NF4_OFFSET,
    choose_scale_absmax,
    dequantize_lut,
    double_dequantize,
    double_quantize,
    fp4_e2m1_levels,
    nf4_levels,
    quantize_lut,
    table_lookup,
)
from lowbit.formats.packing import pack, packed_length, unpack

__all__ = [
    "FP8_BITS", "FP8_DTYPES", "FP8_MAX", "NF4_OFFSET",
    "check_bits", "check_group_size", "choose_qparams_affine", "choose_scale_absmax", "choose_scale_fp8",
    "dequantize_affine", "dequantize_fp8", "dequantize_lut", "double_dequantize", "double_quantize",
    "expand_groups", "fake_quantize_affine", "fp4_codes_from_values", "fp4_e2m1_levels", "group_index",
    "group_minmax", "int_range", "nf4_levels", "num_groups", "pack", "packed_length", "pad_to_groups",
    "minifloat_arithmetic", "quantize_affine", "quantize_fp8", "quantize_lut", "round_to_minifloat", "store_scale",
    "table_lookup", "unpack",
]
