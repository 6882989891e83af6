"""NF4 and FP4 lookup codecs, and QLoRA's double quantisation of the scales."""

from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import (
    NF4_OFFSET,
    choose_scale_absmax,
    dequantize_lut,
    double_dequantize,
    double_quantize,
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
    if fmt == "fp4":  # agrees with the minifloat rounding except at exact ties
        assert torch.allclose(deq / s, round_to_minifloat(x / s, 2, 1, 6.0), atol=0.51)


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
