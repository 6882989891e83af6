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
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels import cuda as cuda_kernels
from lowbit.kernels.triton.layout import Prepared

_DECODE = {"int_sym": 0, "int_asym": 1, "lut": 2}


@dataclass(frozen=True)
class BlockConfig:
    """One launch's tiling. 4-bit weights, by ``backend``:

    - "gemv": `w4_gemv_kernel`, CUDA cores, one token per program: block_n rows × block_k
      columns per step (block_m unused); ``prefetch`` keeps two K blocks of words in flight;
      ``xplanes`` lays x out per nibble plane first (`x_planes_kernel`, one more launch).
    - "mma": `w4_mma_kernel`, tensor cores, the weight as the left operand: block_n weight rows ×
      block_m tokens per tile; ``planes`` picks its decoding (see the kernel), ``magic`` the
      or-into-the-mantissa conversion of codes (16-bit inputs only).
    - "gemm": `w4_gemm_kernel`, tensor cores, x as the left operand: block_m tokens × block_n
      weight rows per tile, the weight tile decoded in the K loop; ``unpack`` picks how its words
      are unpacked (see the kernel).
    - "triton": `int4_matmul_kernel`, the general fused kernel (act-order groups in any order,
      NF4 beyond one token); ``unpack`` picks how its words are unpacked.
    - "cuda": the CUDA C++ tensor-core kernel of `lowbit.kernels.cuda` (int4, 16-bit x, ≤ 32 tokens):
      block_n weight rows (a multiple of 16) per warp, num_warps warps per block, K split
      split_k ways, num_stages blocks of words in flight; calls it cannot take run the launcher's
      own choice.
    - "dequant": `dequant_nk_kernel` writes the float weight, then one cuBLAS GEMM; with
      ``chunk_n`` the weight is written ``chunk_n`` rows at a time into two reused buffers and
      each chunk's GEMM runs on a second CUDA stream, overlapping the next chunk's dequantisation.

    W8A8: "triton" is `w8a8_matmul_kernel`; "int_mm" quantises x, then ``torch._int_mm``.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    backend: str = "triton"
    unpack: int = 0
    planes: int = 0
    magic: bool = True
    prefetch: bool = True
    xplanes: bool = False
    chunk_n: int = 0


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


def _splits(tiles: int, k_blocks: int, programs: int, min_blocks: int = 4) -> int:
    """Splits of K that bring ``tiles`` output tiles to about ``programs`` programs, each split
    keeping ≥ ``min_blocks`` K blocks."""
    return max(1, min(_cdiv(programs, tiles), k_blocks // min_blocks))


def int4_config(m: int, n: int, k: int, group_size: int, n_groups: int, sms: int, lut: bool = False,
                gidx: bool = False, cuda: bool = False) -> BlockConfig:
    """Block config for the 4-bit kernels on a device with ``sms`` SMs (``lut``: NF4; ``gidx``:
    act-order groups that are not runs of ``group_size`` columns after the permutation; ``cuda``: the
    CUDA C++ kernel's config where it can take the call, `lowbit.kernels.cuda.default_args`).

    The fastest configs of ``bench/gpu_kernels.py``'s sweep on an H100 (2026-11-27, bench/results/
    gpu_kernels_notes.md): one token takes the CUDA-core GEMV kernel (128 rows × 128 columns per
    step, K split for about four programs per SM); int4 weights whose groups a 128-column block
    fits in take the tensor-core kernel with plain codes (no MAGIC: the x sums it needs cost
    more than the conversions it saves) up to `MMA_MAX_TOKENS` tokens — 16 × 64 tiles, 3 stages,
    K split for about four programs per SM to 16 tokens; 64 × 64 tiles, 4 stages, about one
    program per SM to 128 — and dequantise + cuBLAS above (as fast as the best fused tile at 256
    tokens on the 70B shapes, faster at 2048). NF4 and uneven act-order groups take the general fused
    kernel up to 16 tokens and dequantise + cuBLAS above. Measured and not chosen (run 12, same notes):
    the x-left fused GEMM ("gemm": 0.36–0.50× bf16 at 2048 tokens, slower than "mma" at 16), the scaled
    decode in the tensor-core kernel (planes=2: slower at 16 tokens; 0.50× bf16 at 2048 tokens in
    run 13). The int weights' dequantise + cuBLAS path works `DEQUANT_CHUNK` rows at a time (chunk_n):
    on the 70B shapes at 2048 tokens it was 0.87× / 0.92× bf16 against 0.85× / 0.89× whole in run 13
    and faster on 28672 × 8192 in run 12 (within the spread on 8192 × 28672), and it bounds the
    transient weight to two chunks (128 MiB instead of 448 MiB for 8192 × 28672)."""
    group = group_size if n_groups > 1 else k
    if cuda and not (lut or gidx) and m <= cuda_kernels.MAX_TOKENS and cuda_kernels.shape_reason(k, n, group) is None:
        a = cuda_kernels.default_args(m, n, k, sms)
        return BlockConfig(8 * cuda_kernels.token_tiles(m), 16 * a["rows"], cuda_kernels.BLOCK_K, a["split_k"],
                           a["warps"], a["stages"], backend="cuda")
    if m == 1 and not gidx and group % 8 == 0:
        words = 16
        while group % (8 * words) and (8 * words) % group:
            words //= 2
        split = _splits(_cdiv(n, 128), _cdiv(_cdiv(k, 8), words), 4 * sms)
        return BlockConfig(1, 128, 8 * words, split, 4, 1, backend="gemv")
    if lut or gidx:
        if m > 16:
            return BlockConfig(16, 64, 128, 1, 4, 1, backend="dequant")
        bk = 128
        while n_groups > 1 and bk > 32 and group_size % bk:
            bk //= 2
        split = _splits(_cdiv(n, 64), _cdiv(k, bk), 2 * sms)
        return BlockConfig(16, 64, bk, split, 4, 4)
    if m > MMA_MAX_TOKENS:
        return BlockConfig(16, 64, 128, 1, 4, 1, backend="dequant", chunk_n=DEQUANT_CHUNK)
    bk = 128
    while bk > 16 and group % bk:
        bk //= 2
    if m <= 16:
        bt, stages, programs = 16, 3, 4 * sms
    else:
        bt, stages, programs = (32 if m <= 32 else 64), 4, sms  # two 64-token tiles to 128 tokens
    split = _splits(_cdiv(n, 64) * _cdiv(m, bt), _cdiv(k, bk), programs)
    return BlockConfig(bt, 64, bk, split, 4, stages, backend="mma", magic=False)


MMA_MAX_TOKENS = 128  # above this, 4-bit int weights are dequantised for cuBLAS GEMMs
DEQUANT_CHUNK = 4096  # rows of W dequantised per GEMM on that path (one GEMM when N is no larger)


def w8a8_config(m: int, n: int, k: int, sms: int, itemsize: int = 2) -> BlockConfig:
    """Block config for the W8A8 kernel on a device with ``sms`` SMs, for x of ``itemsize`` bytes:
    the fastest of the sweep on the LLaMA shapes (H100, 2026-11-27) — BLOCK_K 256 with 8 warps
    up to 64 tokens (128 for float32 x, whose quantised-in-place tiles would not fit in shared
    memory), 64 × 128 × 128 tiles with 4 warps to 512, and above 256 × 128 × 128 tiles with
    8 warps and 4 stages where they make at least four waves, else 128 × 128 × 128 with 3."""
    if m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bn, bk, warps, stages = 128, (256 if itemsize <= 2 else 128), 8, 3
    elif m <= 512:
        bm, bn, bk, warps, stages = 64, 128, 128, 4, 4
    elif _cdiv(m, 256) * _cdiv(n, 128) >= 4 * sms:
        bm, bn, bk, warps, stages = 256, 128, 128, 8, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 128, 8, 3
    split = _splits(_cdiv(m, bm) * _cdiv(n, bn), _cdiv(k, bk), 2 * sms if m <= 16 else sms)
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


def _int4_backend(cfg: BlockConfig, group: int, lut: bool, gidx: bool) -> str:
    """The backend that runs: ``cfg.backend`` where it can take this call, else the general kernel."""
    if cfg.backend == "gemv" and not gidx and group % 8 == 0:
        return "gemv"
    if cfg.backend in ("mma", "gemm") and not (lut or gidx) and group % cfg.block_k == 0 and cfg.block_k % 8 == 0:
        return cfg.backend
    if cfg.backend == "dequant":
        return "dequant"
    return "triton"


def launch_int4(out: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
                levels: Tensor | None, perm: Tensor | None, g_idx: Tensor | None, bias: Tensor | None,
                group_size: int, config: BlockConfig | None = None) -> None:
    """out (..., N) ← x (..., K) @ decode(qweight)ᵀ (+ bias); see `prepare_w4a16` / `prepare_nf4`.

    ``qweight`` is (N, ceil(K/8)) int32 with unit stride along its words."""
    if config is None and cuda_kernels.enabled():
        m, n_groups = x.numel() // max(x.shape[-1], 1), scales.shape[0]
        config = int4_config(m, qweight.shape[0], x.shape[-1], group_size, n_groups, _sm_count(x.device),
                             lut=levels is not None, gidx=g_idx is not None, cuda=True)
    if config is not None and config.backend == "cuda":
        if _launch_cuda(out, x, qweight, scales, zeros, levels, perm, g_idx, bias, group_size, config):
            return
        config = None  # a call the CUDA kernel cannot take: the launcher's own choice
    jit = _kernels(x)
    _check_operands(x, out, ("levels", "perm", "g_idx", "bias"), qweight=qweight, scales=scales, zeros=zeros,
                    levels=levels, perm=perm, g_idx=g_idx, bias=bias)
    if qweight.stride(1) != 1:
        raise LowbitError("qweight must have unit stride along its words (N-major, as prepare_* leaves it).")
    K, N = x.shape[-1], qweight.shape[0]
    KW = qweight.shape[1]
    n_groups = scales.shape[0]
    x2 = _as_rows(x)
    if perm is not None:
        x2 = x2.index_select(1, perm)
    M = x2.shape[0]
    out2 = out.view(M, N)
    if M == 0:
        return
    lut = levels is not None
    group = group_size if n_groups > 1 else K
    cfg = config or int4_config(M, N, K, group_size, n_groups, _sm_count(x.device), lut=lut, gidx=g_idx is not None)
    backend = _int4_backend(cfg, group, lut, g_idx is not None)
    decode = _DECODE["lut" if lut else "int_asym" if zeros is not None else "int_sym"]
    params = (*_strides(scales), *_strides(zeros))
    words = cfg.block_k // 8
    even_k = KW % words == 0
    if backend == "dequant":

        def dequantise(w: Tensor, rows: slice) -> None:  # W[rows] as floats into w (rows, K)
            n = w.shape[0]
            zs = None if zeros is None else zeros[:, rows]
            jit.dequant_nk_kernel[(_cdiv(n, cfg.block_n), _cdiv(K, cfg.block_k))](
                qweight[rows], scales[:, rows], zs, g_idx, levels, w, n, K, qweight.stride(0), *params,
                GROUP=group, DECODE=decode, HAS_GIDX=g_idx is not None, EVEN_K=even_k, BLOCK_N=cfg.block_n,
                WORDS=words, num_warps=cfg.num_warps)

        _dequant_gemm(x2, out2, N, K, cfg.chunk_n, dequantise)
        if bias is not None:
            out2.add_(bias)
        return
    target = _launch_out(out2, cfg.split_k)
    common = dict(HAS_BIAS=bias is not None, ATOMIC=cfg.split_k > 1, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    if backend == "gemv":
        xs, x_stride = x2, x2.stride(0)
        if cfg.xplanes:
            xs = torch.empty((M, 9, KW), dtype=torch.float32, device=x.device)
            jit.x_planes_kernel[(_cdiv(KW, 256), M)](x2, xs, K, x2.stride(0), SCALED=not lut, BLOCK_W=256)
            x_stride = 9 * KW
        grid = (_cdiv(N, cfg.block_n), cfg.split_k, M)
        jit.w4_gemv_kernel[grid](
            xs, qweight, scales, zeros, levels, bias, target, N, K, x_stride, target.stride(0), qweight.stride(0),
            *params, cfg.split_k, GROUP=group, DECODE=decode, PER_BLOCK=group % cfg.block_k == 0,
            PREFETCH=cfg.prefetch, EVEN_K=even_k, XPLANES=cfg.xplanes, BLOCK_N=cfg.block_n, WORDS=words, **common)
    elif backend == "gemm":
        upcast = jit.INTERPRETED and x.dtype == torch.bfloat16
        grid = (_cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n), cfg.split_k)
        jit.w4_gemm_kernel[grid](
            x2, qweight, scales, zeros, bias, target, M, N, K, x2.stride(0), target.stride(0), qweight.stride(0),
            *params, cfg.split_k, GROUP=group, DECODE=decode, UNPACK=cfg.unpack, UPCAST=upcast, EVEN_K=even_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, **common)
    elif backend == "mma":
        upcast = jit.INTERPRETED and x.dtype == torch.bfloat16
        grid = (_cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n), cfg.split_k)
        jit.w4_mma_kernel[grid](
            x2, qweight, scales, zeros, bias, target, M, N, K, x2.stride(0), target.stride(0), qweight.stride(0),
            *params, cfg.split_k, GROUP=group, DECODE=decode, PLANES=cfg.planes,
            MAGIC=cfg.magic and x.dtype != torch.float32, UPCAST=upcast, EVEN_K=even_k, BLOCK_N=cfg.block_n,
            BLOCK_T=cfg.block_m, WORDS=words, GROUP_N=cfg.group_m, **common)
    else:
        per_block = g_idx is None and (n_groups == 1 or group_size % cfg.block_k == 0)
        upcast = jit.INTERPRETED and x.dtype == torch.bfloat16
        grid = (_cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n), cfg.split_k)
        jit.int4_matmul_kernel[grid](
            x2, qweight, scales, zeros, g_idx, levels, bias, target,
            M, N, K, x2.stride(0), target.stride(0), 1, qweight.stride(0), *params,
            GROUP=group, DECODE=decode, PER_BLOCK=per_block,
            SPLIT_K=cfg.split_k, HAS_GIDX=g_idx is not None, IEEE=upcast or x.dtype == torch.float32, UPCAST=upcast,
            UNPACK=cfg.unpack, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            **common)
    if target is not out2:
        out2.copy_(target)


def _launch_cuda(out: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
                 levels: Tensor | None, perm: Tensor | None, g_idx: Tensor | None, bias: Tensor | None,
                 group_size: int, cfg: BlockConfig) -> bool:
    """Run the call on `lowbit.kernels.cuda`'s kernel if it can take it (True), else leave it (False)."""
    K = x.shape[-1]
    group = group_size if scales.shape[0] > 1 else K
    if cfg.block_n % 16 or cuda_kernels.unsupported(x, qweight, scales, zeros, group, levels is not None,
                                                    perm is not None or g_idx is not None) is not None:
        return False
    _check_operands(x, out)
    x2 = _as_rows(x)
    if x2.shape[0]:
        cuda_kernels.launch_mma(out.view(x2.shape[0], -1), x2, qweight, scales, zeros,
                                None if bias is None else bias.to(x.dtype).contiguous(), group,
                                rows=cfg.block_n // 16, warps=cfg.num_warps, split_k=cfg.split_k,
                                stages=cfg.num_stages)
    return True


