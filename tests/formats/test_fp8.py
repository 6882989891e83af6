"""FP8: our arithmetic rounding agrees with torch's float8 casts (which `round_to_minifloat` takes for FP8);
scaled round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import (FP8_BITS, FP8_DTYPES, FP8_MAX, choose_scale_fp8, dequantize_fp8, minifloat_arithmetic,
                            quantize_fp8, round_to_minifloat)


def _torch_round(x, fmt):
    return x.to(FP8_DTYPES[fmt]).float()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_every_code_and_every_midpoint_matches_torch(fmt):
    exp_bits, man_bits = FP8_BITS[fmt]
    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPES[fmt]).float()
    finite = values[torch.isfinite(values) & (values.abs() <= FP8_MAX[fmt])].unique()
    assert torch.equal(minifloat_arithmetic(finite, exp_bits, man_bits, FP8_MAX[fmt]), finite)
    mids = (finite[1:] + finite[:-1]) / 2  # exact ties: round half to even
    assert torch.equal(minifloat_arithmetic(mids, exp_bits, man_bits, FP8_MAX[fmt]), _torch_round(mids, fmt))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["e4m3", "e5m2"]), st.integers(0, 2**31 - 1), st.sampled_from([1e-6, 1e-3, 1.0, 100.0]))
def test_random_values_match_torch(fmt, seed, magnitude):
    exp_bits, man_bits = FP8_BITS[fmt]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * magnitude
    x = x.clamp(-FP8_MAX[fmt], FP8_MAX[fmt])
    assert torch.equal(minifloat_arithmetic(x, exp_bits, man_bits, FP8_MAX[fmt]), _torch_round(x, fmt))


def test_saturates_at_max():
    assert round_to_minifloat(torch.tensor([1e6, -1e6]), 4, 3, 448.0).tolist() == [448.0, -448.0]


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["e4m3", "e5m2"]), st.integers(1, 6), st.integers(1, 200), st.integers(0, 2**31 - 1),
       st.sampled_from([1e-3, 1.0, 1e3]))
def test_scaled_round_trip(fmt, rows, cols, seed, magnitude):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * magnitude
    scale = choose_scale_fp8(x, cols, fmt)
    codes = quantize_fp8(x, scale, fmt, cols)
    assert codes.dtype == torch.uint8
    deq = dequantize_fp8(codes, scale, fmt, cols)
    _, man_bits = FP8_BITS[fmt]
    smallest_normal = 2.0 ** (2 - 2 ** (FP8_BITS[fmt][0] - 1)) * scale  # per row
    normal = x.abs() >= smallest_normal
    rel = ((deq - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert (rel <= 2.0 ** -(man_bits + 1) + 1e-6).all()
    assert torch.equal(codes.view(FP8_DTYPES[fmt]).float() * scale, deq)


def test_all_zero_rows_have_a_positive_scale():
    x = torch.zeros(2, 10)
    scale = choose_scale_fp8(x, 10, "e4m3")
    assert (scale > 0).all()
    assert torch.equal(dequantize_fp8(quantize_fp8(x, scale, "e4m3", 10), scale, "e4m3", 10), x)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_random_float32_bit_patterns_match_torch(fmt):
    """Uniform over float32 bit patterns: every exponent, from far below the subnormals to max."""
    exp_bits, man_bits = FP8_BITS[fmt]
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=torch.Generator().manual_seed(7), dtype=torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x) & (x.abs() <= FP8_MAX[fmt])]
    assert x.numel() > 50_000
    assert torch.equal(minifloat_arithmetic(x, exp_bits, man_bits, FP8_MAX[fmt]), _torch_round(x, fmt))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["e4m3", "e5m2"]), st.integers(0, 2**31 - 1))
def test_log_uniform_values_over_the_whole_range_match_torch(fmt, seed):
    exp_bits, man_bits = FP8_BITS[fmt]
    gen = torch.Generator().manual_seed(seed)
    lowest = 2 - 2 ** (exp_bits - 1) - man_bits - 2  # a little below the smallest subnormal
    top = torch.tensor(FP8_MAX[fmt]).log2().item()
    x = torch.exp2(lowest + (top - lowest) * torch.rand(2048, generator=gen))
    x = torch.where(torch.rand(2048, generator=gen) < 0.5, -x, x).clamp(-FP8_MAX[fmt], FP8_MAX[fmt])
    assert torch.equal(minifloat_arithmetic(x, exp_bits, man_bits, FP8_MAX[fmt]), _torch_round(x, fmt))


@pytest.mark.parametrize("rounding", [round_to_minifloat, minifloat_arithmetic])  # torch's cast, and ours
def test_special_values(rounding):
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-30, 464.0, 480.0, -1e6])
    out = rounding(x, 4, 3, 448.0)
    assert out[:2].tolist() == [448.0, -448.0] and out[2].isnan()
    assert out[3] == 0 and out[3].signbit() and out[4] == 0
    assert out[5:].tolist() == [448.0, 448.0, -448.0]  # saturates rather than producing NaN
    assert rounding(torch.tensor([2.0**-9, 2.0**-10, 1.5 * 2.0**-10]), 4, 3, 448.0).tolist() == [
        2.0**-9, 0.0, 2.0**-9]  # smallest e4m3 subnormal, a tie to 0 (even), a tie to 2^-9
    big = rounding(torch.tensor([float("inf"), -float("inf"), 61440.0, 1e9]), 5, 2, 57344.0)
    assert big.tolist() == [57344.0, -57344.0, 57344.0, 57344.0]  # e5m2 saturates too, though it has infinities


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["e4m3", "e5m2"]), st.integers(1, 6), st.integers(1, 300), st.integers(1, 320),
       st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_grouped_codes_are_torch_bit_patterns(fmt, rows, cols, group, seed, dtype):
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    scale = choose_scale_fp8(x, group, fmt)
    assert scale.shape == (rows, -(-cols // group)) and scale.dtype == torch.float32
    codes = quantize_fp8(x, scale, fmt, group)
    y = x.float() / scale[:, torch.arange(cols) // group]
    assert y.abs().max() <= FP8_MAX[fmt] * (1 + 1e-6)  # absmax scaling clips by one float32 ulp at most
    y = y.clamp(-FP8_MAX[fmt], FP8_MAX[fmt])
    assert torch.equal(codes, y.to(FP8_DTYPES[fmt]).view(torch.uint8))
    # and the values they stand for are our arithmetic's rounding of y (the codec itself uses torch's cast)
    assert torch.equal(codes.view(FP8_DTYPES[fmt]).float(), minifloat_arithmetic(y, *FP8_BITS[fmt], FP8_MAX[fmt]))
    assert dequantize_fp8(codes, scale, fmt, group, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(LowbitError, match="FP8 format must be one of e4m3, e5m2, got 'e3m4'"):
        choose_scale_fp8(torch.ones(1, 4), 4, "e3m4")
    with pytest.raises(LowbitError, match="exp_bits >= 1"):
        round_to_minifloat(torch.ones(3), 0, 3, 1.0)
