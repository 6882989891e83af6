"""CUDA C++ kernels, compiled at first use for the device at hand and launched through the driver API.

``csrc/w4a16_mma.cu`` (the tensor-core kernel for int3, int4 and int8 weights at few tokens; its header
says how it works) is compiled by NVRTC — the runtime compiler a CUDA build of torch ships with — or, where
NVRTC cannot be loaded, by ``nvcc`` if it is on the PATH; the binary is loaded with
``cuModuleLoadData`` and launched with ``cuLaunchKernel`` on torch's current stream (ctypes,
no compiled extension, nothing to build at install time). One binary per `Variant` and
compute capability, cached for the process.

int4 reaches it through `lowbit.kernels.triton.ops.launch_int4` with a `BlockConfig` whose backend
is "cuda" (`unsupported` says when a call cannot take it; the launcher then runs its own choice);
int3 and int8 weight-only layers through the dispatcher (`lowbit.kernels.gpu` registers ``cuda-int-a16``,
the ``lowbit::int_a16_cuda`` custom op). Neither is picked by default until the kernel has been checked and
timed on a GPU by ``bench/gpu_run_cuda.sh``: `enabled` (LOWBIT_CUDA_KERNELS=1) opts in (see
bench/results/gpu_kernels_notes.md).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels.ops import reference_op
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

SOURCE = Path(__file__).parent / "csrc" / "w4a16_mma.cu"
ENTRY = "lowbit_w4a16_mma"
DEQUANT_ENTRY = "lowbit_dequant"
MAX_TOKENS = 32  # four tiles of 8 tokens; above, the Triton kernels or dequantise + cuBLAS
BLOCK_K = 128  # columns per step of a warp: K and the group size must be multiples of it
DEQUANT_THREADS = 256
DEQUANT_CHUNK = 4096  # rows of W dequantised per GEMM above MAX_TOKENS (as lowbit.kernels.triton.ops.DEQUANT_CHUNK)
_DT = {torch.bfloat16: 0, torch.float16: 1}
_SDT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation: x's dtype code (0 bf16, 1 fp16), the scales' (0 fp32, 1 bf16,
    2 fp16), ``rows`` tiles of 16 weight rows per warp, ``token_tiles`` tiles of 8 tokens,
    asymmetric zero points, a bias, ``warps`` per block (the launch bound), ``stages`` 128-column
    blocks of words loaded ahead of the one being decoded, and the codes' ``bits`` (3, 4 or 8)."""

    dt: int
    sdt: int
    rows: int
    token_tiles: int
    zero_points: bool
    bias: bool
    warps: int = 4
    stages: int = 1
    bits: int = 4
    ENTRY: ClassVar[str] = ENTRY
    ARGS: ClassVar[tuple[int, int]] = (8, 5)  # pointer and int arguments

    def entry_point(self, name: str = ENTRY) -> str:
        """An ``extern "C"`` kernel ``name`` running this specialisation of ``w4a16_mma_body``."""
        flag = lambda b: "true" if b else "false"  # noqa: E731
        args = ("const u32* x, const u32* qw, const void* scales, const unsigned char* zeros, const u16* bias, "
                "u16* y, float* ws, u32* counters, int M, int N, int K, int group, int kb_split")
        params = (f"{self.dt}, {self.sdt}, {self.rows}, {self.token_tiles}, {flag(self.zero_points)}, "
                  f"{flag(self.bias)}, {self.stages}, {self.bits}")
        return (f'\nextern "C" __global__ void __launch_bounds__({32 * self.warps}) {name}({args}) {{\n'
                f"  w4a16_mma_body<{params}>(x, qw, scales, zeros, bias, y, ws, counters, M, N, K, group, kb_split);\n"
                "}\n")

    def source(self) -> str:
        """The kernel source with this specialisation's entry point."""
        return SOURCE.read_text() + self.entry_point()


@dataclass(frozen=True)
class DequantVariant:
    """One specialisation of the dequantise kernel (``dequant_body``): x's dtype code, the scales', zero
    points, the codes' bits."""

    dt: int
    sdt: int
    zero_points: bool
    bits: int
    ENTRY: ClassVar[str] = DEQUANT_ENTRY
    ARGS: ClassVar[tuple[int, int]] = (4, 5)

    def entry_point(self, name: str = DEQUANT_ENTRY) -> str:
        args = ("const u32* qw, const void* scales, const unsigned char* zeros, u16* w, int rows, int K, int group, "
                "int n_stride, int row0")
        params = f"{self.dt}, {self.sdt}, {'true' if self.zero_points else 'false'}, {self.bits}"
        return (f'\nextern "C" __global__ void __launch_bounds__({DEQUANT_THREADS}) {name}({args}) {{\n'
                f"  dequant_body<{params}>(qw, scales, zeros, w, rows, K, group, n_stride, row0);\n}}\n")

    def source(self) -> str:
        return SOURCE.read_text() + self.entry_point()


