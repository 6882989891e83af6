"""Range observers: percentile inside min-max, MSE search never worse, ragged groups exact."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import observers
from lowbit.errors import LowbitError
from lowbit.formats import fake_quantize_affine


def _student_t(rows, cols, seed, dof=3):
    """Heavy-tailed data, reproducible: z / sqrt(chi²_dof / dof)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=gen)
    chi2 = torch.randn(rows, cols, dof, generator=gen).pow(2).sum(dim=-1)
    return z / (chi2 / dof).sqrt()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 300), st.sampled_from([16, 64, 128, 500]), st.integers(0, 2**31 - 1))
def test_percentile_lies_inside_minmax(rows, cols, group, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    lo, hi = observers.minmax(x, group)
    plo, phi = observers.percentile(x, group, 0.99)
    assert plo.shape == lo.shape and (plo >= lo).all() and (phi <= hi).all() and (plo <= phi).all()
    assert torch.equal(observers.percentile(x, group, 1.0)[1], hi)


def test_percentile_of_ragged_tail_uses_its_own_values():
    x = torch.cat([torch.zeros(1, 128), torch.arange(1.0, 65.0)[None]], dim=1)  # 128 + 64 columns
    lo, hi = observers.percentile(x, 128, 1.0)
    assert lo.tolist() == [[0.0, 1.0]] and hi.tolist() == [[0.0, 64.0]]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 300), st.sampled_from([32, 128]), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_mse_search_never_worse_than_minmax(rows, cols, group, bits, seed):
    x = _student_t(rows, cols, seed)

    def fq(v, lo, hi):
        return fake_quantize_affine(v, bits, False, group, torch.float32, lo, hi)

    lo, hi = observers.mse_search(x, group, fq, grid=40)
    mlo, mhi = observers.minmax(x, group)
    err_mse = observers.group_error(x, fq(x, lo, hi), group, 2.4)
    err_minmax = observers.group_error(x, fq(x, mlo, mhi), group, 2.4)
    assert (err_mse <= err_minmax + 1e-6).all()
    assert (lo.abs() <= mlo.abs() + 1e-6).all() and (hi.abs() <= mhi.abs() + 1e-6).all()  # only shrinks


def test_group_error_ignores_padding():
    x = torch.ones(1, 130)
    xhat = torch.zeros(1, 130)
    assert observers.group_error(x, xhat, 128, 2.0).tolist() == [[128.0, 2.0]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 200), st.integers(1, 80), st.floats(0.6, 1.0), st.integers(0, 2**31 - 1))
def test_percentile_is_the_nearest_rank_of_each_group(rows, cols, group, q, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    lo, hi = observers.percentile(x, group, q)
    for r in range(rows):
        for g, start in enumerate(range(0, cols, group)):
            values = sorted(x[r, start : start + group].tolist())
            k = round(q * (len(values) - 1))
            assert hi[r, g].item() == values[k] and lo[r, g].item() == values[len(values) - 1 - k]


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(2, 300), st.integers(1, 100), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_mse_search_on_a_ragged_tail_equals_the_tail_alone(rows, cols, group, bits, seed):
    x = _student_t(rows, cols, seed)
    full = cols // group * group
    if full in (0, cols):
        return

    def fq_for(g):
        return lambda v, lo, hi: fake_quantize_affine(v, bits, True, g, torch.float32, lo, hi)

    lo, hi = observers.mse_search(x, group, fq_for(group), grid=20)
    tlo, thi = observers.mse_search(x[:, full:], cols - full, fq_for(cols - full), grid=20)
    assert torch.equal(lo[:, -1:], tlo) and torch.equal(hi[:, -1:], thi)


def test_mse_search_clips_heavy_tails():
    x = _student_t(8, 512, 0, dof=2)

    def fq(v, lo, hi):
        return fake_quantize_affine(v, 3, True, 128, torch.float32, lo, hi)

    lo, hi = observers.mse_search(x, 128, fq, grid=40)
    mlo, mhi = observers.minmax(x, 128)
    assert (hi < mhi).any()  # some group found a shrunk range strictly better
    total_mse = observers.group_error(x, fq(x, lo, hi), 128, 2.4).sum()
    total_minmax = observers.group_error(x, fq(x, mlo, mhi), 128, 2.4).sum()
    assert total_mse < total_minmax


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(LowbitError, match="group size must be a positive integer, got 0"):
        observers.percentile(x, 0)
    with pytest.raises(LowbitError, match="percentile must lie in"):
        observers.percentile(x, 4, 0.3)
    with pytest.raises(LowbitError, match="grid must be a positive integer, got 0"):
        observers.mse_search(x, 4, lambda v, lo, hi: v, grid=0)
    with pytest.raises(LowbitError, match="max_shrink must lie in"):
        observers.mse_search(x, 4, lambda v, lo, hi: v, max_shrink=1.0)