@functools.lru_cache(maxsize=8)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _dequant_gemm(x2: Tensor, out2: Tensor, N: int, K: int, chunk_n: int,
                  dequantise: Callable[[Tensor, slice], None]) -> None:
    """out2 (M, N) ← x2 @ Wᵀ, W written out by ``dequantise(w, rows)``: whole, or ``chunk_n`` rows at a
    time into two reused buffers, each chunk's cuBLAS GEMM on a side stream so that the next chunk's
    dequantisation (main stream) overlaps it; events order each buffer's reuse after its GEMM and the
    main stream waits for the side stream at the end. Also bounds the transient weight to 2 chunks."""
    if chunk_n <= 0 or chunk_n >= N:
        w = torch.empty((N, K), dtype=x2.dtype, device=x2.device)
        dequantise(w, slice(0, N))
        torch.mm(x2, w.T, out=out2)
        return
    cuda = x2.device.type == "cuda"
    bufs = [torch.empty((chunk_n, K), dtype=x2.dtype, device=x2.device) for _ in range(2)]
    freed: list[torch.cuda.Event | None] = [None, None]  # the GEMM that last read each buffer
    if cuda:
        main, side = torch.cuda.current_stream(x2.device), _side_stream(x2.device)
        side.wait_stream(main)  # x2 and out2 are ready
    for i, n0 in enumerate(range(0, N, chunk_n)):
        rows = slice(n0, min(n0 + chunk_n, N))
        w = bufs[i % 2][: rows.stop - n0]
        if freed[i % 2] is not None:
            main.wait_event(freed[i % 2])
        dequantise(w, rows)
        if not cuda:
            torch.mm(x2, w.T, out=out2[:, rows])
            continue
        side.wait_event(main.record_event())
        with torch.cuda.stream(side):
            torch.mm(x2, w.T, out=out2[:, rows])
            freed[i % 2] = side.record_event()
    if cuda:
        main.wait_stream(side)


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
    cfg = config or w8a8_config(M, N, K, _sm_count(x.device), x.element_size())
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
    torch._check(qweight.dim() == 2 and qweight.shape[1] == (K + 7) // 8,
                 lambda: f"qweight {tuple(qweight.shape)} does not hold {K} input features")
    torch._check(scales.dim() == 2 and scales.shape[1] == qweight.shape[0],
                 lambda: f"scales {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)}")
    torch._check(scales.shape[0] == 1 or scales.shape[0] == (K + group_size - 1) // group_size,
                 lambda: f"{scales.shape[0]} groups of {group_size} do not cover {K} input features")


