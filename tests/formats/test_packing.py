"""Bit packing: exact round trips for every width and storage, and the layout by hand."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.formats import pack, packed_length, unpack


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8), st.sampled_from([torch.uint8, torch.int32]), st.integers(1, 5), st.integers(0, 200),
       st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(bits, storage, rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=gen, dtype=torch.int32)
    packed = pack(codes, bits, storage)
    assert packed.dtype == storage and packed.shape == (rows, packed_length(n, bits, storage))
    assert torch.equal(unpack(packed, bits, n), codes)


def test_extremes_survive_int32_sign_bit():
    codes = torch.full((2, 16), 15, dtype=torch.int32)
    packed = pack(codes, 4, torch.int32)
    assert packed[0, 0].item() == -1  # all 32 bits set
    assert torch.equal(unpack(packed, 4, 16), codes)


def test_layout_4bit_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5]])
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x05]]


def test_layout_2bit():
    codes = torch.tensor([[1, 2, 3, 0, 3]])
    assert pack(codes, 2).tolist() == [[0b00111001, 0b00000011]]


def test_layout_3bit_straddles_bytes():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    stream = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(codes, 3).tolist() == [[stream & 0xFF, (stream >> 8) & 0xFF, (stream >> 16) & 0xFF]]


def test_int32_4bit_is_the_gptq_layout():
    codes = torch.randint(0, 16, (3, 8 * 5), generator=torch.Generator().manual_seed(0))
    packed = pack(codes, 4, torch.int32)
    for r in range(3):
        for w in range(5):
            value = sum(int(codes[r, 8 * w + i]) << (4 * i) for i in range(8))
            value = value - (1 << 32) if value >= 1 << 31 else value
            assert packed[r, w].item() == value


def test_out_of_range_codes_are_refused():
    with pytest.raises(LowbitError, match=r"codes must lie in \[0, 15\]"):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(LowbitError, match=r"codes must lie in \[0, 3\]"):
        pack(torch.tensor([[-1]]), 2)
    with pytest.raises(LowbitError, match="packing supports 1 to 8 bits"):
        pack(torch.tensor([[1]]), 9)
