"""Range observers: percentile inside min-max, MSE search never worse, ragged groups exact."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import observers
from lowbit.formats import fake_quantize_affine


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
    x = torch.distributions.StudentT(2.5).sample((rows, cols))
    torch.manual_seed(seed)

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
