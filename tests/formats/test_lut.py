"""NF4 and FP4 lookup codecs, and QLoRA's double quantisation of the scales."""

from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import lut
from lowbit.formats import (
    NF4_OFFSET,
    choose_scale_absmax,
    dequantize_lut,
    double_dequantize,
    double_quantize,
    fp4_codes_from_values,
    fp4_e2m1_levels,
    group_index,
    nf4_levels,
    quantize_lut,
    round_to_minifloat,
)


def _nf4_from_the_paper():
    """QLoRA's construction, written independently with the standard library's Φ⁻¹."""
    ppf = NormalDist().inv_cdf

    def spaced(a, b, n):
        return [a + (b - a) * i / (n - 1) for i in range(n)]

    positive = [ppf(p) for p in spaced(NF4_OFFSET, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in spaced(NF4_OFFSET, 0.5, 8)[:-1]]
    values = sorted(positive + [0.0] + negative)
    top = max(abs(v) for v in values)
    return [v / top for v in values]


def test_nf4_levels_are_the_normal_quantiles():
    levels = nf4_levels()
    assert levels.shape == (16,) and levels.dtype == torch.float32
    assert torch.allclose(levels, torch.tensor(_nf4_from_the_paper()), atol=1e-6)
    assert levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert (levels.diff() > 0).all()
    assert NF4_OFFSET == pytest.approx(0.9677083, abs=1e-7)


def test_fp4_levels_are_e2m1():
    levels = fp4_e2m1_levels()
    assert levels[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert levels[8:].tolist() == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    grid = torch.linspace(-6, 6, 2401)
    assert set(round_to_minifloat(grid, 2, 1, 6.0).unique().tolist()) <= set(levels.tolist())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(1, 200), st.sampled_from([16, 32, 64, 100]), st.integers(0, 2**31 - 1),
       st.sampled_from(["nf4", "fp4"]))
def test_lookup_picks_the_nearest_level(rows, cols, group, seed, fmt):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    levels = nf4_levels() if fmt == "nf4" else fp4_e2m1_levels()
    scale = choose_scale_absmax(x, group, float(levels.abs().max()), torch.float32)
    codes = quantize_lut(x, scale, levels, group)
    deq = dequantize_lut(codes, scale, levels, group)
    s = scale[:, group_index(cols, group)]
    brute = ((x / s)[..., None] - levels).abs().min(dim=-1).values  # distance to the nearest level
    assert torch.allclose(((deq / s) - x / s).abs(), brute, atol=1e-5)
    assert (x.abs() <= s * levels.abs().max() * (1 + 1e-6)).all()  # absmax scaling never clips


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_double_quantisation_error_is_bounded(rows, groups, seed):
    scale = torch.rand(rows, groups, generator=torch.Generator().manual_seed(seed)) * 0.1 + 1e-3
    codes, block_scale, offset = double_quantize(scale, 256)
    assert codes.dtype == torch.int8 and codes.numel() == rows * groups
    assert block_scale.numel() == -(-rows * groups // 256)
    back = double_dequantize(codes, block_scale, offset, (rows, groups), 256)
    per = block_scale[torch.arange(rows * groups) // 256].reshape(rows, groups)
    assert ((back - scale).abs() <= per / 2 + 1e-7).all()


# The NF4 table as published (bitsandbytes' kernels; the values are facts, not code). It was
# built with float32 probabilities, hence agreement to ~2e-7 rather than exactly.
_NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_levels_match_the_published_table():
    assert torch.allclose(nf4_levels(), torch.tensor(_NF4_PUBLISHED), rtol=0, atol=5e-7)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 200), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_fp4_lookup_equals_minifloat_rounding_except_at_ties(rows, cols, group, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    levels = fp4_e2m1_levels()
    scale = choose_scale_absmax(x, group, 6.0, torch.float32)
    y = x / scale[:, group_index(cols, group)]
    codes = quantize_lut(x, scale, levels, group)
    rounded = round_to_minifloat(y, 2, 1, 6.0)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    tie = (y.abs()[..., None] == mids).any(dim=-1)
    assert torch.equal(levels[codes.long()][~tie], rounded[~tie])
    # the round-half-to-even path gives codes whose levels are exactly the rounded values
    assert torch.equal(levels[fp4_codes_from_values(rounded).long()], rounded)


def test_fp4_ties():
    y = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 7.0]])
    assert round_to_minifloat(y, 2, 1, 6.0).tolist() == [[0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, 6.0]]
    codes = quantize_lut(y, torch.ones(1, 1), fp4_e2m1_levels(), 9)  # ties go to the lower code
    assert fp4_e2m1_levels()[codes.long()].tolist() == [[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -4.0, 6.0]]


