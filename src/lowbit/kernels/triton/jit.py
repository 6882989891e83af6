"""The Triton kernels themselves. Imported at the first launch (see `ops._kernels`), never with the package.

Every GEMM computes ``out[m, n] = Σ_k x[m, k] · W[n, k]`` over output tiles, with optional
split-K: the K blocks are cut into SPLIT_K ranges, one per program along grid axis 1, whose
float32 partials are added atomically (SplitK work decomposition for skinny decode GEMMs:
Hoque et al., "Accelerating a Triton Fused Kernel for W4A16 Quantized Inference with SplitK
Work Decomposition", arXiv 2402.00025). 4-bit weights (weight-only W4A16 as GPTQ serves it,
Frantar et al., arXiv 2210.17323; NF4 by a 16-entry table, Dettmers et al., arXiv
2305.14314) are read as the stored nibbles viewed as N-major int32 words (see `layout`).

- `w4_gemv_kernel`: one token, CUDA cores. Streams (BLOCK_N, WORDS) words per K block and
  decodes each code with one logic op and one add (`_nibble_magic`); zero point and scale
  are applied once per word. The launchers' choice for one token.
- `w4_mma_kernel`: tensor cores with the weight as the left operand (outᵀ = W · xᵀ), so a few
  tokens still fill the MMA's large dimension; codes enter ``tl.dot`` as exact small
  integers and each K block's product (one group) is scaled once. Up to ~128 tokens.
- `w4_gemm_kernel`: tensor cores with x as the left operand, a plain tiled GEMM whose weight
  tile is decoded in the K loop into one in-place accumulator: the fused path for many tokens.
- `int4_matmul_kernel`: the general fused kernel — any group layout (act-order groups in any
  order via g_idx, K blocks spanning groups) and NF4 — reading the words through strides.
- `dequant_nk_kernel`: the weight written out as floats (N, K) for dequantise + one cuBLAS
  GEMM at large M, where the vendor GEMM beats decoding inside the tiles.
- `w8a8_matmul_kernel`: int8 × int8 → int32 ``tl.dot``, rescaled by token scale ×
  channel scale (LLM.int8() without outliers / SmoothQuant's W8A8 GEMM, arXiv
  2208.07339, 2211.10438). With FUSED_QUANT the per-token quantisation happens inside:
  each program first reads its rows once for their absmax, then quantises every x tile
  as it loads it; otherwise `quantize_rows_kernel` quantises x once beforehand.

Activation quantisation reproduces `lowbit.tensor.fake_quantize` code for code:
s = absmax / 127 (the smallest normal float32 when zero), q = clamp(rint(x / s), -128,
127), with IEEE division (``tl.div_rn``, not the approximate default) and
round-half-to-even written out (``rint`` has no interpreter implementation).

UPCAST: Triton 3.9's interpreter multiplies bfloat16 tiles as their raw uint16 words in
``tl.dot``; under the interpreter the launcher sets UPCAST for bfloat16 inputs and both
tiles are widened to float32 first (a product of two bfloat16 values is exact in
float32, so this is the GPU's bf16 MMA with float32 accumulation up to summation order).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's output tile (grouped order) and their masks."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _x_block(x_ptr, offs_m, m_mask, kb, K, stride_xm, BLOCK_K: tl.constexpr):
    """K block ``kb`` of x's rows ``offs_m``: its column offsets, their mask and the (BM, BK) tile."""
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                other=0.0)
    return offs_k, k_mask, a


