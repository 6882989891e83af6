"""Bit packing of integer codes, named by layout: an LSB-first bitstream along the last dim.

Code i of a row occupies bits [i·b, (i+1)·b) of the row's bitstream; storage word 0
holds the stream's lowest bits, and codes may straddle words (3-bit codes do). For 4- and
8-bit codes in int32 words this is the GPTQ / compressed-tensors ``pack_to_int32``
layout (eight 4-bit codes per word, the first in the lowest nibble); in uint8 words
4-bit codes go low nibble first, as in most CPU kernels. Rows are padded to whole words.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from lowbit.errors import LowbitError

_STORAGE_BITS = {torch.uint8: 8, torch.int32: 32}


def _storage_bits(storage: torch.dtype) -> int:
    if storage not in _STORAGE_BITS:
        raise LowbitError(f"packing storage must be torch.uint8 or torch.int32, got {storage}.")
    return _STORAGE_BITS[storage]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"packing supports 1 to 8 bits per code, got {bits!r}.")


def _positions(n: int, bits: int, word: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Word index and bit offset inside that word of each of ``n`` codes, (n,) int64 each."""
    start = torch.arange(n, device=device) * bits  # first bit of each code in the stream
    return start // word, start % word


def packed_length(n: int, bits: int, storage: torch.dtype = torch.uint8) -> int:
    """Words per row for ``n`` codes of ``bits`` bits: ceil(n · bits / word bits)."""
    _check_bits(bits)
    word = _storage_bits(storage)
    return -(-n * bits // word)


CHUNK = 1 << 22  # codes packed or unpacked per step: the int64 temporaries stay at tens of MB, not GBs


def row_blocks(rows: int, cols: int, per_block: int | None = None) -> Iterator[slice]:
    """Slices of whole rows of a (rows, cols) array, about ``per_block`` (default `CHUNK`) values each and at
    least one row: how `pack`, `unpack` and `QuantizedWeight.dequantize` bound their temporaries."""
    step = max(1, (CHUNK if per_block is None else per_block) // max(1, cols))
    return (slice(start, start + step) for start in range(0, rows, step))


def pack(codes: Tensor, bits: int, storage: torch.dtype = torch.uint8) -> Tensor:
    """(..., n) codes in [0, 2^bits) → (..., packed_length(n)) words.

    Done a block of rows at a time, so the widened temporaries stay small (a 7B model's down
    projection, 45 M codes, would otherwise take three int64 copies of 0.36 GB each)."""
    _check_bits(bits)
    word = _storage_bits(storage)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise LowbitError(f"codes to pack must be an integer tensor, got {codes.dtype}.")
    if codes.dim() == 0:
        raise LowbitError("codes to pack must have at least one dimension, got a scalar.")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise LowbitError(f"codes must lie in [0, {(1 << bits) - 1}] to be packed in {bits} bits.")
    *lead, n = codes.shape
    words = packed_length(n, bits, storage)
    flat = codes.reshape(math.prod(lead), n)
    out = torch.empty(flat.shape[0], words, dtype=storage, device=codes.device)
    for block in row_blocks(flat.shape[0], n):
        out[block] = _pack_rows(flat[block], bits, word, words, storage)
    return out.reshape(*lead, words)


def _pack_rows(codes: Tensor, bits: int, word: int, words: int, storage: torch.dtype) -> Tensor:
    """`pack` of a (rows, n) block of checked codes."""
    if storage == torch.uint8:
        return _pack_bytes(codes, bits, words)
    codes = codes.to(torch.int64)
    rows, n = codes.shape
    if word % bits == 0:  # whole codes per word: shift each into place and add
        per_word = word // bits
        padded = torch.nn.functional.pad(codes, (0, words * per_word - n))
        shifts = torch.arange(per_word, device=codes.device) * bits
        packed = (padded.reshape(rows, words, per_word) << shifts).sum(dim=-1)
    else:  # codes may straddle two words: low part into word w, high part into w + 1
        word_of, shift = _positions(n, bits, word, codes.device)  # (n,), (n,)
        packed = torch.zeros(rows, words + 1, dtype=torch.int64, device=codes.device)
        low = (codes << shift) & ((1 << word) - 1)  # bits that land in word_of
        high = codes >> (word - shift)  # bits past the word's end (0 if none)
        packed.scatter_add_(-1, word_of.expand_as(codes), low)  # fields are disjoint: add = or
        packed.scatter_add_(-1, (word_of + 1).expand_as(codes), high)
        packed = packed[..., :words]
    if storage == torch.int32:
        packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # two's complement
    return packed.to(storage)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: (..., words) → (..., n) int32 codes, a block of rows at a time."""
    _check_bits(bits)
    word = _storage_bits(packed.dtype)
    if packed.dim() == 0:
        raise LowbitError("packed words must have at least one dimension, got a scalar.")
    *lead, words = packed.shape
    if words * word < n * bits:
        raise LowbitError(f"{words} packed words hold fewer than {n} codes of {bits} bits.")
    flat = packed.reshape(math.prod(lead), words)
    out = torch.empty(flat.shape[0], n, dtype=torch.int32, device=packed.device)
    for block in row_blocks(flat.shape[0], n):
        out[block] = _unpack_rows(flat[block], bits, n, word)
    return out.reshape(*lead, n)


def _unpack_rows(packed: Tensor, bits: int, n: int, word: int) -> Tensor:
    """`unpack` of a (rows, words) block."""
    rows, words = packed.shape
    if word == 8:  # bytes, LSB first: every `bits` bytes hold 8 whole codes (3 bits: the 24-bit triples)
        return _unpack_bytes(packed, bits, n)
    values = packed.to(torch.int64)
    if packed.dtype == torch.int32:
        values = values & 0xFFFFFFFF
    if word % bits == 0:
        per_word = word // bits
        shifts = torch.arange(per_word, device=packed.device) * bits
        codes = (values[..., None] >> shifts) & ((1 << bits) - 1)  # (rows, words, per_word)
        return codes.reshape(rows, words * per_word)[:, :n].to(torch.int32)
    word_of, shift = _positions(n, bits, word, packed.device)  # (n,), (n,)
    values = torch.nn.functional.pad(values, (0, 1))  # a zero word after the last
    index = word_of.expand(rows, n)
    low = values.gather(-1, index) >> shift
    high = values.gather(-1, index + 1) << (word - shift)
    return ((low | high) & ((1 << bits) - 1)).to(torch.int32)


def _pack_bytes(codes: Tensor, bits: int, words: int) -> Tensor:
    """`_pack_rows` into uint8 words, the inverse of `_unpack_bytes` and worked the same ways: in the bytes' width
    where codes never straddle a byte, else 8 codes at a time into one integer that is cut into ``bits`` bytes."""
    rows, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, words * per - n)).reshape(rows, words, per)
        packed = c[..., 0].clone()
        for j in range(1, per):
            packed |= c[..., j] << (bits * j)  # below 256: c < 2^bits
        return packed
    runs = -(-n // 8)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, runs * 8 - n)).reshape(rows, runs, 8)
    value = (c << torch.arange(0, 8 * bits, bits, device=codes.device)).sum(-1)  # (rows, runs), 8 * bits bits
    packed = (value[..., None] >> torch.arange(0, 8 * bits, 8, device=codes.device)) & 0xFF  # (rows, runs, bits)
    return packed.reshape(rows, runs * bits)[:, :words].to(torch.uint8)


def _unpack_bytes(packed: Tensor, bits: int, n: int) -> Tensor:
    """`_unpack_rows` of uint8 words, worked in the bytes' own width where codes never straddle a byte (1, 2, 4
    bits: 10x faster for 4 bits than widening every byte to int64 first, on this project's 2-core machine), else
    from each run of ``bits`` bytes read as one little-endian integer of 8 codes (3, 5, 6, 7 bits)."""
    rows, words = packed.shape
    if bits == 8:  # a code per byte, as it is
        return packed[:, :n].to(torch.int32)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed[..., None] >> shifts) & mask  # (rows, words, 8 / bits) uint8
        return codes.reshape(rows, -1)[:, :n].to(torch.int32)
    runs = -(-words // bits)
    padded = torch.nn.functional.pad(packed, (0, runs * bits - words)).reshape(rows, runs, bits)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=packed.device)
    value = (padded.to(torch.int64) << byte_shifts).sum(-1)  # (rows, runs): the run's bytes as one integer
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device)
    codes = (value[..., None] >> shifts) & mask  # (rows, runs, 8)
    return codes.reshape(rows, -1)[:, :n].to(torch.int32)
