"""Launchers for the E8P decode, decode-matmul and GEMV Triton kernels (`e8p_jit`), checked against the
reference decoder (`lowbit.algorithms.ldlq.E8PWeight.dequantize`) under TRITON_INTERPRET=1.

`e8p_linear` picks the kernel by the number of tokens M: up to ``GEMV_MAX_M`` the CUDA-core GEMV
(one token per program, each code decoded once per token), above it the tensor-core kernel
(each code decoded once per BLOCK_M tokens; at M ≤ BLOCK_M that is once in all), and from
``DECODE_MIN_M`` on, for half-precision x, `e8p_decode` to x's dtype and one cuBLAS GEMM (on an
H100 at M = 2048 that runs at ~0.85× bf16, the fused kernel at ~0.25×: its decode work is
repeated for every BLOCK_M rows and does not overlap the MMAs). Where the M × N tiles
alone would leave SMs idle (few tokens, small N, long K) the K range is split and the float32
partials are added atomically (split-K, as `jit` does for the 4-bit kernels).
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats import e8p
from lowbit.kernels.triton.ops import _cdiv, _launch_out, _sm_count, _splits, triton_importable

# default tiles per path: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps); BLOCK_K counts weights (8 per code)
# (from bench/gpu_e8p.py on an H100: GEMV BLOCK_N 32 was best on the LLaMA-70B shapes, 64 at 4096²)
GEMV_TILES = (1, 32, 256, 4)
DOT_TILES = (16, 128, 64, 4)  # M ≤ 16
DOT_TILES_MID = (64, 128, 64, 4)  # M ≤ 64 (BLOCK_M 64: Hopper's wgmma)
DOT_TILES_LARGE = (128, 128, 64, 8)
BLOCK_M, BLOCK_N, BLOCK_K = DOT_TILES[:3]
GEMV_MAX_M = 2
DECODE_MIN_M = 256  # from here on (bfloat16/float16 x): decode to x's dtype, then one cuBLAS GEMM
DECODE_TILES = (32, 256, 4)  # (BLOCK_N, BLOCK_K, num_warps)
WAVES = 4  # split K until about WAVES programs per SM


def _jit(x: Tensor):
    if not triton_importable():
        raise LowbitError("the E8P Triton kernels need the triton package: pip install 'lowbit[gpu]'.")
    jit = importlib.import_module("lowbit.kernels.triton.e8p_jit")
    if x.device.type != "cuda" and not _interpreted(jit):
        raise LowbitError(f"the E8P Triton kernels run on CUDA tensors, got {x.device.type} (or set "
                          "TRITON_INTERPRET=1 before their first launch).")
    return jit


def _interpreted(jit) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(jit.e8p_decode_kernel, InterpretedFunction)


def _int32(v: int) -> int:
    """A 32-bit pattern as the int32 value with the same bits."""
    return v - (1 << 32) if v >= 1 << 31 else v


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """The two gather tables of `e8p_jit` on ``device``: ``source`` (256,) int32, nibble i = bᵢ = 2|aᵢ| of
    source vector j and bit 31 = (Σ bᵢ / 2) mod 2; ``signs`` (128,) int32, nibble i = 0xF where bit i of
    the 7 sign bits is set, nibble 7 = 0xF when their popcount is odd."""
    a2 = e8p.source_vectors_x2()
    assert int(a2.max()) < 8, "2|a| must fit three bits of a nibble"
    source = []
    for row in a2.tolist():
        word = sum(b << (4 * i) for i, b in enumerate(row)) | ((sum(row) // 2) % 2) << 31
        source.append(_int32(word))
    signs = []
    for s in range(128):
        word = sum(0xF << (4 * i) for i in range(7) if s >> i & 1) | (0xF << 28 if bin(s).count("1") % 2 else 0)
        signs.append(_int32(word))
    return (torch.tensor(source, dtype=torch.int32, device=device),
            torch.tensor(signs, dtype=torch.int32, device=device))


def _check(codes: Tensor, scale: Tensor) -> tuple[int, int]:
    if codes.dtype != torch.int16 or codes.dim() != 2 or scale.shape != (codes.shape[0],):
        raise LowbitError(f"E8P codes must be (R, C/8) int16 with (R,) scales, got {tuple(codes.shape)} "
                          f"{codes.dtype} and {tuple(scale.shape)}.")
    return codes.shape[0], codes.shape[1] * e8p.DIM


def e8p_decode(codes: Tensor, scale: Tensor, out_dtype: torch.dtype = torch.float32,
               tiles: tuple[int, int, int] | None = None) -> Tensor:
    """The weight (R, C) the codes stand for, decoded by the kernel, in ``out_dtype`` (float32, bfloat16 or
    float16). Codeword × row scale is computed in float32 and rounded once to ``out_dtype``, which is
    exactly `E8PWeight.dequantize(out_dtype)` (the product of a multiple of ¼ below 4 and a float16
    scale is the same float32 there; both then round to nearest even). ``tiles``: (BLOCK_N, BLOCK_K,
    num_warps)."""
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LowbitError(f"E8P decodes to float32, bfloat16 or float16, not {out_dtype}.")
    N, K = _check(codes, scale)
    jit = _jit(codes)
    source, signs = _tables(codes.device)
    bn, bk, warps = tiles or DECODE_TILES
    bg = bk // e8p.DIM
    G = K // e8p.DIM
    out = torch.empty(N, K, dtype=out_dtype, device=codes.device)
    grid = (_cdiv(N, bn), _cdiv(G, bg))
    jit.e8p_decode_kernel[grid](codes.contiguous(), scale.contiguous(), source, signs, out, N, G,
                                EVEN_G=G % bg == 0, BLOCK_N=bn, BLOCK_G=bg, num_warps=warps)
    return out


def _config(M: int, N: int, K: int, device: torch.device, config) -> dict:
    """The launch settings: ``config`` as given (a dict, or a (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) tuple
    for the tensor-core path), missing entries from the defaults for M."""
    if config is None:
        config = {}
    elif not isinstance(config, dict):
        bm, bn, bk, warps = config
        config = {"path": "dot", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
    path = config.get("path") or ("gemv" if M <= GEMV_MAX_M else "dot")
    if path not in ("gemv", "dot", "decode"):
        raise LowbitError(f"the E8P matmul path is 'gemv', 'dot' or 'decode', not {path!r}.")
    if path == "decode":
        return {"path": path}
    tiles = (GEMV_TILES if path == "gemv" else DOT_TILES if M <= 16 else DOT_TILES_MID if M <= 64
             else DOT_TILES_LARGE)
    out = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"), tiles), path=path)
    out.update(config)
    bk = out["BLOCK_K"]
    if bk % e8p.DIM or bk & (bk - 1) or (path == "dot" and bk < 16):
        raise LowbitError(f"E8P BLOCK_K must be a power of two, a multiple of 8 (≥ 16 for tl.dot), got {bk}.")
    if path == "gemv":
        out["BLOCK_M"] = 1
    if out.get("split_k") is None:
        tiles = (M if path == "gemv" else _cdiv(M, out["BLOCK_M"])) * _cdiv(N, out["BLOCK_N"])
        out["split_k"] = _splits(tiles, _cdiv(K, bk), WAVES * _sm_count(device), min_blocks=2)
    out["split_k"] = max(1, min(out["split_k"], _cdiv(K, bk)))
    return out


def e8p_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
               config: dict | tuple[int, int, int, int] | None = None) -> Tensor:
    """x (..., C) · Wᵀ (+ bias) with W decoded from E8P codes inside the kernel; float32 accumulation,
    output in x's dtype. ``config`` overrides the launcher's choice (the GPU bench sweeps it): a dict
    with ``path`` ('gemv': CUDA cores, one token per program; 'dot': tensor cores; 'decode': the weight
    decoded to x's dtype, then ``F.linear``), ``BLOCK_M``,
    ``BLOCK_N``, ``BLOCK_K`` (weights along K, a power of two), ``num_warps``, ``split_k``
    (1: no split), ``num_stages``; or a (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) tuple for 'dot'."""
    N, K = _check(codes, scale)
    if x.shape[-1] != K:
        raise LowbitError(f"the E8P layer expects inputs (..., {K}), got {tuple(x.shape)}.")
    jit = _jit(x)
    source, signs = _tables(x.device)
    x2 = x.reshape(-1, K).contiguous()
    M, G = x2.shape[0], K // e8p.DIM
    if M == 0:
        return x.new_empty(*x.shape[:-1], N)
    if config is None and M >= DECODE_MIN_M and x.dtype in (torch.bfloat16, torch.float16):
        config = {"path": "decode"}
    cfg = _config(M, N, K, x.device, config)
    if cfg["path"] == "decode":
        b = None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x, e8p_decode(codes, scale, x.dtype), b)
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["split_k"]
    atomic = split > 1
    out = _launch_out(torch.empty(M, N, dtype=x.dtype, device=x.device), split)
    extra = {"num_warps": cfg["num_warps"]}
    if cfg.get("num_stages") is not None:
        extra["num_stages"] = cfg["num_stages"]
    args = (x2, codes.contiguous(), scale.contiguous(), source, signs, bias if bias is not None else out, out,
            M, N, G, x2.stride(0), out.stride(0), split)
    if cfg["path"] == "gemv":
        bg = bk // e8p.DIM
        jit.e8p_gemv_kernel[(M, _cdiv(N, bn), split)](
            *args, HAS_BIAS=bias is not None, ATOMIC=atomic, EVEN_G=G % bg == 0, BLOCK_N=bn, BLOCK_G=bg, **extra)
    else:
        ieee = x.dtype == torch.float32 or _interpreted(jit)
        jit.e8p_matmul_kernel[(_cdiv(M, bm), _cdiv(N, bn), split)](
            *args, HAS_BIAS=bias is not None, ATOMIC=atomic, IEEE=ieee, EVEN_G=G % (bk // e8p.DIM) == 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra)
    return out.to(x.dtype).reshape(*x.shape[:-1], N)