@triton.jit
def _k_range(K, BLOCK_K: tl.constexpr, SPLIT_K):
    """[first, last) K block of this program's split (SPLIT_K is a run-time value: one compiled
    kernel serves every split)."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    first = tl.program_id(1) * per_split
    return first, tl.minimum(first + per_split, k_blocks)


@triton.jit
def _epilogue(acc, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr,
              ATOMIC: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) float32 (+ bias) → out; atomically added when K is split (ATOMIC)."""
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = bias * (tl.program_id(1) == 0).to(tl.float32)  # once, from the first split
        acc = acc + bias[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    if not ATOMIC:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def _codes(w_ptr, kb, offs_n, n_mask, K, stride_wk, stride_wn, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_K, BLOCK_N) int32 4-bit codes of K block ``kb``; each 32-bit word loaded once, its 8 codes unpacked."""
    shift = (tl.arange(0, 8) * 4)[None, :, None]  # bit offset of code i inside its word
    offs_w = kb * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    words = tl.load(w_ptr + offs_w[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(offs_w < tl.cdiv(K, 8))[:, None] & n_mask[None, :], other=0)
    return tl.reshape((words[:, None, :] >> shift) & 0xF, (BLOCK_K, BLOCK_N))  # k = 8·word + i


@triton.jit
def _values(q, z, lut_ptr, DECODE: tl.constexpr):
    """Codes → unscaled float32 values: int sym (q − 8), int asym (q − z), or lut[q]."""
    if DECODE == 0:
        v = (q - 8).to(tl.float32)
    elif DECODE == 1:
        v = q.to(tl.float32) - z
    else:
        v = tl.load(lut_ptr + q)
    return v


@triton.jit
def int4_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, lut_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn,
    GROUP: tl.constexpr,  # columns per group (K when one group per row)
    DECODE: tl.constexpr,  # 0: int, code - 8; 1: int, code - zero; 2: lut[code]
    PER_BLOCK: tl.constexpr,  # every K block lies inside one group
    SPLIT_K, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, UNPACK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) = x (M, K) @ decode(words (ceil(K/8), N) int32, scales (G, N), ...), any strides."""
    offs_m, offs_n, m_mask, n_mask = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    first, last = _k_range(K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(first, last):
        offs_k, k_mask, a = _x_block(x_ptr, offs_m, m_mask, kb, K, stride_xm, BLOCK_K)
        if UNPACK == 0:
            q = _codes(w_ptr, kb, offs_n, n_mask, K, stride_wk, stride_wn, BLOCK_K, BLOCK_N)
        else:  # each row of the tile loads its own word (8 rows share one, from L1) and shifts: no reshape
            words = tl.load(w_ptr + (offs_k // 8)[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                            mask=k_mask[:, None] & n_mask[None, :], other=0)
            q = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
        z = 0.0
        if PER_BLOCK:  # one group for the whole block: (1, BN) parameters
            g = (kb * BLOCK_K) // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if DECODE == 1:
                z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)[None, :]
        else:  # (BK, BN) parameters, gathered by each column's group
            kn_mask = k_mask[:, None] & n_mask[None, :]
            if HAS_GIDX:
                g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
            else:
                g = offs_k // GROUP
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=kn_mask,
                        other=0.0).to(tl.float32)
            if DECODE == 1:
                z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=kn_mask,
                            other=0).to(tl.float32)
        v = _values(q, z, lut_ptr, DECODE)
        if not PER_BLOCK:
            v = v * s
        if UPCAST:
            a = a.to(tl.float32)
        b = v.to(a.dtype)
        if IEEE:
            part = tl.dot(a, b, input_precision="ieee")
        else:
            part = tl.dot(a, b)
        if PER_BLOCK:
            acc += part * s
        else:
            acc += part
    _epilogue(acc, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, ATOMIC)


# -- 4-bit kernels on the stored, N-major words ---------------------------------------------------
#
# Words (N, ceil(K/8)) int32: row n holds its K codes in order, code k in bits 4·(k % 8) of word
# k // 8 — the stored nibbles viewed as int32, no copy. Every row's K block is one contiguous
# run of bytes, so each program streams whole 16-byte vectors along K.


@triton.jit
def _nibble_magic(words, high, i: tl.constexpr):
    """Nibble i of every word as the exact float32 q·16^e (e = i for i < 5, i − 5 above; ``high`` is
    words >> 20): the nibble is masked in place and or-ed into the mantissa of 2²³ (0x4B000000),
    and 2²³ subtracted — one logic op and one add per code, no shift and no int→float
    conversion (a quarter of an FMA's throughput); the caller scales x by 16^−e instead."""
    if i < 5:
        bits = (words & (0xF << (4 * i))) | 0x4B000000
    else:
        bits = (high & (0xF << (4 * (i - 5)))) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _load_words(w_ptr, offs_n, n_mask, kb, KW, stride_wn, EVEN_K: tl.constexpr, WORDS: tl.constexpr):
    """(BLOCK_N, WORDS) int32 words of K block ``kb``; masked by row alone when EVEN_K."""
    offs_w = kb * WORDS + tl.arange(0, WORDS)
    ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_w[None, :]
    if EVEN_K:
        return tl.load(ptrs, mask=n_mask[:, None], other=0)
    else:
        return tl.load(ptrs, mask=n_mask[:, None] & (offs_w < KW)[None, :], other=0)


@triton.jit
def w4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, out_ptr,
    N, K, stride_xm, stride_om, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn, SPLIT_K,
    GROUP: tl.constexpr, DECODE: tl.constexpr, PER_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, PREFETCH: tl.constexpr, EVEN_K: tl.constexpr, XPLANES: tl.constexpr,
    BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
):
    """out[m, n] for one token per program (grid axis 2), on the CUDA cores: a stream of
    (BLOCK_N, WORDS) N-major words per K block, every word's 8 codes decoded in registers
    (`_nibble_magic`) and multiplied by the matching x values in float32. The zero point
    (8 for symmetric codes) and the scale are applied once per word, after its 8 products:
    Σ x·(q − z)·s = (Σ x·q − z·Σ x)·s. No layout conversion, no reshape: every tensor keeps the
    layout of the loaded words until the single reduction over the block's words at the end.
    PREFETCH loads the next block's words before decoding this one's (two blocks in flight).
    EVEN_K (WORDS divides the words per row): the word loads are masked by row only, which
    lets them be 16-byte vectors. XPLANES: x comes as `x_planes_kernel` laid it out (float32,
    plane i holding x[8w + i]·16^−e for every word w, plane 8 the words' x sums), so each
    plane is one contiguous vector load with no conversion or scaling here."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row = x_ptr + tl.program_id(2) * stride_xm
    KW = tl.cdiv(K, 8)
    blocks = tl.cdiv(KW, WORDS)
    per_split = tl.cdiv(blocks, SPLIT_K)
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, blocks)
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    words = _load_words(w_ptr, offs_n, n_mask, first, KW, stride_wn, EVEN_K, WORDS)
    for kb in range(first, last):
        offs_w = kb * WORDS + tl.arange(0, WORDS)
        w_mask = offs_w < KW
        nxt_b = tl.minimum(kb + 1, last - 1)  # the last iteration reloads its own block: never out of bounds
        if PREFETCH:
            nxt = _load_words(w_ptr, offs_n, n_mask, nxt_b, KW, stride_wn, EVEN_K, WORDS)
        part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
        xsum = tl.zeros((WORDS,), dtype=tl.float32)
        high = words >> 20
        for i in tl.static_range(8):
            if XPLANES:  # (WORDS,) float32, already scaled by 16^−e (LUT codes: unscaled)
                xi = tl.load(x_row + i * KW + offs_w, mask=w_mask, other=0.0)
            else:
                offs_k = offs_w * 8 + i
                xi = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # (WORDS,)
            if DECODE == 2:
                part += xi[None, :] * tl.load(lut_ptr + ((words >> (4 * i)) & 0xF))
            elif XPLANES:
                part += xi[None, :] * _nibble_magic(words, high, i)
            else:
                part += (xi * (1.0 / (1 << (4 * (i % 5)))))[None, :] * _nibble_magic(words, high, i)
            if not XPLANES:
                xsum += xi
        if XPLANES:
            xsum = tl.load(x_row + 8 * KW + offs_w, mask=w_mask, other=0.0)
        if PER_BLOCK:  # the whole block in one group: (BLOCK_N, 1) parameters
            g = (kb * WORDS * 8) // GROUP
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if DECODE == 1:
                z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)[:, None]
        else:  # (BLOCK_N, WORDS) parameters, gathered by each word's group
            g = (offs_w * 8) // GROUP
            pmask = n_mask[:, None] & w_mask[None, :]
            s = tl.load(s_ptr + g[None, :] * stride_sg + offs_n[:, None] * stride_sn, mask=pmask,
                        other=0.0).to(tl.float32)
            if DECODE == 1:
                z = tl.load(z_ptr + g[None, :] * stride_zg + offs_n[:, None] * stride_zn, mask=pmask,
                            other=0).to(tl.float32)
        if DECODE == 0:
            part = part - 8.0 * xsum[None, :]
        elif DECODE == 1:
            part = part - z * xsum[None, :]
        acc += part * s
        if PREFETCH:
            words = nxt
        else:
            words = _load_words(w_ptr, offs_n, n_mask, nxt_b, KW, stride_wn, EVEN_K, WORDS)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = bias * (tl.program_id(1) == 0).to(tl.float32)
        y += bias
    ptrs = out_ptr + tl.program_id(2) * stride_om + offs_n
    if ATOMIC:
        tl.atomic_add(ptrs, y, mask=n_mask)
    else:
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def x_planes_kernel(x_ptr, out_ptr, K, stride_xm, SCALED: tl.constexpr, BLOCK_W: tl.constexpr):
    """x (M, K) → (M, 9, ceil(K/8)) float32 for `w4_gemv_kernel` with XPLANES: plane i < 8 holds
    x[8w + i] (times 16^−e, e = i for i < 5 and i − 5 above, when SCALED: the weight of nibble
    i as `_nibble_magic` decodes it), plane 8 the sum of the 8 x values of word w."""
    KW = tl.cdiv(K, 8)
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    w_mask = offs_w < KW
    x_row = x_ptr + tl.program_id(1) * stride_xm
    out_row = out_ptr + tl.program_id(1) * 9 * KW
    xsum = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for i in tl.static_range(8):
        offs_k = offs_w * 8 + i
        xi = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        xsum += xi
        if SCALED:
            xi = xi * (1.0 / (1 << (4 * (i % 5))))
        tl.store(out_row + i * KW + offs_w, xi, mask=w_mask)
    tl.store(out_row + 8 * KW + offs_w, xsum, mask=w_mask)


@triton.jit
def _codes_nk(words, BLOCK_N: tl.constexpr, WORDS: tl.constexpr):
    """(BLOCK_N, WORDS) words → (BLOCK_N, 8·WORDS) codes in K order (k = 8·word + i), by interleaving
    the nibble planes: each join keeps the new axis inside a thread, so the reshape moves no data."""
    n0 = words & 0xF
    n1 = (words >> 4) & 0xF
    n2 = (words >> 8) & 0xF
    n3 = (words >> 12) & 0xF
    n4 = (words >> 16) & 0xF
    n5 = (words >> 20) & 0xF
    n6 = (words >> 24) & 0xF
    n7 = (words >> 28) & 0xF
    return _k_order(n0, n1, n2, n3, n4, n5, n6, n7)


@triton.jit
def _k_order(p0, p1, p2, p3, p4, p5, p6, p7):
    """8 (BLOCK_N, WORDS) nibble planes (plane i: code 8·word + i) → (BLOCK_N, 8·WORDS) in K order."""
    even = tl.interleave(tl.interleave(p0, p4), tl.interleave(p2, p6))
    odd = tl.interleave(tl.interleave(p1, p5), tl.interleave(p3, p7))
    return tl.interleave(even, odd)


@triton.jit
def _zero_points(z_ptr, g, offs_n, n_mask, stride_zg, stride_zn, DECODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N,) float32 zero points of group g: stored (DECODE 1), else 8 (symmetric codes)."""
    if DECODE == 1:
        return tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)
    else:
        return tl.full((BLOCK_N,), 8.0, tl.float32)


