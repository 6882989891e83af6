"""The E8P Triton kernels (`lowbit.kernels.triton.e8p` launches them). Imported at the first launch,
never with the package, so TRITON_INTERPRET can still be chosen by the caller.

Decoding follows `lowbit.formats.e8p` (QuIP#, Tseng et al. 2024, arXiv 2402.04396, §4.2): code c
(16 bits) → source vector j = c >> 8 (a row of the 256 × 8 table of bᵢ = 2|aᵢ| ∈ {1, 3, 5}),
signs of entries 0–6 from bits 1–7, the sign of entry 7 from the parity rule (the coordinates
must sum to an even integer, so entry 7 is negative exactly when Σ bᵢ / 2 + popcount(bits 1–7)
is odd), and a shift t = ±¼ from bit 0 (bit set: −¼). Codeword entry i = sᵢ·bᵢ/2 + t.

The work is done once per code, not once per weight (`_packed`): the code is loaded once, and
two gathers from small tables give everything else —

- ``source[j]`` (256 int32): the eight bᵢ as nibbles (bᵢ ≤ 5 needs three bits; bit 3 of each
  nibble is free), bit 31 = (Σ bᵢ / 2) mod 2, the source vector's half of the parity rule;
- ``signs[bits 1–7]`` (128 int32): nibble i = 0xF where entry i is negative, entry 7's nibble
  set when popcount(bits 1–7) is odd (the other half of the rule; bit 31 of ``source[j]``
  flips it).

Then one SWAR step negates the nibbles in two's complement, (b ⊕ m) + (m ∧ 0x1111_1111) (16 − b
for b ∈ 1..5 never carries into the next nibble), and ⊕ 0x8888_8888 turns that into the offset
form: P, whose nibble i is uᵢ = 8 + sᵢ·bᵢ ∈ [3, 13]. A weight is then (uᵢ − 8)/2 + t, taken
from P without an int→float conversion (a quarter of an FMA's throughput on recent NVIDIA GPUs):

- `_entry` (decode and tensor-core kernels): 2uᵢ shifted into the mantissa of 2²¹ (where the
  float32 spacing is ¼), so the float is 2²¹ + uᵢ/2 and one add of (t − 2²¹ − 4) — exact, both
  terms and the result multiples of ¼ below 2²² — gives the codeword: a shift, a logic op and
  an add per weight.
- `e8p_gemv_kernel`: nibble i masked in place and or-ed into 2²³ (`jit._nibble_magic`), so the
  float minus 2²³ is uᵢ·16^e; the x value is scaled by 16^−e / 2 instead and the per-code
  offset (t − 4)·Σᵢ xᵢ is added once per code: a logic op, an add and an FMA per weight.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lowbit.kernels.triton.jit import _nibble_magic


@triton.jit
def _packed(codes, source_ptr, sign_ptr):
    """Codes (any shape) int16 → (P, c) int32: nibble i of P is uᵢ = 8 + sᵢ·bᵢ, c the code (sign-extended)."""
    c = codes.to(tl.int32)
    t = tl.load(source_ptr + ((c >> 8) & 0xFF))
    m = tl.load(sign_ptr + ((c >> 1) & 0x7F)) ^ ((t >> 31) << 28)  # entry 7: flipped by the source's parity
    b = t & 0x77777777
    return ((b ^ m) + (m & 0x11111111)) ^ -0x77777778, c  # ^ 0x88888888 as int32


@triton.jit
def _entry(p, base, i: tl.constexpr):
    """Entry i of every code as float32: 2uᵢ in the mantissa of 2²¹ (0x4A000000), plus ``base`` = t − 2²¹ − 4
    (the float32 spacing there is ¼, so the sum is exact)."""
    if i == 0:
        bits = ((p << 1) & 0x1E) | 0x4A000000
    else:
        bits = ((p >> (4 * i - 1)) & 0x1E) | 0x4A000000
    return bits.to(tl.float32, bitcast=True) + base


@triton.jit
def _decode_tile(codes, source_ptr, sign_ptr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Codes (BLOCK_N, BLOCK_G) int16 → codewords (BLOCK_N, 8·BLOCK_G) float32 (unscaled), k = 8·g + i.
    The 8 entries are joined as a new trailing (2, 2, 2) held by each thread, so the final reshape
    moves no data; the join tree orders them so that the row-major flattening gives i = 4a + 2b + c."""
    p, c = _packed(codes, source_ptr, sign_ptr)
    base = tl.where((c & 1) == 1, -2097156.25, -2097155.75)
    w = tl.join(tl.join(tl.join(_entry(p, base, 0), _entry(p, base, 4)),
                        tl.join(_entry(p, base, 2), _entry(p, base, 6))),
                tl.join(tl.join(_entry(p, base, 1), _entry(p, base, 5)),
                        tl.join(_entry(p, base, 3), _entry(p, base, 7))))
    return tl.reshape(w, (BLOCK_N, 8 * BLOCK_G))


