"""The E8P Triton kernels (`lowbit.kernels.triton.e8p` launches them). Imported at the first launch,
never with the package, so TRITON_INTERPRET can still be chosen by the caller.

Decoding follows `lowbit.formats.e8p`: code c (16 bits) → source vector j = c >> 8 (a row of the
256 × 8 integer table of 2|a|), signs of entries 0–6 from bits 1–7, the sign of entry 7 from the
parity rule — the coordinates must sum to an even integer, which for odd 2|aᵢ| means entry 7 is
negative exactly when (Σ 2|aᵢ| / 2 + popcount(bits 1–7)) is odd (`parity` holds the first term per
source vector) — and a shift of ±¼ from bit 0 (QuIP#, Tseng et al. 2024, arXiv 2402.04396, §4.2).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_tile(codes_ptr, source_ptr, parity_ptr, offs_n, offs_k, N, K):
    """The codewords (BLOCK_N, BLOCK_K) float32 of rows offs_n, columns offs_k (unscaled)."""
    G = K // 8
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    group = offs_k // 8
    entry = offs_k % 8
    code = tl.load(codes_ptr + offs_n[:, None] * G + group[None, :], mask=mask, other=0).to(tl.int32) & 0xFFFF
    src = code >> 8
    a2 = tl.load(source_ptr + src * 8 + entry[None, :], mask=mask, other=1)
    signs = (code >> 1) & 0x7F
    count = (signs & 0x55) + ((signs >> 1) & 0x55)
    count = (count & 0x33) + ((count >> 2) & 0x33)
    count = (count & 0x0F) + ((count >> 4) & 0x0F)
    last_negative = (tl.load(parity_ptr + src, mask=mask, other=0) + count) & 1
    bit = (code >> (1 + entry[None, :])) & 1
    negative = tl.where(entry[None, :] == 7, last_negative, bit)
    value = tl.where(negative == 1, -a2, a2).to(tl.float32) * 0.5
    return value + tl.where((code & 1) == 1, -0.25, 0.25)


@triton.jit
def e8p_decode_kernel(codes_ptr, scale_ptr, source_ptr, parity_ptr, out_ptr, N, K,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (N, K) float32 = codeword · scale of each row."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = _decode_tile(codes_ptr, source_ptr, parity_ptr, offs_n, offs_k, N, K)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w * scale[:, None], mask=mask)


@triton.jit
def e8p_matmul_kernel(x_ptr, codes_ptr, scale_ptr, source_ptr, parity_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_xm, stride_om, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = scale[n] · Σ_k x[m, k] · codeword[n, k] (+ bias[n]), float32 accumulation, the codes
    decoded inside each tile (the weight is never written out). Codewords are multiples of ¼ below 4
    in magnitude, exact in bfloat16 and float16: without IEEE the tile's product runs on the tensor
    cores in x's own dtype; with IEEE (float32 x, or the interpreter, which multiplies bfloat16
    tiles wrongly) both tiles are float32 with IEEE products."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _decode_tile(codes_ptr, source_ptr, parity_ptr, offs_n, offs_k, N, K)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