@triton.jit
def _dequant_planes(words, s, z, dtype: tl.constexpr):
    """(BLOCK_N, WORDS) words, (BLOCK_N,) float32 scales and zero points → (BLOCK_N, 8·WORDS) (q − z)·s in
    ``dtype``, K order. Nibble i stays where it is (`_nibble_magic`: one logic op and one add give
    q·16^e exactly) and one FMA with the scale times 16^−e finishes it: q·s − z·s."""
    high = words >> 20
    zs = (-z * s)[:, None]
    p0 = (_nibble_magic(words, high, 0) * s[:, None] + zs).to(dtype)
    p1 = (_nibble_magic(words, high, 1) * (s * 0.0625)[:, None] + zs).to(dtype)
    p2 = (_nibble_magic(words, high, 2) * (s * 0.00390625)[:, None] + zs).to(dtype)
    p3 = (_nibble_magic(words, high, 3) * (s * 0.000244140625)[:, None] + zs).to(dtype)
    p4 = (_nibble_magic(words, high, 4) * (s * 0.0000152587890625)[:, None] + zs).to(dtype)
    p5 = (_nibble_magic(words, high, 5) * s[:, None] + zs).to(dtype)
    p6 = (_nibble_magic(words, high, 6) * (s * 0.0625)[:, None] + zs).to(dtype)
    p7 = (_nibble_magic(words, high, 7) * (s * 0.00390625)[:, None] + zs).to(dtype)
    return _k_order(p0, p1, p2, p3, p4, p5, p6, p7)