@triton.jit
def _load_codes(codes_ptr, offs_n, offs_g, N, G, EVEN_G: tl.constexpr):
    """(BLOCK_N, BLOCK_G) int16 codes; masked by row alone when EVEN_G (lets the loads be 16-byte vectors)."""
    ptrs = codes_ptr + offs_n[:, None] * G + offs_g[None, :]
    if EVEN_G:
        return tl.load(ptrs, mask=(offs_n < N)[:, None], other=0)
    else:
        return tl.load(ptrs, mask=(offs_n < N)[:, None] & (offs_g < G)[None, :], other=0)


@triton.jit
def _store(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) float32 (+ bias) → out; atomically added (float32 out) when K is split."""
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)
        if ATOMIC:
            bias = bias * (tl.program_id(2) == 0).to(tl.float32)  # once, from the first split
        acc += bias[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _g_range(G, BLOCK_G: tl.constexpr, SPLIT_K):
    """[first, last) block of BLOCK_G codes of this program's split (grid axis 2)."""
    blocks = tl.cdiv(G, BLOCK_G)
    per_split = tl.cdiv(blocks, SPLIT_K)
    first = tl.program_id(2) * per_split
    return first, tl.minimum(first + per_split, blocks)


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """float32 → ``dtype`` rounded to nearest even. For bfloat16 the rounding is written out on the bits
    (add 0x7FFF plus the kept lowest bit, keep the top half; finite values only): the GPU rounds so,
    but the interpreter truncates."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def e8p_decode_kernel(codes_ptr, scale_ptr, source_ptr, sign_ptr, out_ptr, N, G, EVEN_G: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """out (N, 8G) = codeword · scale of each row, the product rounded to float32 and then once to
    out's dtype — what `E8PWeight.dequantize(dtype)` computes."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    w = _decode_tile(_load_codes(codes_ptr, offs_n, offs_g, N, G, EVEN_G), source_ptr, sign_ptr, BLOCK_N, BLOCK_G)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
    offs_k = tl.program_id(1) * (8 * BLOCK_G) + tl.arange(0, 8 * BLOCK_G)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < 8 * G)
    value = _round_to(w * scale[:, None], out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * (8 * G) + offs_k[None, :], value, mask=mask)