def max_rows(token_tiles: int, rows: int = 4) -> int:
    """``rows`` capped so that a thread's state fits its registers without spilling (see the compile
    test): 4 row tiles for one token tile, 2 for two, 1 for four."""
    return max(1, min(rows, 4 // token_tiles))


def max_stages(rows: int, token_tiles: int, stages: int = 3) -> int:
    """``stages`` capped likewise (sm_90a, ptxas 13.0: one row tile × one token tile holds 3 blocks of words
    ahead in 128-147 registers, two tiles 2 in 157-181, four tiles 1 in 165-201)."""
    tiles = rows * token_tiles
    return max(1, min(stages, 3 if tiles == 1 else 2 if tiles == 2 else 1))


def token_tiles(m: int) -> int:
    """Tiles of 8 tokens a launch for m tokens (≤ `MAX_TOKENS`) computes: 1, 2 or 4."""
    return 1 if m <= 8 else 2 if m <= 16 else 4


def default_args(m: int, n: int, k: int, sms: int) -> dict[str, int]:
    """The launch arguments `launch_mma` takes by default for m tokens through an (n, k) weight on a device
    with ``sms`` SMs: 2 row tiles per warp for one token tile (1 above), 2 stages of words in flight up to two
    token tiles, blocks of 4 warps, K split for about four blocks per SM (each split ≥ 4 blocks of columns).
    A guess until bench/gpu_run_cuda.sh's sweep has timed the alternatives."""
    tiles = token_tiles(m)
    rows, warps = (2 if tiles == 1 else 1), 4
    blocks = -(-n // (16 * rows * warps))
    split = max(1, min(-(-4 * sms // blocks), k // BLOCK_K // 4))
    return {"rows": rows, "warps": warps, "split_k": split, "stages": 2 if tiles <= 2 else 1}


def enabled() -> bool:
    """Whether the dispatcher and the 4-bit launcher pick these kernels (LOWBIT_CUDA_KERNELS=1). Off by
    default until bench/gpu_run_cuda.sh has checked and timed them on a GPU."""
    return os.environ.get("LOWBIT_CUDA_KERNELS") == "1"


def shape_reason(K: int, N: int, group: int) -> str | None:
    """None when the kernels take an (N, K) weight in groups of ``group``, else why not."""
    if K % BLOCK_K or N % 16 or group % BLOCK_K:
        return (f"needs in_features and the group size in multiples of {BLOCK_K} and out_features in multiples "
                f"of 16, got {K}, {group} and {N}")
    return None


def _device_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "runs on CUDA devices only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs bfloat16 / float16 tensor cores (compute capability 8.0 or newer)"
    return None


def unsupported(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group: int,
                lut: bool = False, act_order: bool = False, bits: int = 4,
                max_tokens: int | None = MAX_TOKENS) -> str | None:
    """None when `launch_mma` (or with ``max_tokens=None``, `int_a16_cuda` at any M) can take this call
    (``bits``-bit codes as `prepare_w4a16` / `lowbit.kernels.triton.layout.prepare_int` lay them
    out), else why not."""
    M, K = x.reshape(-1, x.shape[-1]).shape
    N = qweight.shape[0]
    reason = _device_reason(x.device)
    if reason is not None:
        return reason
    if x.dtype not in _DT:
        return f"takes bfloat16 or float16 inputs, got {x.dtype}"
    if lut or act_order:
        return "reads integer codes in stored column order (no NF4, no act-order permutation)"
    if max_tokens is not None and M > max_tokens:
        return f"takes at most {max_tokens} tokens, got {M}"
    reason = shape_reason(K, N, group)
    if reason is not None:
        return reason
    if scales.dtype not in _SDT:
        return f"takes float32, bfloat16 or float16 scales, got {scales.dtype}"
    dense = [t for t in (qweight, scales, zeros) if t is not None]
    if not all(t.is_contiguous() for t in dense) or qweight.shape[1] != K * bits // 32:
        return "needs the row-major qweight, scales and zero points that prepare_w4a16 / prepare_int make"
    if qweight.data_ptr() % 16:
        return "reads qweight in 16-byte vectors: its first word must be 16-byte aligned"
    return None


# -- loading the compiler and the driver -------------------------------------------------------

def _load_library(names: list[str], patterns: list[str]) -> ctypes.CDLL | None:
    """The first of ``names`` that loads (already loaded by torch, or on the loader's path), else the
    first match of ``patterns`` under site-packages (the nvidia-* wheels a CUDA build of torch uses)."""
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    roots = {os.path.dirname(os.path.dirname(torch.__file__))} | {p for p in sys.path if p.endswith("site-packages")}
    for root in sorted(roots):
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                try:
                    return ctypes.CDLL(path)
                except OSError:
                    continue
    return None


@functools.cache
def _nvrtc() -> ctypes.CDLL | None:
    major = (torch.version.cuda or "13").split(".")[0]
    return _load_library([f"libnvrtc.so.{major}", "libnvrtc.so"],
                         ["nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*"])


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = _load_library(["libcuda.so.1", "libcuda.so"], [])
    if lib is None:
        raise LowbitError("the CUDA kernels need the NVIDIA driver's libcuda.so, which could not be loaded.")
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        raise LowbitError(f"{what} failed: CUDA error {result} ({(text.value or b'unknown').decode()}).")


def _make_current(device_index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread, unless it is:
    the driver API, unlike torch's runtime calls, does not bind it by itself."""
    lib, dev = _driver(), ctypes.c_int()
    if lib.cuCtxGetDevice(ctypes.byref(dev)) == 0 and dev.value == device_index:
        return
    ctx = ctypes.c_void_p()
    _check(lib.cuDeviceGet(ctypes.byref(dev), device_index), "finding the CUDA device")
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retaining the device's primary context")
    _check(lib.cuCtxSetCurrent(ctx), "making the device's context current")


def compile_nvrtc(source: str, arch: str, verbose: bool = False) -> tuple[bytes, str]:
    """CUBIN of ``source`` for ``arch`` (e.g. "sm_90") by NVRTC, and its log (ptxas's register and spill report
    with ``verbose``)."""
    lib = _nvrtc()
    if lib is None:
        raise LowbitError("NVRTC (libnvrtc.so) could not be loaded.")
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"w4a16_mma.cu", 0, None, None):
        raise LowbitError("NVRTC could not create a program.")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"] + ([b"--ptxas-options=-v"] if verbose else [])
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        messages = log.value.decode(errors="replace")
        if status:
            raise LowbitError(f"NVRTC could not compile {SOURCE.name} for {arch}:\n{messages}")
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)):
            raise LowbitError(f"NVRTC made no CUBIN for {arch} (an arch it only knows as PTX?).")
        image = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, image)
        return image.raw, messages
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_nvcc(source: str, arch: str, verbose: bool = False) -> tuple[bytes, str]:
    """CUBIN of ``source`` for ``arch`` by nvcc (``-O3``), and nvcc's messages (ptxas's register and
    spill report with ``verbose``)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise LowbitError("nvcc is not on the PATH.")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "w4a16_mma.cu", Path(tmp) / "w4a16_mma.cubin"
        src.write_text(source)
        cmd = [nvcc, "-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-o", str(out), str(src)]
        if verbose:
            cmd[1:1] = ["-Xptxas", "-v"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise LowbitError(f"nvcc could not compile {SOURCE.name} for {arch}:\n{run.stderr.strip()}")
        return out.read_bytes(), run.stderr


def ptxas_reports(messages: str) -> dict[str, dict[str, int]]:
    """Registers and spill bytes of each entry point in ptxas's ``-v`` report."""
    out = {}
    for block in re.split(r"Compiling entry function ", messages)[1:]:
        name = re.match(r"'(\w+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        if name is None or regs is None or spills is None:
            raise LowbitError(f"no register report in ptxas's output:\n{messages}")
        out[name.group(1)] = {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
                              "spill_loads": int(spills.group(2))}
    return out


class _Function:
    """One loaded entry point, taking ``pointers`` pointer arguments then ``ints`` int ones. Its launch
    reuses one argument block per thread (the values change per call, the block's layout never does):
    launches cost a few microseconds of Python, which decoding at one token per step would otherwise
    wait for."""

    def __init__(self, image: bytes, entry: str, pointers: int, ints: int):
        lib = _driver()
        self.entry, self.pointers, self.ints = entry, pointers, ints
        self.module, self.function = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cuModuleLoadData(ctypes.byref(self.module), image), f"loading the kernel {entry}")
        _check(lib.cuModuleGetFunction(ctypes.byref(self.function), self.module, entry.encode()),
               f"finding the kernel {entry}")
        self._local = threading.local()

    def _arguments(self):
        args = getattr(self._local, "args", None)
        if args is None:
            values = [ctypes.c_void_p() for _ in range(self.pointers)] + [ctypes.c_int() for _ in range(self.ints)]
            params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
            args = self._local.args = (values, params)
        return args

    def launch(self, grid: tuple[int, int], threads: int, stream: int, pointers: list[int], ints: list[int]) -> None:
        assert len(pointers) == self.pointers and len(ints) == self.ints, "wrong number of kernel arguments"
        values, params = self._arguments()
        for slot, value in zip(values, [*pointers, *ints]):
            slot.value = value
        _check(_driver().cuLaunchKernel(self.function, grid[0], grid[1], 1, threads, 1, 1, 0,
                                        ctypes.c_void_p(stream), params, None), f"launching the kernel {self.entry}")


@functools.cache
def _function(variant: Variant | DequantVariant, device_index: int) -> _Function:
    major, minor = torch.cuda.get_device_capability(device_index)
    arch = f"sm_{major}{minor}"
    source = variant.source()
    try:
        image = compile_nvrtc(source, arch)[0]
    except LowbitError as nvrtc_error:
        try:
            image = compile_nvcc(source, arch)[0]
        except LowbitError as nvcc_error:
            raise LowbitError(f"the CUDA kernel {variant.ENTRY} could not be compiled: {nvrtc_error} / {nvcc_error}") \
                from nvcc_error
    _make_current(device_index)
    return _Function(image, variant.ENTRY, *variant.ARGS)


@functools.cache
def _counters(device_index: int) -> Tensor:
    """Zeroed arrival counters of the split-K fix-up; every launch leaves them zero again."""
    return torch.zeros(1 << 16, dtype=torch.int32, device=torch.device("cuda", device_index))


@dataclass(frozen=True)
class Launch:
    """One call's specialisation and grid: ``blocks`` of ``threads`` × ``splits`` of K, ``kb_split``
    128-column blocks per split (none empty)."""

    variant: Variant
    blocks: int
    splits: int
    kb_split: int

    @property
    def threads(self) -> int:
        return 32 * self.variant.warps


def plan(M: int, N: int, K: int, dtype: torch.dtype, scale_dtype: torch.dtype, zero_points: bool, bias: bool,
         rows: int = 2, warps: int = 4, split_k: int = 1, stages: int = 1, bits: int = 4) -> Launch:
    """The `Launch` of `launch_mma` for these sizes (``rows`` and ``stages`` capped by `max_rows` and
    `max_stages`, ``split_k`` to what K holds)."""
    tiles = token_tiles(M)
    words = -(-tiles * bits // 4)  # register load in 4-bit token tiles: 8-bit words take twice as many
    rows = max_rows(words, rows)
    variant = Variant(_DT[dtype], _SDT[scale_dtype], rows, tiles, zero_points, bias, warps,
                      max_stages(rows, words, stages), bits)
    k_blocks = K // BLOCK_K
    kb_split = -(-k_blocks // max(1, min(split_k, k_blocks)))
    return Launch(variant, -(-N // (16 * variant.rows * warps)), -(-k_blocks // kb_split), kb_split)


def launch_mma(out2: Tensor, x2: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None,
               bias: Tensor | None, group: int, rows: int = 2, warps: int = 4, split_k: int = 1,
               stages: int = 1, bits: int = 4) -> None:
    """out2 (M, N) ← x2 (M, K) @ W (N, K)ᵀ (+ bias), W's ``bits``-bit codes (3, 4 or 8) as `prepare_w4a16`
    / `prepare_int` lay them out: ``rows`` tiles of 16 weight rows per warp, ``warps`` per block, K split
    ``split_k`` ways, ``stages`` blocks of words in flight. The caller has checked `unsupported`."""
    M, K = x2.shape
    N = qweight.shape[0]
    x2 = x2.contiguous()
    if x2.data_ptr() % 16:  # the kernel reads x in 16-byte vectors
        x2 = x2.clone()
    device = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    run = plan(M, N, K, x2.dtype, scales.dtype, zeros is not None, bias is not None, rows, warps, split_k, stages,
               bits)
    ws = counters = out2  # placeholders the kernel does not touch without splits
    if run.splits > 1:
        counters = _counters(device)
        if run.blocks > counters.numel():
            raise LowbitError(f"{N} output features need more than {counters.numel()} split-K counters.")
        ws = torch.empty((run.splits, M, N), dtype=torch.float32, device=x2.device)
    pointers = [t.data_ptr() for t in (x2, qweight, scales, zeros if zeros is not None else out2,
                                       bias if bias is not None else out2, out2, ws, counters)]
    function = _function(run.variant, device)
    _make_current(device)
    function.launch((run.blocks, run.splits), run.threads, torch.cuda.current_stream(device).cuda_stream, pointers,
                    [M, N, K, group, run.kb_split])


# -- int3 and int8 weight-only (W3A16, W8A16) through the dispatcher ------------------------------

DISPATCHED_BITS = (3, 8)  # int4 goes through the Triton launcher (backend "cuda")


def weight_only_unsupported(weight: QuantizedWeight, activations: QuantSpec | None,
                            device: torch.device) -> str | None:
    """None when the kernel can run this int3 / int8 weight on this device, else why not."""
    if not enabled():
        return "opt-in until checked on a GPU (LOWBIT_CUDA_KERNELS=1)"
    spec = weight.spec
    if activations is not None:
        return "weight-only kernel; activations must stay in float"
    if spec.format != "int" or spec.bits not in DISPATCHED_BITS or spec.granularity not in ("group", "channel"):
        return f"needs int3 or int8 weights with per-group or per-channel scales, got {spec.describe()}"
    if weight.g_idx is not None or weight.scale_scale is not None:
        return "reads plain per-group scales in column order (no act-order g_idx, no double-quantised scales)"
    rows, cols = weight.shape
    return _device_reason(device) or shape_reason(cols, rows, weight.group_size if weight.scale_shape[1] > 1
                                                  else cols)


def _group(x: Tensor, scales: Tensor, group_size: int) -> int:
    return group_size if scales.shape[0] > 1 else x.shape[-1]


@torch.library.custom_op("lowbit::int_a16_cuda", mutates_args=())
def int_a16_cuda(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                 group_size: int, bits: int) -> Tensor:
    """x (..., K) @ ``bits``-bit integer weight (N, K)ᵀ (+ bias): the tensor-core kernel (`launch_mma`) up to
    `MAX_TOKENS` tokens; above, the weight dequantised `DEQUANT_CHUNK` rows at a time (`dequantize`) for cuBLAS
    GEMMs, each overlapping the next chunk's dequantisation (as the int4 launcher does)."""
    x2 = x.reshape(-1, x.shape[-1])
    group = _group(x, scales, group_size)
    reason = unsupported(x2, qweight, scales, zeros, group, bits=bits, max_tokens=None)
    if reason is not None:
        raise LowbitError(f"the CUDA {bits}-bit kernel cannot take this call: {reason}.")
    M, N, K = x2.shape[0], qweight.shape[0], x.shape[-1]
    out = x.new_empty((M, N))
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    if 0 < M <= MAX_TOKENS:
        launch_mma(out, x2, qweight, scales, zeros, bias, group, bits=bits,
                   **default_args(M, N, K, _sms(x2.device.index or 0)))
    elif M:
        from lowbit.kernels.triton.ops import _dequant_gemm  # (that module imports this one)

        _dequant_gemm(x2.contiguous(), out, N, K, DEQUANT_CHUNK,
                      lambda w, rows: dequantize(w, qweight, scales, zeros, group, bits, rows.start))
        if bias is not None:
            out.add_(bias)
    return out.reshape(*x.shape[:-1], N)


@int_a16_cuda.register_fake
def _(x, qweight, scales, zeros, bias, group_size, bits):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@functools.cache
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dequantize(w: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group: int, bits: int,
               row0: int = 0) -> None:
    """w (rows, K) ← rows row0 .. row0 + rows of the weight in w's dtype, as the reference's ``dequantize``
    computes them ((q − z)·s in float32, rounded once): one pass, 64 bytes written per thread."""
    rows, K = w.shape
    device = w.device.index if w.device.index is not None else torch.cuda.current_device()
    variant = DequantVariant(_DT[w.dtype], _SDT[scales.dtype], zeros is not None, bits)
    function = _function(variant, device)
    _make_current(device)
    blocks = -(-rows * (K // 32) // DEQUANT_THREADS)
    function.launch((blocks, 1), DEQUANT_THREADS, torch.cuda.current_stream(device).cuda_stream,
                    [t.data_ptr() for t in (qweight, scales, zeros if zeros is not None else w, w)],
                    [rows, K, group, qweight.shape[0], row0])


def weight_only_linear(x: Tensor, prepared: dict[str, Tensor], weight: QuantizedWeight,
                       bias: Tensor | None = None) -> Tensor:
    """`lowbit::int_a16_cuda` (the dispatcher has checked the weight with `weight_only_unsupported`); x that is
    not 16-bit floats on the GPU goes to the reference."""
    if x.dtype not in _DT or x.device.type != "cuda":
        return reference_op(x, weight, bias, None)
    p = prepared
    return torch.ops.lowbit.int_a16_cuda(x, p["qweight"], p["scales"], p.get("zeros"), bias, weight.group_size,
                                         weight.spec.bits)
