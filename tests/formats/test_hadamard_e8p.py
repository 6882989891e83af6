"""Hadamard transforms and the E8P codebook: orthogonality, inverses, exact decoders, nearest codewords."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import e8p
from lowbit.formats.hadamard import (
    fwht,
    hadamard_matrix,
    hadamard_size,
    hadamard_transform,
    pack_signs,
    paley_hadamard,
    random_signs,
    randomized_hadamard,
    randomized_hadamard_inverse,
    supports,
    unpack_signs,
)


@pytest.mark.parametrize("m", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 76, 108, 168])
def test_paley_matrices_are_hadamard(m):
    H = paley_hadamard(m)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64))


def test_sizes_of_the_default_model_and_refusals():
    assert hadamard_size(576) == (36, 16)
    assert hadamard_size(1536) == (12, 128)
    assert hadamard_size(192) == (12, 16)
    assert hadamard_size(4096) == (1, 4096)
    assert not supports(100) and not supports(11008)
    with pytest.raises(LowbitError, match="size 100"):
        hadamard_size(100)


def test_fwht_is_sylvester_and_n_log_n_passes_agree_with_the_dense_matrix():
    n = 64
    x = torch.randn(3, n, dtype=torch.float64)
    S = torch.ones(1, 1, dtype=torch.float64)
    while S.shape[0] < n:
        S = torch.cat([torch.cat([S, S], 1), torch.cat([S, -S], 1)], 0)
    assert torch.allclose(fwht(x), x @ S.T)


@pytest.mark.parametrize("n", [12, 96, 192, 576, 1536])
def test_transform_is_orthogonal_and_inverted_by_its_transpose(n):
    M = hadamard_matrix(n)
    assert torch.allclose(M @ M.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, 3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ M.T, atol=1e-12)
    assert torch.allclose(hadamard_transform(hadamard_transform(x), transpose=True), x, atol=1e-12)
    s = random_signs(n, seed=5)
    assert torch.allclose(randomized_hadamard_inverse(randomized_hadamard(x, s), s), x, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**31))
def test_sign_packing_round_trips(n, seed):
    s = random_signs(n, seed)
    packed = pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_signs(packed, n), s)


def test_e8p_codebook_is_a_subset_of_shifted_e8_with_distinct_points():
    cb = e8p.codebook()
    assert cb.shape == (65536, 8)
    assert torch.unique(cb, dim=0).shape[0] == 65536
    # every codeword minus its shift (bit 0) lies in D8 + 1/2 ⊂ E8: odd half-integers summing to an even integer
    codes = torch.arange(65536)
    shift = torch.where((codes & 1).bool(), -0.25, 0.25)[:, None]
    half = (cb - shift) * 2  # odd integers
    assert torch.equal(half, half.round()) and bool((half.remainder(2) == 1).all())
    assert bool(((half.sum(1) / 2).remainder(2) == 0).all())  # coordinates sum to an even integer
    assert float((cb - shift).pow(2).sum(1).max()) == pytest.approx(12.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=64))
def test_bitwise_decoder_matches_the_reference_table_exactly(codes):
    c = e8p.to_int16(torch.tensor(codes))
    assert torch.equal(e8p.decode_codes(c), e8p.codebook()[torch.tensor(codes)])


def test_nearest_is_the_nearest_of_all_65536_codewords():
    v = torch.randn(4000, 8, generator=torch.Generator().manual_seed(0)) * 1.1
    codes, q = e8p.nearest(v)
    assert torch.equal(e8p.decode_codes(codes), q)
    best = torch.cdist(v, e8p.codebook()).min(dim=1).values.pow(2)
    got = (v - q).pow(2).sum(1)
    assert float((got - best).max()) < 1e-5
    # 2 bits per weight on a Gaussian: below the 0.1175 of the best scalar 2-bit quantiser (Lloyd-Max)
    assert float((v - q).pow(2).mean() / 1.1**2) < 0.105