@triton.jit
def _codes_as(q, dtype: tl.constexpr, MAGIC: tl.constexpr, UPCAST: tl.constexpr):
    """int32 codes 0..15 → ``dtype`` values: q itself, or with MAGIC the float 2^e + q made by or-ing q
    into the mantissa of a power of two (bfloat16 128 + q, float16 1024 + q; no int→float
    conversion); the caller removes the offset with the block's x sums."""
    if MAGIC:
        if dtype == tl.bfloat16:
            return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif UPCAST:  # the interpreter converts integers to bfloat16 wrongly; float32 holds them exactly
        return q.to(tl.float32)
    else:
        return q.to(dtype)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b: in float32 with IEEE products when IEEE (float32 inputs, or the interpreter, see
    UPCAST in the module docstring), else on the tensor cores in the operands' own dtype."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def w4_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn, SPLIT_K,
    GROUP: tl.constexpr, DECODE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    PLANES: tl.constexpr, MAGIC: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, WORDS: tl.constexpr, GROUP_N: tl.constexpr,
):
    """out (M, N) on the tensor cores with the weight as the left operand: each program computes
    outᵀ tile (BLOCK_N rows of W) × (BLOCK_T tokens) = W tile · x tileᵀ, so few tokens still fill
    the MMA's large dimension with weight rows, and the decoded weight feeds ``tl.dot`` straight
    from registers. Codes enter the dot unscaled, as exact small integers q − z (z = 8 for
    symmetric codes), and each K block's partial product (the block lies in one group: 8·WORDS
    divides GROUP) is scaled once. With MAGIC the codes enter as 2^e + q instead, made by or-ing
    q into the mantissa of a power of two (no int→float conversion), and the block's partial
    product loses (2^e + z) times the block's x sums: Σ x·(q − z)·s = (Σ x·(2^e + q) − (2^e + z)·Σ x)·s.
    PLANES: 0 decodes the (BLOCK_N, 8·WORDS) tile in K order (`_codes_nk`) for one dot against
    a contiguous x tile; 1 runs 8 dots per block, one per nibble plane i (codes k = 8·w + i)
    against the x columns of stride 8 that match it, with no interleave; 2 decodes each code to
    (q − z)·s in x's dtype (`_dequant_planes`: no int→float conversion, no per-block partial
    product to scale) for one dot per block into the accumulator (MAGIC unused)."""
    offs_n, offs_t, n_mask, t_mask = _tile_offsets(N, M, BLOCK_N, BLOCK_T, GROUP_N)
    KW = tl.cdiv(K, 8)
    BLOCK_K: tl.constexpr = 8 * WORDS
    blocks = tl.cdiv(KW, WORDS)
    per_split = tl.cdiv(blocks, SPLIT_K)
    first = tl.program_id(1) * per_split
    last = tl.minimum(first + per_split, blocks)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for kb in range(first, last):
        offs_w = kb * WORDS + tl.arange(0, WORDS)
        words = _load_words(w_ptr, offs_n, n_mask, kb, KW, stride_wn, EVEN_K, WORDS)  # (BN, WORDS)
        g = (kb * BLOCK_K) // GROUP
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        if PLANES == 2:  # codes decoded and scaled in x's dtype, accumulated in place
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + offs_t[None, :] * stride_xm + offs_k[:, None],
                         mask=(offs_k < K)[:, None] & t_mask[None, :], other=0.0)  # (BK, BT)
            zf = _zero_points(z_ptr, g, offs_n, n_mask, stride_zg, stride_zn, DECODE, BLOCK_N)
            acc = _dot(_dequant_planes(words, s, zf, dtype), xt, acc, UPCAST or dtype == tl.float32)
        else:
            if DECODE == 1:
                z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0).to(tl.int32)[:, None]
            else:
                z = tl.full((BLOCK_N, 1), 8, tl.int32)
            if MAGIC:  # codes as they are; the zero point (and 2^e) leave through the x sums below
                z = 0
            xsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
            if PLANES:
                part = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
                for i in tl.static_range(8):
                    offs_k = offs_w * 8 + i
                    xt = tl.load(x_ptr + offs_t[None, :] * stride_xm + offs_k[:, None],
                                 mask=(offs_k < K)[:, None] & t_mask[None, :], other=0.0)  # (WORDS, BT)
                    v = _codes_as(((words >> (4 * i)) & 0xF) - z, dtype, MAGIC, UPCAST)
                    part = _dot(v, xt, part, UPCAST or dtype == tl.float32)
                    if MAGIC:
                        xsum += tl.sum(xt.to(tl.float32), axis=0)
            else:
                offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + offs_t[None, :] * stride_xm + offs_k[:, None],
                             mask=(offs_k < K)[:, None] & t_mask[None, :], other=0.0)  # (BK, BT)
                v = _codes_as(_codes_nk(words, BLOCK_N, WORDS) - z, dtype, MAGIC, UPCAST)
                part = _dot(v, xt, tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32), UPCAST or dtype == tl.float32)
                if MAGIC:
                    xsum = tl.sum(xt.to(tl.float32), axis=0)
            if MAGIC:
                zf = _zero_points(z_ptr, g, offs_n, n_mask, stride_zg, stride_zn, DECODE, BLOCK_N)
                if dtype == tl.bfloat16:
                    zf = zf + 128.0
                else:
                    zf = zf + 1024.0
                part = part - zf[:, None] * xsum[None, :]
            acc += part * s[:, None]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = bias * (tl.program_id(1) == 0).to(tl.float32)
        acc = acc + bias[:, None]
    ptrs = out_ptr + offs_t[None, :] * stride_om + offs_n[:, None]
    mask = n_mask[:, None] & t_mask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def w4_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn, SPLIT_K,
    GROUP: tl.constexpr, DECODE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    UNPACK: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) = x (M, K) @ W (N, K)ᵀ on the tensor cores with x as the left operand, as a plain
    tiled GEMM (grouped tile order, one float32 accumulator that every K block's ``tl.dot`` adds
    into in place) whose (BLOCK_K, BLOCK_N) weight tile is decoded to x's dtype inside the K loop
    (every K block lies in one group). The dequantised weight never exists in device memory:
    the same idea as fused W4A16 kernels (Frantar et al.'s Marlin, arXiv 2408.11743), left to
    Triton's own tiling and pipelining rather than a hand-made register layout.
    UNPACK: 0 loads the (BLOCK_N, 8·WORDS) N-major words once (16-byte vectors along K), decodes
    each nibble plane in place (`_dequant_planes`: a logic op, an add and an FMA per code, no shift,
    no int→float conversion), interleaves the planes into K order and transposes the tile;
    1 has every element (k, n) load its own word (n, k // 8) — 8 elements share one, from L1 —
    shift it by 4·(k % 8), or it into the mantissa of 2²³ and subtract 2²³ + z (exact) before
    scaling: no reshape and no join, 8 loads per word."""
    offs_m, offs_n, m_mask, n_mask = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KW = tl.cdiv(K, 8)
    WORDS: tl.constexpr = BLOCK_K // 8
    first, last = _k_range(K, BLOCK_K, SPLIT_K)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(first, last):
        offs_k, k_mask, a = _x_block(x_ptr, offs_m, m_mask, kb, K, stride_xm, BLOCK_K)
        g = (kb * BLOCK_K) // GROUP
        s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        z = _zero_points(z_ptr, g, offs_n, n_mask, stride_zg, stride_zn, DECODE, BLOCK_N)
        if UNPACK == 0:
            words = _load_words(w_ptr, offs_n, n_mask, kb, KW, stride_wn, EVEN_K, WORDS)  # (BN, WORDS)
            b = tl.trans(_dequant_planes(words, s, z, dtype))  # (BK, BN)
        else:
            offset = 8388608.0 + z  # 2²³ + z, exact
            words = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k // 8)[:, None],
                            mask=k_mask[:, None] & n_mask[None, :], other=0)  # (BK, BN), word of each element
            q = ((words >> ((offs_k % 8) * 4)[:, None]) & 0xF) | 0x4B000000
            b = ((q.to(tl.float32, bitcast=True) - offset[None, :]) * s[None, :]).to(dtype)
        acc = _dot(a, b, acc, UPCAST or dtype == tl.float32)
    _epilogue(acc, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, ATOMIC)


@triton.jit
def dequant_nk_kernel(
    w_ptr, s_ptr, z_ptr, g_ptr, lut_ptr, out_ptr,
    N, K, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn,
    GROUP: tl.constexpr, DECODE: tl.constexpr, HAS_GIDX: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
):
    """out (N, K) row-major = decode(N-major words) · scale, in out's dtype: reads each row's words
    and writes its values as contiguous runs (dequantise + GEMM at large M)."""
    BLOCK_K: tl.constexpr = 8 * WORDS
    kb = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    nk_mask = n_mask[:, None] & k_mask[None, :]
    words = _load_words(w_ptr, offs_n, n_mask, kb, tl.cdiv(K, 8), stride_wn, EVEN_K, WORDS)
    q = _codes_nk(words, BLOCK_N, WORDS)  # (BN, BK)
    if HAS_GIDX:
        g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
    else:
        g = offs_k // GROUP
    s = tl.load(s_ptr + g[None, :] * stride_sg + offs_n[:, None] * stride_sn, mask=nk_mask, other=0.0)
    z = 0.0
    if DECODE == 1:
        z = tl.load(z_ptr + g[None, :] * stride_zg + offs_n[:, None] * stride_zn, mask=nk_mask, other=0)
        z = z.to(tl.float32)
    v = _values(q, z, lut_ptr, DECODE) * s.to(tl.float32)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], v.to(out_ptr.dtype.element_ty), mask=nk_mask)


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie_to_odd = ((r - v) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0)
    return tl.where(tie_to_odd, r - 1.0, r)


@triton.jit
def _row_scales(x_ptr, offs_m, m_mask, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """absmax / 127 of each row (BLOCK_M,) float32, never zero."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
    scale = tl.div_rn(amax, tl.full((BLOCK_M,), 127.0, tl.float32))
    return tl.where(scale == 0.0, 1.1754943508222875e-38, scale)  # float32's smallest normal, as store_scale


@triton.jit
def _quantize_tile(a, scale):
    """a (BM, BK) float32, scale (BM,) → int8 codes."""
    q = _round_half_even(tl.div_rn(a, tl.broadcast_to(scale[:, None], a.shape)))
    return tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int8)


@triton.jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-token int8: q (M, K) int8 and s (M,) float32 from x (M, K)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    scale = _row_scales(x_ptr, offs_m, m_mask, K, stride_xm, BLOCK_M, BLOCK_K)
    tl.store(s_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = m_mask[:, None] & (offs_k < K)[None, :]
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], _quantize_tile(a, scale), mask=mask)


@triton.jit
def w8a8_matmul_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    FUSED_QUANT: tl.constexpr,  # x is float and quantised here; else x is int8 with scales xs
    SPLIT_K, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) = (q(x) @ W (N, K) int8 ᵀ) · x scale (M,) · w scale (N,) (+ bias)."""
    offs_m, offs_n, m_mask, n_mask = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    if FUSED_QUANT:
        x_scale = _row_scales(x_ptr, offs_m, m_mask, K, stride_xm, BLOCK_M, BLOCK_K)
    else:
        x_scale = tl.load(xs_ptr + offs_m, mask=m_mask, other=1.0)
    first, last = _k_range(K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(first, last):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a_mask = m_mask[:, None] & k_mask[None, :]
        if FUSED_QUANT:
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=a_mask, other=0.0)
            a = _quantize_tile(a.to(tl.float32), x_scale)
        else:
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=a_mask, other=0)
        b = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :],
                    other=0)  # (BK, BN) view of the row-major (N, K) weight
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    w_scale = tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    _epilogue(y, out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, ATOMIC)


INTERPRETED: bool = isinstance(int4_matmul_kernel, InterpretedFunction)  # how the @triton.jit above were built
