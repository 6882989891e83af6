"""Bit packing of integer codes, named by layout: an LSB-first bitstream along the last dim.

Code i of a row occupies bits [i·b, (i+1)·b) of the row's bitstream; storage word 0
holds the stream's lowest bits, and codes may straddle words (3-bit codes do). For 4- and
8-bit codes in int32 words this is the GPTQ / compressed-tensors ``pack_to_int32``
layout (eight 4-bit codes per word, the first in the lowest nibble); in uint8 words
4-bit codes go low nibble first, as in most CPU kernels. Rows are padded to whole words.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError

_STORAGE_BITS = {torch.uint8: 8, torch.int32: 32}


def _storage_bits(storage: torch.dtype) -> int:
    if storage not in _STORAGE_BITS:
        raise LowbitError(f"packing storage must be torch.uint8 or torch.int32, got {storage}.")
    return _STORAGE_BITS[storage]


def packed_length(n: int, bits: int, storage: torch.dtype = torch.uint8) -> int:
    """Words per row for ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / _storage_bits(storage))


def pack(codes: Tensor, bits: int, storage: torch.dtype = torch.uint8) -> Tensor:
    """(..., n) codes in [0, 2^bits) → (..., packed_length(n)) words."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"packing supports 1 to 8 bits per code, got {bits!r}.")
    word = _storage_bits(storage)
    codes = codes.to(torch.int64)
    if codes.numel() and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise LowbitError(f"codes must lie in [0, {(1 << bits) - 1}] to be packed in {bits} bits.")
    *lead, n = codes.shape
    words = packed_length(n, bits, storage)
    if word % bits == 0:  # whole codes per word: shift each into place and add
        per_word = word // bits
        padded = torch.nn.functional.pad(codes, (0, words * per_word - n))
        shifts = torch.arange(per_word, device=codes.device) * bits
        packed = (padded.reshape(*lead, words, per_word) << shifts).sum(dim=-1)
    else:  # codes straddle words: go through the bitstream
        shifts = torch.arange(bits, device=codes.device)
        stream = ((codes[..., None] >> shifts) & 1).reshape(*lead, n * bits)  # (..., n·bits) bits
        stream = torch.nn.functional.pad(stream, (0, words * word - n * bits))
        weights = torch.ones(word, dtype=torch.int64, device=codes.device) << torch.arange(word, device=codes.device)
        packed = (stream.reshape(*lead, words, word) * weights).sum(dim=-1)  # (..., words), unsigned value
    if storage == torch.int32:
        packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # two's complement
    return packed.to(storage)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack`: (..., words) → (..., n) int32 codes."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise LowbitError(f"packing supports 1 to 8 bits per code, got {bits!r}.")
    word = _storage_bits(packed.dtype)
    *lead, words = packed.shape
    if words * word < n * bits:
        raise LowbitError(f"{words} packed words hold fewer than {n} codes of {bits} bits.")
    values = packed.to(torch.int64)
    if packed.dtype == torch.int32:
        values = values & 0xFFFFFFFF
    if word % bits == 0:
        per_word = word // bits
        shifts = torch.arange(per_word, device=packed.device) * bits
        codes = (values[..., None] >> shifts) & ((1 << bits) - 1)  # (..., words, per_word)
        return codes.reshape(*lead, words * per_word)[..., :n].to(torch.int32)
    stream = (values[..., None] >> torch.arange(word, device=packed.device)) & 1  # (..., words, word)
    stream = stream.reshape(*lead, words * word)[..., : n * bits].reshape(*lead, n, bits)
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(bits, device=packed.device)
    return (stream * weights).sum(dim=-1).to(torch.int32)
