"""lowbit's Triton kernels as ``torch.library`` custom ops, their launchers and block configs.

Ops (all return a new tensor (..., N) in x's dtype; x is (..., K) float16, bfloat16 or
float32; every argument is a field of the matching ``prepare_*`` dict, see `layout`):

- ``lowbit::w4a16_triton(x, qweight, scales, zeros?, perm?, g_idx?, bias?, group_size)``
- ``lowbit::nf4_triton(x, qweight, scales, levels, perm?, g_idx?, bias?, group_size)``
- ``lowbit::w8a8_triton(x, weight, scale, bias?)``: per-token dynamic int8 activations.

The launchers (``launch_*``) write into a given output and take an explicit
`BlockConfig`, so that tests can poison the output and pin each code path.

Block configs are chosen by M from a table, not autotuned at run time: `int4_config` and
`w8a8_config` hold the fastest configs of ``bench/gpu_kernels.py``'s sweep on an H100,
including where 4-bit weights switch to dequantise + cuBLAS.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels.triton.layout import Prepared

_DECODE = {"int_sym": 0, "int_asym": 1, "lut": 2}


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    # "triton": the fused kernel. 4-bit: "gemv" is the tensor-core-free kernel for M ≤ 4; "dequant" writes the float weight with `dequant4_kernel`,
    # then F.linear (cuBLAS). W8A8: "int_mm" quantises x, then torch._int_mm and a rescale.
    backend: str = "triton"
    unpack: int = 0  # 4-bit "triton": 0 reshapes each loaded word into 8 rows; 1 loads a word per row and shifts


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> bool:
    """True when triton imports and there is something to run it on (CUDA, or the interpreter)."""
    return triton_importable() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _kernels(x: Tensor) -> ModuleType:
    """The `jit` module, imported here at the first launch rather than with this package:
    ``@triton.jit`` decides between compiler and interpreter from TRITON_INTERPRET when it
    runs, so importing late lets a caller (a test) choose after importing lowbit."""
    if not triton_importable():
        raise LowbitError("the Triton kernels need the triton package: pip install 'lowbit[gpu]'.")
    jit = importlib.import_module("lowbit.kernels.triton.jit")
    if x.device.type != "cuda" and not jit.INTERPRETED:
        raise LowbitError(f"the Triton kernels run on CUDA tensors, got {x.device.type} (or set TRITON_INTERPRET=1 "
                          "before their first launch).")
    return jit


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a nominal machine, so small test shapes still split K
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split_k(m: int, n: int, k: int, bm: int, bn: int, bk: int, programs: int) -> int:
    """Splits of K that bring the grid to about ``programs``, each keeping ≥ 4 K blocks."""
    tiles = _cdiv(m, bm) * _cdiv(n, bn)
    return max(1, min(_cdiv(programs, tiles), _cdiv(k, bk) // 4))


def int4_config(m: int, n: int, k: int, group_size: int, n_groups: int, sms: int, lut: bool = False) -> BlockConfig:
    """Block config for the 4-bit kernels on a device with ``sms`` SMs (``lut``: NF4).

    From ``bench/gpu_kernels.py`` on an H100 (2026-11-27, K-major words; bench/results/
    gpu_kernels_NVIDIA-H100-80GB-HBM3.md): up to 16 tokens the tensor-core kernel with
    16 × 128 tiles (16 × 64 when N ≥ 16384) and K split for about two programs per SM was
    the fastest config of the sweep on every LLaMA shape — NF4 from 1 to 4 tokens takes the
    CUDA-core GEMV kernel instead, whose table lookups cost less there; up to 64 tokens
    64 × 128 × 128 tiles; above, dequantise + cuBLAS beat every fused config (e.g. 8192 ×
    28672 at M = 256: 461 µs against 505 µs; NF4 from 17 tokens on). BLOCK_K is halved
    until it divides the group size (so a K block never spans two groups), not below 32;
    one group per row fits any."""
    if lut and m <= 4 and (n_groups == 1 or group_size % 8 == 0):
        bm, bn, bk = 1 << (m - 1).bit_length(), 128, 128
        split = max(1, min(_cdiv(2 * sms, _cdiv(n, bn)), _cdiv(k, bk) // 4))
        return BlockConfig(bm, bn, bk, split, 4, 3, backend="gemv")
    if m > (16 if lut else 64):
        return BlockConfig(16, 64, 128, 1, 4, 1, backend="dequant")
    if m <= 16:
        bm, bn, bk, warps, stages = 16, (64 if n >= 16384 else 128), 128, 4, 4
    else:
        bm, bn, bk, warps, stages = (32 if m <= 32 else 64), 128, 128, 4, 3
    if n_groups > 1:
        while bk > 32 and group_size % bk:
            bk //= 2
    split = _split_k(m, n, k, bm, bn, bk, 2 * sms if m <= 16 else sms)
    return BlockConfig(bm, bn, bk, split, warps, stages)


def w8a8_config(m: int, n: int, k: int, sms: int) -> BlockConfig:
    """Block config for the W8A8 kernel on a device with ``sms`` SMs: the fastest of the sweep on
    the LLaMA shapes (H100, 2026-11-27) — BLOCK_K 256 with 8 warps up to 64 tokens, 128 × 128 × 128
    tiles with 8 warps above."""
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 128, 256, 8, 3
    elif m <= 64:
        bm, bn, bk, warps, stages = (32 if m <= 32 else 64), 128, 256, 8, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    split = _split_k(m, n, k, bm, bn, bk, 2 * sms if m <= 16 else sms)
    return BlockConfig(bm, bn, bk, split, warps, stages)


# -- launchers ------------------------------------------------------------------------------------

def _as_rows(x: Tensor) -> Tensor:
    """(..., K) → (M, K) with unit stride along K."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_operands(x: Tensor, out: Tensor, dense: tuple[str, ...] = (), **tensors: Tensor | None) -> None:
    """x and out in float, every operand on x's device; those named in ``dense`` row-major (the
    others are read through their strides)."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise LowbitError(f"the Triton kernels take float16, bfloat16 or float32 inputs, got {x.dtype}.")
    if out.dtype != x.dtype or not out.is_contiguous():
        raise LowbitError(f"the output must be a contiguous {x.dtype} tensor, got {out.dtype}.")
    for name, t in tensors.items():
        if t is not None and (t.device != x.device or (name in dense and not t.is_contiguous())):
            raise LowbitError(f"{name} must be {'contiguous and ' if name in dense else ''}on {x.device} "
                              "(as prepare_* leaves it).")


def _launch_out(out2: Tensor, split_k: int) -> Tensor:
    """Where the kernel writes: ``out2`` itself, or a zeroed float32 buffer that split-K partials add into."""
    return out2 if split_k == 1 else torch.zeros(out2.shape, dtype=torch.float32, device=out2.device)


def _strides(t: Tensor | None) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def launch_int4(out: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
                levels: Tensor | None, perm: Tensor | None, g_idx: Tensor | None, bias: Tensor | None,
                group_size: int, config: BlockConfig | None = None) -> None:
    """out (..., N) ← x (..., K) @ decode(qweight)ᵀ (+ bias); see `prepare_w4a16` / `prepare_nf4`."""
    jit = _kernels(x)
    _check_operands(x, out, ("levels", "perm", "g_idx", "bias"), qweight=qweight, scales=scales, zeros=zeros,
                    levels=levels, perm=perm, g_idx=g_idx, bias=bias)
    K, N = x.shape[-1], qweight.shape[1]
    n_groups = scales.shape[0]
    x2 = _as_rows(x)
    if perm is not None:
        x2 = x2.index_select(1, perm)
    M = x2.shape[0]
    out2 = out.view(M, N)
    if M == 0:
        return
    cfg = config or int4_config(M, N, K, group_size, n_groups, _sm_count(x.device), lut=levels is not None)
    decode = _DECODE["lut" if levels is not None else "int_asym" if zeros is not None else "int_sym"]
    group = group_size if n_groups > 1 else K
    strides = (*_strides(qweight), *_strides(scales), *_strides(zeros))
    if cfg.backend == "dequant":
        w = torch.empty((N, K), dtype=x.dtype, device=x.device)
        grid = (_cdiv(N, cfg.block_n), _cdiv(K, cfg.block_k))
        jit.dequant4_kernel[grid](qweight, scales, zeros, g_idx, levels, w, N, K, *strides, GROUP=group,
                                  DECODE=decode, HAS_GIDX=g_idx is not None, BLOCK_N=cfg.block_n,
                                  BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
        torch.mm(x2, w.T, out=out2)
        if bias is not None:
            out2.add_(bias)
        return
    gemv_ok = g_idx is None and (n_groups == 1 or group_size % 8 == 0) and M <= cfg.block_m <= 4
    if cfg.backend == "gemv" and not gemv_ok:  # a config pinned for the GEMV kernel, on a call it cannot take
        cfg = int4_config(M, N, K, group_size, n_groups, _sm_count(x.device))  # the tensor-core kernel's
    if cfg.backend == "gemv":
        target = _launch_out(out2, cfg.split_k)
        grid = (_cdiv(N, cfg.block_n), cfg.split_k, _cdiv(M, cfg.block_m))
        jit.int4_gemv_kernel[grid](
            x2, qweight, scales, zeros, levels, bias, target, M, N, K, x2.stride(0), target.stride(0), *strides,
            cfg.split_k, GROUP=group, DECODE=decode, HAS_BIAS=bias is not None, ATOMIC=cfg.split_k > 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        if target is not out2:
            out2.copy_(target)
        return
    per_block = g_idx is None and (n_groups == 1 or group_size % cfg.block_k == 0)
    target = _launch_out(out2, cfg.split_k)
    upcast = jit.INTERPRETED and x.dtype == torch.bfloat16
    grid = (_cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n), cfg.split_k)
    jit.int4_matmul_kernel[grid](
        x2, qweight, scales, zeros, g_idx, levels, bias, target,
        M, N, K, x2.stride(0), target.stride(0), *strides,
        GROUP=group, DECODE=decode, PER_BLOCK=per_block,
        SPLIT_K=cfg.split_k, HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None, ATOMIC=cfg.split_k > 1,
        IEEE=upcast or x.dtype == torch.float32, UPCAST=upcast, UNPACK=cfg.unpack,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if target is not out2:
        out2.copy_(target)


def quantize_rows(x: Tensor, block_m: int = 4, block_k: int = 512) -> tuple[Tensor, Tensor]:
    """Per-token dynamic int8 of x (M, K): codes (M, K) int8 and scales (M,) float32."""
    jit = _kernels(x)
    x2 = _as_rows(x)
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        jit.quantize_rows_kernel[(_cdiv(M, block_m),)](x2, q, s, M, K, x2.stride(0), BLOCK_M=block_m,
                                                       BLOCK_K=block_k, num_warps=4)
    return q, s


def launch_w8a8(out: Tensor, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
                config: BlockConfig | None = None, fused_quant: bool | None = None) -> None:
    """out (..., N) ← q(x) @ weight (N, K) int8ᵀ · scales (+ bias). ``fused_quant`` (default:
    M ≤ 64) quantises x inside the GEMM; otherwise `quantize_rows` runs first."""
    jit = _kernels(x)
    _check_operands(x, out, ("weight", "scale", "bias"), weight=weight, scale=scale, bias=bias)
    N, K = weight.shape
    x2 = _as_rows(x)
    M = x2.shape[0]
    out2 = out.view(M, N)
    if M == 0:
        return
    cfg = config or w8a8_config(M, N, K, _sm_count(x.device))
    fused = M <= 64 if fused_quant is None else fused_quant
    xs = None
    if cfg.backend == "int_mm":  # cuBLASLt int8 GEMM (M > 16, K and N multiples of 8), then the rescale
        q, xs = quantize_rows(x2)
        y = torch._int_mm(q, weight.T).to(torch.float32).mul_(xs[:, None]).mul_(scale)
        out2.copy_(y if bias is None else y + bias)
        return
    if not fused:
        x2, xs = quantize_rows(x2)
    target = _launch_out(out2, cfg.split_k)
    grid = (_cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n), cfg.split_k)
    jit.w8a8_matmul_kernel[grid](
        x2, xs, weight, scale, bias, target, M, N, K, x2.stride(0), target.stride(0),
        FUSED_QUANT=fused, SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, ATOMIC=cfg.split_k > 1,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if target is not out2:
        out2.copy_(target)


# -- custom ops -----------------------------------------------------------------------------------

def _check_4bit(x: Tensor, qweight: Tensor, scales: Tensor, group_size: int) -> None:
    K = x.shape[-1]
    torch._check(qweight.dim() == 2 and qweight.shape[0] == (K + 7) // 8,
                 lambda: f"qweight {tuple(qweight.shape)} does not hold {K} input features")
    torch._check(scales.dim() == 2 and scales.shape[1] == qweight.shape[1],
                 lambda: f"scales {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)}")
    torch._check(scales.shape[0] == 1 or scales.shape[0] == (K + group_size - 1) // group_size,
                 lambda: f"{scales.shape[0]} groups of {group_size} do not cover {K} input features")


@torch.library.custom_op("lowbit::w4a16_triton", mutates_args=())
def w4a16_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, perm: Tensor | None,
                 g_idx: Tensor | None, bias: Tensor | None, group_size: int) -> Tensor:
    """x (..., K) @ int4 weight (N, K)ᵀ (+ bias), dequantisation fused into the matmul."""
    _check_4bit(x, qweight, scales, group_size)
    out = x.new_empty((*x.shape[:-1], qweight.shape[1]))
    launch_int4(out, x, qweight, scales, zeros, None, perm, g_idx, bias, group_size)
    return out


@w4a16_triton.register_fake
def _(x, qweight, scales, zeros, perm, g_idx, bias, group_size):
    _check_4bit(x, qweight, scales, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@torch.library.custom_op("lowbit::nf4_triton", mutates_args=())
def nf4_triton(x: Tensor, qweight: Tensor, scales: Tensor, levels: Tensor, perm: Tensor | None,
               g_idx: Tensor | None, bias: Tensor | None, group_size: int) -> Tensor:
    """x (..., K) @ NF4 weight (N, K)ᵀ (+ bias), table lookup fused into the matmul."""
    _check_4bit(x, qweight, scales, group_size)
    out = x.new_empty((*x.shape[:-1], qweight.shape[1]))
    launch_int4(out, x, qweight, scales, None, levels, perm, g_idx, bias, group_size)
    return out


@nf4_triton.register_fake
def _(x, qweight, scales, levels, perm, g_idx, bias, group_size):
    _check_4bit(x, qweight, scales, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


@torch.library.custom_op("lowbit::w8a8_triton", mutates_args=())
def w8a8_triton(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """Per-token int8 q(x) (..., K) @ int8 weight (N, K)ᵀ, rescaled (+ bias)."""
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"weight {tuple(weight.shape)} does not take {x.shape[-1]} input features")
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    launch_w8a8(out, x, weight, scale, bias)
    return out


@w8a8_triton.register_fake
def _(x, weight, scale, bias):
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"weight {tuple(weight.shape)} does not take {x.shape[-1]} input features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# -- calls with a prepared dict ---------------------------------------------------------------------

def w4a16_linear(x: Tensor, prepared: Prepared, group_size: int, bias: Tensor | None = None) -> Tensor:
    """`lowbit::w4a16_triton` on a `prepare_w4a16` dict; ``group_size`` is ``weight.group_size``."""
    p = prepared
    return torch.ops.lowbit.w4a16_triton(x, p["qweight"], p["scales"], p.get("zeros"), p.get("perm"),
                                         p.get("g_idx"), bias, group_size)


def nf4_linear(x: Tensor, prepared: Prepared, group_size: int, bias: Tensor | None = None) -> Tensor:
    """`lowbit::nf4_triton` on a `prepare_nf4` dict; ``group_size`` is ``weight.group_size``."""
    p = prepared
    return torch.ops.lowbit.nf4_triton(x, p["qweight"], p["scales"], p["levels"], p.get("perm"), p.get("g_idx"),
                                       bias, group_size)


def w8a8_linear(x: Tensor, prepared: Prepared, bias: Tensor | None = None) -> Tensor:
    """`lowbit::w8a8_triton` on a `prepare_w8a8` dict."""
    return torch.ops.lowbit.w8a8_triton(x, prepared["weight"], prepared["scale"], bias)
