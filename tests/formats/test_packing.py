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


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.sampled_from([torch.uint8, torch.int32]), st.integers(1, 4), st.integers(1, 9),
       st.integers(1, 70), st.integers(1, 50), st.integers(0, 2**31 - 1))
def test_packing_in_row_blocks_equals_one_block(bits, storage, a, b, n, chunk, seed):
    """pack / unpack work a block of rows at a time (memory); blocks of any size, also ones that do not divide
    the rows or hold less than a row, give the words and codes of one block over every row."""
    from lowbit.formats import packing

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (a, b, n), generator=gen, dtype=torch.int32)
    whole = pack(codes, bits, storage)
    old = packing.CHUNK
    try:
        packing.CHUNK = chunk
        blocked = pack(codes, bits, storage)
        back = unpack(whole, bits, n)
    finally:
        packing.CHUNK = old
    assert torch.equal(blocked, whole)
    assert torch.equal(back, codes)


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


def _reference_pack(row, bits, word):
    """Pure-Python bitstream: code i at bits [i·bits, (i+1)·bits), word k = bits [k·word, (k+1)·word)."""
    stream = sum(int(c) << (bits * i) for i, c in enumerate(row))
    words = -(-len(row) * bits // word)
    out = [(stream >> (word * k)) & ((1 << word) - 1) for k in range(words)]
    return [w - (1 << 32) if word == 32 and w >= 1 << 31 else w for w in out]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 8), st.sampled_from([torch.uint8, torch.int32]), st.integers(0, 70), st.integers(0, 2**31 - 1))
def test_layout_equals_a_python_bitstream(bits, storage, n, seed):
    codes = torch.randint(0, 1 << bits, (2, n), generator=torch.Generator().manual_seed(seed))
    word = 8 if storage == torch.uint8 else 32
    assert pack(codes, bits, storage).tolist() == [_reference_pack(r.tolist(), bits, word) for r in codes]


def test_layout_3bit_literal_bytes():
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]]), 3).tolist() == [[0xD1, 0x58, 0x1F]]


def test_layout_3bit_int32_straddles_the_sign_bit():
    codes = torch.tensor([[7, 7, 7, 1, 0, 0, 0, 0, 0, 0, 6]])  # code 10 covers bits 30, 31 and 32
    packed = pack(codes, 3, torch.int32)
    assert packed.tolist() == [[1023 - 2**31, 1]]
    assert torch.equal(unpack(packed, 3, 11), codes.to(torch.int32))


def test_layout_8bit_int32_and_leading_dims():
    codes = torch.tensor([[[1, 2, 3, 4, 255]], [[0, 0, 0, 128, 9]]])  # (2, 1, 5)
    packed = pack(codes, 8, torch.int32)
    assert packed.shape == (2, 1, 2)
    assert packed.tolist() == [[[0x04030201, 255]], [[-(2**31), 9]]]
    assert torch.equal(unpack(packed, 8, 5), codes.to(torch.int32))


def test_packed_lengths():
    assert packed_length(5, 4) == 3 and packed_length(8, 3) == 3 and packed_length(9, 3) == 4
    assert packed_length(9, 4, torch.int32) == 2 and packed_length(11, 3, torch.int32) == 2
    assert packed_length(0, 2) == 0


def test_bad_inputs_are_refused():
    with pytest.raises(LowbitError, match="codes to pack must be an integer tensor"):
        pack(torch.tensor([[1.0]]), 4)
    with pytest.raises(LowbitError, match="packing storage must be torch.uint8 or torch.int32"):
        pack(torch.tensor([[1]]), 4, torch.int16)
    with pytest.raises(LowbitError, match="2 packed words hold fewer than 5 codes of 4 bits"):
        unpack(torch.zeros(1, 2, dtype=torch.uint8), 4, 5)
    with pytest.raises(LowbitError, match="packing supports 1 to 8 bits per code, got 0"):
        packed_length(4, 0)
