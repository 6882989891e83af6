"""Affine integer codec: error bounds, ranges and edge cases, over random shapes (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import (
    choose_qparams_affine,
    dequantize_affine,
    fake_quantize_affine,
    group_index,
    group_minmax,
    int_range,
    num_groups,
    quantize_affine,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw):
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 300))
    group = draw(st.one_of(st.integers(1, 320), st.sampled_from([32, 64, 128])))
    magnitude = draw(st.sampled_from([1e-3, 1e-1, 1.0, 30.0, 1e3]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=gen) * magnitude)
    if draw(st.booleans()):  # shifted distributions exercise the asymmetric zero point
        x = x + magnitude * draw(st.floats(-3, 3))
    return x.to(dtype), group


@settings(max_examples=200, deadline=None)
@given(tensors(), st.integers(2, 8), st.booleans(), st.sampled_from(DTYPES))
def test_error_at_most_half_a_step_inside_the_range(data, bits, symmetric, scale_dtype):
    x, group = data
    xf = x.float()
    lo, hi = group_minmax(xf, group)
    scale, zero = choose_qparams_affine(lo, hi, bits, symmetric, scale_dtype)
    codes = quantize_affine(xf, scale, zero, bits, symmetric, group)
    qmin, qmax = int_range(bits, symmetric)
    assert codes.dtype == torch.int32 and codes.min() >= qmin and codes.max() <= qmax
    deq = dequantize_affine(codes, scale, zero, group)
    cols = x.shape[1]
    s = scale.float()[:, group_index(cols, group)]
    z = zero[:, group_index(cols, group)].float() if zero is not None else torch.zeros_like(xf)
    # Rounding reaches every x within half a step beyond the end codes: that is the range.
    inside = (xf >= (qmin - z - 0.5) * s) & (xf <= (qmax - z + 0.5) * s)
    err = (deq - xf).abs()
    bound = s / 2 + 1e-6 * xf.abs() + 1e-30
    assert bool((err[inside] <= bound[inside]).all())
    assert bool(inside.all())  # min-max ranges clip nothing


@settings(max_examples=100, deadline=None)
@given(tensors(), st.integers(2, 8))
def test_asymmetric_zero_is_exact(data, bits):
    x, group = data
    lo, hi = group_minmax(x.float(), group)
    scale, zero = choose_qparams_affine(lo, hi, bits, False)
    zeros = torch.zeros(x.shape[0], x.shape[1])
    codes = quantize_affine(zeros, scale, zero, bits, False, group)
    assert torch.equal(dequantize_affine(codes, scale, zero, group), zeros)


def test_ragged_last_group_uses_only_its_columns():
    x = torch.zeros(1, 576)
    x[0, 512:] = torch.linspace(-1, 2, 64)  # the tail group of 64 has its own range
    x[0, :512] = 100.0
    lo, hi = group_minmax(x, 128)
    assert lo.shape == (1, 5) and lo[0, 4] == -1 and hi[0, 4] == 2 and hi[0, 0] == 100
    assert num_groups(576, 128) == 5


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_zero_and_constant_groups_are_finite(symmetric, scale_dtype):
    x = torch.zeros(3, 200)
    x[1] = 0.37
    x[2, :100] = -5.0
    x[2, 100:] = 1e-12  # underflows fp16
    lo, hi = group_minmax(x, 64)
    scale, zero = choose_qparams_affine(lo, hi, 4, symmetric, scale_dtype)
    assert (scale > 0).all() and torch.isfinite(scale.float()).all()
    deq = dequantize_affine(quantize_affine(x, scale, zero, 4, symmetric, 64), scale, zero, 64)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(200))
    assert torch.allclose(deq[1], x[1], rtol=0.01)
    assert torch.allclose(deq[2, :100], x[2, :100], rtol=0.01)  # bf16 scales have 8 significant bits


@pytest.mark.parametrize("bad", [0, -1, -128])
def test_group_size_must_be_positive(bad):
    with pytest.raises(LowbitError, match=f"group size must be a positive integer, got {bad}"):
        group_minmax(torch.ones(2, 8), bad)


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_unsupported_bits(bits):
    with pytest.raises(LowbitError, match=f"bits must be an integer from 2 to 8, got {bits}"):
        int_range(bits, True)


def test_ranges():
    assert int_range(4, True) == (-8, 7) and int_range(4, False) == (0, 15)
    assert int_range(8, True) == (-128, 127) and int_range(2, False) == (0, 3)


@settings(max_examples=100, deadline=None)
@given(tensors(), st.integers(2, 8), st.booleans(), st.floats(0.2, 1.0))
def test_clipped_range_error_inside_and_end_codes_outside(data, bits, symmetric, shrink):
    x, group = data
    xf = x.float()
    lo, hi = group_minmax(xf, group)
    scale, zero = choose_qparams_affine(lo * shrink, hi * shrink, bits, symmetric, torch.float32)
    codes = quantize_affine(xf, scale, zero, bits, symmetric, group)
    qmin, qmax = int_range(bits, symmetric)
    assert codes.min() >= qmin and codes.max() <= qmax
    deq = dequantize_affine(codes, scale, zero, group)
    idx = group_index(x.shape[1], group)
    s = scale[:, idx]
    z = zero[:, idx].float() if zero is not None else torch.zeros_like(xf)
    below, above = xf < (qmin - z - 0.5) * s, xf > (qmax - z + 0.5) * s
    inside = ~(below | above)
    assert bool(((deq - xf).abs()[inside] <= (s / 2 + 1e-6 * xf.abs())[inside]).all())
    assert bool((codes[below] == qmin).all()) and bool((codes[above] == qmax).all())


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(2, 300), st.integers(1, 200), st.integers(2, 8), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_ragged_tail_is_quantised_as_its_own_tensor(rows, cols, group, bits, symmetric, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    full = cols // group * group
    if full in (0, cols):  # no ragged tail: nothing to compare
        return
    lo, hi = group_minmax(x, group)
    scale, zero = choose_qparams_affine(lo, hi, bits, symmetric)
    codes = quantize_affine(x, scale, zero, bits, symmetric, group)
    tail = x[:, full:]
    tlo, thi = group_minmax(tail, cols - full)
    tscale, tzero = choose_qparams_affine(tlo, thi, bits, symmetric)
    assert torch.equal(scale[:, -1:], tscale)
    assert torch.equal(codes[:, full:], quantize_affine(tail, tscale, tzero, bits, symmetric, cols - full))


def test_group_index_and_count():
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert num_groups(10, 4) == 3 and num_groups(10, 64) == 1 and num_groups(128, 128) == 1
    assert num_groups(0, 8) == 0


def test_qparam_dtypes_and_values():
    lo, hi = torch.tensor([[-1.0, 0.5]]), torch.tensor([[3.0, 2.0]])
    scale, zero = choose_qparams_affine(lo, hi, 4, False, torch.float32)
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert torch.allclose(scale, torch.tensor([[4.0 / 15, 2.0 / 15]]))  # second range widened to [0, 2]
    assert zero.tolist() == [[4, 0]]  # round(1 / (4/15)) = round(3.75)
    scale, zero = choose_qparams_affine(lo, hi, 4, True, torch.float16)
    assert zero is None and scale.dtype == torch.float16
    assert (scale.float() >= torch.tensor([[3.0 / 7, 2.0 / 7]])).all()  # never rounded below the range


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_matches_the_three_steps(dtype):
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = fake_quantize_affine(x, 3, False, 32)
    lo, hi = group_minmax(x.float(), 32)
    scale, zero = choose_qparams_affine(lo, hi, 3, False)
    ref = dequantize_affine(quantize_affine(x, scale, zero, 3, False, 32), scale, zero, 32)
    assert out.dtype == dtype and torch.equal(out, ref.to(dtype))


def test_parameters_of_the_wrong_shape_are_refused():
    x = torch.randn(2, 10)
    with pytest.raises(LowbitError, match="per-group parameters must have 3 columns"):
        quantize_affine(x, torch.ones(2, 4), None, 4, True, 4)