@triton.jit
def e8p_matmul_kernel(x_ptr, codes_ptr, scale_ptr, source_ptr, sign_ptr, bias_ptr, out_ptr, M, N, G,
                      stride_xm, stride_om, SPLIT_K, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                      IEEE: tl.constexpr, EVEN_G: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = scale[n] · Σ_k x[m, k] · codeword[n, k] (+ bias[n]) on the tensor cores, float32
    accumulation, each (BLOCK_N, BLOCK_K) tile of codewords decoded in registers (`_decode_tile`)
    and never written out. Codewords are multiples of ¼ below 4 in magnitude, exact in bfloat16 and
    float16, so without IEEE the product runs in x's own dtype; with IEEE (float32 x, or the
    interpreter, which multiplies bfloat16 tiles wrongly) both tiles are float32 with IEEE
    products. Grid (M tiles, N tiles, SPLIT_K): with ATOMIC the K range is split and the float32
    partials are added atomically (for few tokens, where M × N tiles alone leave SMs idle)."""
    BLOCK_G: tl.constexpr = BLOCK_K // 8
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + (offs_m % M)[:, None] * stride_xm  # rows past M repeat row 0..: never stored
    first, last = _g_range(G, BLOCK_G, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for gb in range(first, last):
        offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
        offs_k = gb * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_G:
            x = tl.load(x_rows + offs_k[None, :])
        else:
            x = tl.load(x_rows + offs_k[None, :], mask=(offs_k < 8 * G)[None, :], other=0.0)
        w = _decode_tile(_load_codes(codes_ptr, offs_n, offs_g, N, G, EVEN_G), source_ptr, sign_ptr,
                         BLOCK_N, BLOCK_G)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
    _store(acc * scale[None, :], out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, ATOMIC)


@triton.jit
def e8p_gemv_kernel(x_ptr, codes_ptr, scale_ptr, source_ptr, sign_ptr, bias_ptr, out_ptr, M, N, G,
                    stride_xm, stride_om, SPLIT_K, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                    EVEN_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[m, n] for one token per program (grid (M, N tiles, SPLIT_K)) on the CUDA cores. Each code
    is decoded once into P (`_packed`); entry i of the (BLOCK_N, BLOCK_G) codes is multiplied by
    x[8g + i] for all codes at once, in the codes' own layout — no reshape, no layout change,
    one reduction over the block at the end. With w = (u − 8)/2 + t:

        Σᵢ xᵢ·wᵢ = Σᵢ (xᵢ·16^−e / 2)·(uᵢ·16^e) + (t − 4)·Σᵢ xᵢ,

    uᵢ·16^e straight from the bits (`_nibble_magic`), x scaled once per program and block. The next
    block's codes are prefetched (the loop has no tl.dot for Triton's pipeliner to work on)."""
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_row = x_ptr + tl.program_id(0) * stride_xm
    first, last = _g_range(G, BLOCK_G, SPLIT_K)
    acc = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    codes = _load_codes(codes_ptr, offs_n, first * BLOCK_G + tl.arange(0, BLOCK_G), N, G, EVEN_G)
    for gb in range(first, last):
        offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
        # the next block's codes are loaded before this one is decoded: two blocks in flight (the last
        # iteration reloads its own block, never out of bounds)
        nxt = _load_codes(codes_ptr, offs_n, tl.minimum(gb + 1, last - 1) * BLOCK_G + tl.arange(0, BLOCK_G), N, G,
                          EVEN_G)
        p, c = _packed(codes, source_ptr, sign_ptr)
        codes = nxt
        high = p >> 20
        xsum = tl.zeros((BLOCK_G,), dtype=tl.float32)
        for i in tl.static_range(8):
            if EVEN_G:
                xi = tl.load(x_row + offs_g * 8 + i).to(tl.float32)
            else:
                xi = tl.load(x_row + offs_g * 8 + i, mask=offs_g < G, other=0.0).to(tl.float32)
            acc += (xi * (0.5 / (1 << (4 * (i % 5)))))[None, :] * _nibble_magic(p, high, i)
            xsum += xi
        acc += tl.where((c & 1) == 1, -4.25, -3.75) * xsum[None, :]
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
    out = (tl.sum(acc, axis=1) * scale)[None, :]
    _store(out, out_ptr, bias_ptr, tl.program_id(0) + tl.arange(0, 1), offs_n, M, N, stride_om, HAS_BIAS, ATOMIC)
