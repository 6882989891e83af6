"""The Triton kernels themselves. Imported at the first launch (see `ops._kernels`), never with the package.

Two GEMMs, both ``out[m, n] = Σ_k x[m, k] · W[n, k]`` over (BLOCK_M, BLOCK_N) output tiles
in the grouped order of the Triton matmul tutorial (GROUP_M row tiles reuse one column
tile from L2), with optional split-K: the K blocks are cut into SPLIT_K ranges, one per
program along grid axis 1, whose float32 partials are added atomically (SplitK work
decomposition for skinny decode GEMMs: Hoque et al., "Accelerating a Triton Fused Kernel
for W4A16 Quantized Inference with SplitK Work Decomposition", arXiv 2402.00025).

- `int4_matmul_kernel`: 4-bit weights decoded in registers right before ``tl.dot``
  (weight-only W4A16 as GPTQ serves it, Frantar et al., arXiv 2210.17323, from the
  K-packed int32 words GPTQ checkpoints use; NF4 by a 16-entry table lookup, Dettmers
  et al., arXiv 2305.14314). Each word is loaded once and its 8 codes unpacked. When
  every K block lies inside one group (BLOCK_K divides the group size, or one group per
  row) the block's codes go through ``tl.dot`` as small exact integers (or table values)
  and the group scale multiplies the (BLOCK_M, BLOCK_N) partial product afterwards;
  otherwise (act-order with uneven groups, or a group size no block fits) each code is
  scaled by the scale of its own column's group before the dot.
- `int4_gemv_kernel`: the same weights for 1–4 tokens on the CUDA cores (no ``tl.dot``): a
  bandwidth-bound stream of the packed words with float32 FMAs.
- `dequant4_kernel`: the same decoding, written out as a float (N, K) weight, for
  dequantise + GEMM at large M, where a vendor GEMM beats decoding inside the tiles.
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
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    first, last = _k_range(K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(first, last):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
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


@triton.jit
def int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, lut_ptr, b_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn, SPLIT_K,
    GROUP: tl.constexpr, DECODE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (M, N) for a few tokens (M ≤ BLOCK_M ≤ 4) without tensor cores: decoding is memory-bound, so
    each program streams (BLOCK_K/8, BLOCK_N) words, and for each of the 8 nibble positions multiplies
    the decoded values by the matching x columns in float32, accumulating (BLOCK_M, BLOCK_K/8, BLOCK_N)
    partial sums that are reduced once at the end. Scales (and zero points) are gathered per word, so
    any group size that is a multiple of 8 (or one group per row) works."""
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    first, last = _k_range(K, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_M, WORDS, BLOCK_N), dtype=tl.float32)
    for kb in range(first, last):
        offs_w = kb * WORDS + tl.arange(0, WORDS)
        w_mask = (offs_w < tl.cdiv(K, 8))[:, None] & n_mask[None, :]
        words = tl.load(w_ptr + offs_w[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=w_mask, other=0)
        g = (offs_w * 8) // GROUP
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=w_mask, other=0.0)
        s = s.to(tl.float32)
        z = 0.0
        if DECODE == 1:
            z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=w_mask, other=0)
            z = z.to(tl.float32)
        for i in tl.static_range(8):
            v = _values((words >> (4 * i)) & 0xF, z, lut_ptr, DECODE) * s  # (WORDS, BN)
            offs_k = offs_w * 8 + i
            xi = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)  # (BM, WORDS)
            acc += xi[:, :, None] * v[None, :, :]
    _epilogue(tl.sum(acc, axis=1), out_ptr, b_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS, ATOMIC)


@triton.jit
def dequant4_kernel(
    w_ptr, s_ptr, z_ptr, g_ptr, lut_ptr, out_ptr,
    N, K, stride_wk, stride_wn, stride_sg, stride_sn, stride_zg, stride_zn,
    GROUP: tl.constexpr, DECODE: tl.constexpr, HAS_GIDX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out (N, K) row-major, in out's dtype = decode(words) · scale: the 4-bit weight as floats, for
    dequantise + GEMM at large M (one pass: reads the packed words once, writes each value once)."""
    kb = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    kn_mask = k_mask[:, None] & n_mask[None, :]
    q = _codes(w_ptr, kb, offs_n, n_mask, K, stride_wk, stride_wn, BLOCK_K, BLOCK_N)
    if HAS_GIDX:
        g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
    else:
        g = offs_k // GROUP
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=kn_mask, other=0.0)
    z = 0.0
    if DECODE == 1:
        z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=kn_mask, other=0)
        z = z.to(tl.float32)
    v = _values(q, z, lut_ptr, DECODE) * s.to(tl.float32)  # (BK, BN)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], v.to(out_ptr.dtype.element_ty), mask=kn_mask)


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
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
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