def test_fp4_codes_from_values():
    levels = fp4_e2m1_levels()
    assert fp4_codes_from_values(levels).tolist() == list(range(16))
    with pytest.raises(LowbitError, match="FP4 e2m1 values"):
        fp4_codes_from_values(torch.tensor([0.3]))


def test_lookup_in_chunks_equals_one_pass(monkeypatch):
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(3))
    levels = nf4_levels()
    scale = choose_scale_absmax(x, 64, 1.0)
    whole = quantize_lut(x, scale, levels, 64)
    monkeypatch.setattr(lut, "_CHUNK", 37)  # 37 elements per chunk
    assert torch.equal(quantize_lut(x, scale, levels, 64), whole)
    s = scale.float()[:, group_index(300, 64)]
    assert torch.equal(whole.long(), ((x / s)[..., None] - levels).abs().argmin(dim=-1))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 256), st.integers(0, 2**31 - 1), st.booleans())
def test_lookup_is_the_argmin_of_the_distances_for_any_table(count, seed, repeats):
    """Any table (unsorted, repeated values, -0 beside 0, as FP4's): within its range, the level nearest to each
    value, the lowest code on a tie, as the argmin over every level's distance picks — values at levels, at the
    midpoints between them (ties), between; beyond the range, the end level."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.round(torch.randn(count, generator=gen) * 64) / 64  # distinct levels at least 1/64 apart
    if repeats and count > 2:
        levels[torch.randint(0, count, (count // 2,), generator=gen)] = levels[0].item()
        levels[1], levels[2] = 0.0, -0.0
    ordered = levels.unique()
    inside = torch.cat([levels, (ordered[1:] + ordered[:-1]) / 2, torch.rand(500, generator=gen)
                        * (ordered[-1] - ordered[0]) + ordered[0], torch.tensor([0.0, -0.0])])
    inside = inside[(inside >= ordered[0]) & (inside <= ordered[-1])][None]
    codes = quantize_lut(inside, torch.ones(1, 1), levels, inside.shape[1])
    assert torch.equal(codes.long(), (inside[..., None] - levels).abs().argmin(dim=-1))
    beyond = torch.stack([ordered[0] - torch.tensor([1e-3, 1.0, 1e6]), ordered[-1] + torch.tensor([1e-3, 1.0, 1e6])])
    ends = quantize_lut(beyond.reshape(1, 6), torch.ones(1, 1), levels, 6).reshape(2, 3).long()
    assert (ends[0] == (levels == ordered[0]).nonzero()[0]).all()
    assert (ends[1] == (levels == ordered[-1]).nonzero()[0]).all()


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_lookup_of_every_float16_in_range_is_the_argmin(fmt):
    """NF4's and FP4's own tables, every float16 value within them (and the midpoints of their levels)."""
    levels = nf4_levels() if fmt == "nf4" else fp4_e2m1_levels()
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    every = every[torch.isfinite(every) & (every.abs() <= levels.abs().max())]
    ordered = levels.unique()
    y = torch.cat([every, (ordered[1:] + ordered[:-1]) / 2])[None]
    codes = quantize_lut(y, torch.ones(1, 1), levels, y.shape[1])
    assert torch.equal(codes.long(), (y[..., None] - levels).abs().argmin(dim=-1))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_and_constant_groups(scale_dtype):
    x = torch.zeros(2, 100)
    x[1] = -0.3
    for levels in (nf4_levels(), fp4_e2m1_levels()):
        top = float(levels.abs().max())
        scale = choose_scale_absmax(x, 40, top, scale_dtype)
        assert (scale.float() > 0).all() and scale.dtype == scale_dtype
        deq = dequantize_lut(quantize_lut(x, scale, levels, 40), scale, levels, 40)
        assert torch.equal(deq[0], torch.zeros(100))
        assert torch.allclose(deq[1], x[1], rtol=0.01)


def test_double_quantisation_edge_cases():
    same = torch.full((3, 5), 0.02)  # every scale equals the mean: codes 0, exact
    codes, block_scale, offset = double_quantize(same)
    assert (codes == 0).all() and torch.equal(double_dequantize(codes, block_scale, offset, (3, 5)), same)
    ragged = torch.rand(3, 100, generator=torch.Generator().manual_seed(0))  # 300 = 256 + 44
    codes, block_scale, offset = double_quantize(ragged)
    assert block_scale.shape == (2,) and offset.shape == ()
    centred = (ragged.reshape(-1) - ragged.mean()).abs()
    assert torch.allclose(block_scale, torch.stack([centred[:256].max(), centred[256:].max()]) / 127)
    with pytest.raises(LowbitError, match="block size must be a positive integer, got 0"):
        double_quantize(ragged, 0)