@torch.library.custom_op("lowbit::w4a16_triton", mutates_args=())
def w4a16_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, perm: Tensor | None,
                 g_idx: Tensor | None, bias: Tensor | None, group_size: int) -> Tensor:
    """x (..., K) @ int4 weight (N, K)ᵀ (+ bias), dequantisation fused into the matmul."""
    _check_4bit(x, qweight, scales, group_size)
    out = x.new_empty((*x.shape[:-1], qweight.shape[0]))
    launch_int4(out, x, qweight, scales, zeros, None, perm, g_idx, bias, group_size)
    return out


@w4a16_triton.register_fake
def _(x, qweight, scales, zeros, perm, g_idx, bias, group_size):
    _check_4bit(x, qweight, scales, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("lowbit::nf4_triton", mutates_args=())
def nf4_triton(x: Tensor, qweight: Tensor, scales: Tensor, levels: Tensor, perm: Tensor | None,
               g_idx: Tensor | None, bias: Tensor | None, group_size: int) -> Tensor:
    """x (..., K) @ NF4 weight (N, K)ᵀ (+ bias), table lookup fused into the matmul."""
    _check_4bit(x, qweight, scales, group_size)
    out = x.new_empty((*x.shape[:-1], qweight.shape[0]))
    launch_int4(out, x, qweight, scales, None, levels, perm, g_idx, bias, group_size)
    return out


@nf4_triton.register_fake
def _(x, qweight, scales, levels, perm, g_idx, bias, group_size):
    _check_4bit(x, qweight, scales, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


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
