"""Launchers for the E8P decode and decode-matmul Triton kernels (`e8p_jit`), checked against the
reference decoder (`lowbit.algorithms.ldlq.E8PWeight.dequantize`) under TRITON_INTERPRET=1."""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import e8p
from lowbit.kernels.triton.ops import triton_importable

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64


def _jit(x: Tensor):
    if not triton_importable():
        raise LowbitError("the E8P Triton kernels need the triton package: pip install 'lowbit[gpu]'.")
    jit = importlib.import_module("lowbit.kernels.triton.e8p_jit")
    from triton.runtime.interpreter import InterpretedFunction

    if x.device.type != "cuda" and not isinstance(jit.e8p_decode_kernel, InterpretedFunction):
        raise LowbitError(f"the E8P Triton kernels run on CUDA tensors, got {x.device.type} (or set "
                          "TRITON_INTERPRET=1 before their first launch).")
    return jit


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """The source table 2|a| (256·8,) int32 and each row's (Σ 2|aᵢ| / 2) mod 2 (256,) int32, on ``device``."""
    a2 = e8p.source_vectors_x2()
    parity = (a2.sum(dim=1) // 2) % 2
    return a2.reshape(-1).to(torch.int32).to(device), parity.to(torch.int32).to(device)


def _check(codes: Tensor, scale: Tensor) -> tuple[int, int]:
    if codes.dtype != torch.int16 or codes.dim() != 2 or scale.shape != (codes.shape[0],):
        raise LowbitError(f"E8P codes must be (R, C/8) int16 with (R,) scales, got {tuple(codes.shape)} "
                          f"{codes.dtype} and {tuple(scale.shape)}.")
    return codes.shape[0], codes.shape[1] * e8p.DIM


def e8p_decode(codes: Tensor, scale: Tensor) -> Tensor:
    """The float32 weight (R, C) the codes stand for, decoded by the kernel."""
    N, K = _check(codes, scale)
    jit = _jit(codes)
    source, parity = _tables(codes.device)
    out = torch.empty(N, K, dtype=torch.float32, device=codes.device)
    grid = (triton_cdiv(N, BLOCK_N), triton_cdiv(K, BLOCK_K))
    jit.e8p_decode_kernel[grid](codes.contiguous(), scale.contiguous(), source, parity, out, N, K,
                                BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


def e8p_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
               config: tuple[int, int, int, int] | None = None) -> Tensor:
    """x (..., C) · Wᵀ (+ bias) with W decoded from E8P codes inside the matmul tiles; float32 accumulation,
    output in x's dtype. ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) overrides the default tiles
    (the GPU bench sweeps it)."""
    N, K = _check(codes, scale)
    if x.shape[-1] != K:
        raise LowbitError(f"the E8P layer expects inputs (..., {K}), got {tuple(x.shape)}.")
    jit = _jit(x)
    source, parity = _tables(x.device)
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = config or (BLOCK_M, BLOCK_N, BLOCK_K, 4)
    from triton.runtime.interpreter import InterpretedFunction

    ieee = x.dtype == torch.float32 or isinstance(jit.e8p_matmul_kernel, InterpretedFunction)
    grid = (triton_cdiv(M, bm), triton_cdiv(N, bn))
    jit.e8p_matmul_kernel[grid](x2, codes.contiguous(), scale.contiguous(), source, parity,
                                bias if bias is not None else out, out, M, N, K, x2.stride(0), out.stride(0),
                                HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                num_warps=warps)
    return out.reshape(*x.shape[:-1], N)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
