"""The CUDA C++ W4A16 kernel (``kernels/csrc/w4a16_mma.cu``).

Without a GPU (as in CI) two things are checked: the kernel's arithmetic, transcribed step for
step into torch (`emulate`: each thread's loads by its lane, the nibble-pair decode with the
kernel's magic constants, x's pairs by PTX ``prmt``'s byte selection, the MMA fragment layouts
of PTX's m16n8k16, scales applied per 128-column block, split K), against the reference —
exactly in float64 and to the dtype's tolerance in 16 bits; and that every specialisation
the launcher can pick compiles without spilling registers, with nvcc for sm_80 and with NVRTC for sm_90 (as a GPU
machine compiles it at the first call).
With a GPU the compiled kernel itself is run against the reference on awkward shapes, into
NaN-poisoned outputs.
"""

import concurrent.futures
import ctypes
import functools
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.kernels import cuda
from lowbit.kernels.reference import quantized_linear
from lowbit.kernels.triton import prepare_w4a16
from lowbit.kernels.triton.layout import prepare_int
from lowbit.kernels.triton.ops import int4_config
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, quantize_weight
from reference_check import TOL, check as _check

MAGIC = {torch.bfloat16: 0x4300, torch.float16: 0x6400}  # 128.0 / 1024.0, as in the kernel's Half16


def _weight(n: int, k: int, group: int | None, symmetric: bool, scale_dtype: str, seed: int,
            bits: int = 4) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec("int", bits, "channel" if group is None else "group", group, symmetric=symmetric,
                     scale_dtype=scale_dtype)
    return quantize_weight(torch.randn(n, k, generator=gen) * 0.05, spec)


def _halves(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint16 bit patterns (int64 tensor) → their float values in ``dtype``, as float64."""
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16).view(dtype).double()


def _prmt(a: torch.Tensor, b: torch.Tensor, selector: int) -> torch.Tensor:
    """PTX prmt.b32 (default mode): byte i of the result is byte ((selector >> 4i) & 7) of b:a."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(pool[(selector >> (4 * i)) & 7] << (8 * i) for i in range(4))


def _decode_pair(w: torch.Tensor, p: int, neg_c: torch.Tensor, dtype: torch.dtype) -> tuple:
    """The kernel's decode_pair: lop3 (w >> 4p) & 0x000F000F | MAGIC, then one packed FMA v·1 + neg_c
    (exact: both are small integers in ``dtype``). Returns the (low, high) halves' values."""
    magic = MAGIC[dtype] * 0x00010001
    v = ((w >> (4 * p)) & 0x000F000F) | magic
    lo, hi = _halves(v & 0xFFFF, dtype), _halves(v >> 16, dtype)
    c = _halves(neg_c, dtype)
    return lo + c, hi + c


def emulate(x: torch.Tensor, prepared: dict, group: int, bias: torch.Tensor | None = None,
            split_k: int = 1) -> torch.Tensor:
    """What ``w4a16_mma_body`` computes for int4 codes, in float64 (rows per warp, warps and stages change
    only which thread does what, not the sums)."""
    dtype = x.dtype
    M, K = x.shape
    qw = prepared["qweight"].to(torch.int64) & 0xFFFFFFFF  # (N, K/8)
    N = qw.shape[0]
    scales, zeros = prepared["scales"].double(), prepared.get("zeros")  # (G, N)
    tiles = 1 if M <= 8 else 2 if M <= 16 else 4
    mp = 8 * tiles
    xb = torch.zeros(mp, K, dtype=torch.int64)
    xb[:M] = x.view(torch.int16).to(torch.int64) & 0xFFFF
    xw = xb[:, 0::2] | (xb[:, 1::2] << 16)  # (mp, K/2): x as the kernel's 32-bit words
    k_blocks = K // 128
    kb_split = -(-k_blocks // split_k)
    g = torch.arange(8)
    tiles_n = N // 16
    n_lo = (torch.arange(tiles_n)[:, None] * 16 + g).reshape(-1)  # row g of every tile
    n_hi = n_lo + 8
    partials = []
    for s in range(-(-k_blocks // kb_split)):
        acc = torch.zeros(tiles_n, 16, mp, dtype=torch.float64)  # (tile, row in tile, token)
        for kb in range(s * kb_split, min((s + 1) * kb_split, k_blocks)):
            grp = kb * 128 // group
            z_lo = torch.full((tiles_n * 8,), 8, dtype=torch.int64) if zeros is None else zeros[grp, n_lo].long()
            z_hi = torch.full((tiles_n * 8,), 8, dtype=torch.int64) if zeros is None else zeros[grp, n_hi].long()
            c_lo = (MAGIC[dtype] | 0x8000) + z_lo  # -(MAGIC + z) as 16 bits
            c_hi = (MAGIC[dtype] | 0x8000) + z_hi
            part = torch.zeros(tiles_n, 16, mp, dtype=torch.float64)
            for j in range(4):
                for h in range(2):
                    a = torch.zeros(tiles_n, 16, 16, dtype=torch.float64)  # this step's A: (tile, row, k slot)
                    b = torch.zeros(16, mp, dtype=torch.float64)  # B: (k slot, token)
                    for t in range(4):
                        words = kb * 16 + 4 * t + j
                        wl, wh = qw[n_lo, words], qw[n_hi, words]
                        a0 = _decode_pair(wl, 2 * h, c_lo, dtype)
                        a1 = _decode_pair(wh, 2 * h, c_hi, dtype)
                        a2 = _decode_pair(wl, 2 * h + 1, c_lo, dtype)
                        a3 = _decode_pair(wh, 2 * h + 1, c_hi, dtype)
                        for (vals, row_off, col) in ((a0, 0, 2 * t), (a1, 8, 2 * t), (a2, 0, 2 * t + 8),
                                                     (a3, 8, 2 * t + 8)):
                            a[:, row_off:row_off + 8, col] = vals[0].reshape(tiles_n, 8)
                            a[:, row_off:row_off + 8, col + 1] = vals[1].reshape(tiles_n, 8)
                        base = kb * 64 + 16 * t + 4 * j  # x word of this thread's word j (every token)
                        lo, hi = xw[:, base + h], xw[:, base + 2 + h]
                        b0, b1 = _prmt(lo, hi, 0x5410), _prmt(lo, hi, 0x7632)
                        b[2 * t], b[2 * t + 1] = _halves(b0 & 0xFFFF, dtype), _halves(b0 >> 16, dtype)
                        b[2 * t + 8], b[2 * t + 9] = _halves(b1 & 0xFFFF, dtype), _halves(b1 >> 16, dtype)
                    part += a @ b
            s_lo = scales[grp, n_lo].reshape(tiles_n, 8, 1)
            s_hi = scales[grp, n_hi].reshape(tiles_n, 8, 1)
            acc[:, :8] += s_lo * part[:, :8]
            acc[:, 8:] += s_hi * part[:, 8:]
        partials.append(acc)
    total = functools.reduce(torch.add, partials)  # the fix-up's order: split 0, 1, ...
    y = total.reshape(N, mp)[:, :M].T
    if bias is not None:
        y = y + bias.double()
    return y


def _dense(weight: QuantizedWeight) -> torch.Tensor:
    """The weight in float64, every product exact ((q - z) · s: a 5-bit integer times a 24-bit scale)."""
    rows, cols = weight.shape
    group = weight.group_size if weight.scale_shape[1] > 1 else cols
    column_group = torch.arange(cols) // group
    zero = weight.zero_points()
    codes = weight.codes().double() - (0 if zero is None else zero.double()[:, column_group])
    return codes * weight.scales().double()[:, column_group]


# -- the arithmetic, on the CPU ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m,k,n,group,split", [(1, 256, 48, 128, 1), (7, 384, 32, 128, 2), (16, 512, 16, 256, 3),
                                                 (23, 256, 64, None, 1)])
def test_the_kernels_arithmetic_is_the_quantised_product(dtype, symmetric, m, k, n, group, split):
    weight = _weight(n, k, group, symmetric, "float32", seed=m + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    prepared = prepare_w4a16(weight)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    y = emulate(x, prepared, group or k, bias, split_k=split)
    exact = x.double() @ _dense(weight).T + bias.double()  # float64 throughout: only the sum's order differs
    assert torch.allclose(y, exact, rtol=1e-12, atol=1e-12)
    _check(y.to(dtype), quantized_linear(x, weight, bias))


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 32), kb=st.integers(1, 4), tiles=st.integers(1, 5), symmetric=st.booleans(),
       fp16=st.booleans(), scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]), seed=st.integers(0, 99))
def test_the_arithmetic_holds_for_any_shape_and_scale_dtype(m, kb, tiles, symmetric, fp16, scale_dtype, seed):
    dtype = torch.float16 if fp16 else torch.bfloat16
    k, n = 128 * kb, 16 * tiles
    weight = _weight(n, k, 128, symmetric, scale_dtype, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = emulate(x, prepare_w4a16(weight), 128, split_k=1 + seed % kb)
    assert torch.allclose(y, x.double() @ _dense(weight).T, rtol=1e-12, atol=1e-12)


def test_the_x_pairs_and_the_decoded_pairs_meet_the_same_columns():
    """Nibble pair (p, p + 4) of a word and x's pair made by prmt from the same 8 columns."""
    w = torch.tensor([0x76543210], dtype=torch.int64)  # nibble i = i
    x = torch.arange(8, dtype=torch.int64) + 0x100  # distinct 16-bit values for columns 0..7
    words = x[0::2] | (x[1::2] << 16)
    for h in range(2):
        lo, hi = words[h], words[2 + h]
        for p, selector in ((2 * h, 0x5410), (2 * h + 1, 0x7632)):
            pair = _prmt(lo, hi, selector)
            codes = ((w >> (4 * p)) & 0x000F000F).item()
            assert (codes & 0xF, codes >> 16) == (p, p + 4)
            assert ((pair & 0xFFFF).item(), (pair >> 16).item()) == (0x100 + p, 0x100 + p + 4)


@pytest.mark.parametrize("m,tokens,rows", [(1, 8, 32), (8, 8, 32), (9, 16, 16), (16, 16, 16), (17, 32, 16),
                                           (32, 32, 16)])
def test_the_launcher_picks_the_cuda_kernel_only_when_asked_and_where_it_applies(m, tokens, rows):
    cfg = int4_config(m, 28672, 8192, 128, 64, 132, cuda=True)
    assert (cfg.backend, cfg.block_m, cfg.block_n, cfg.block_k) == ("cuda", tokens, rows, 128)
    assert 1 <= cfg.split_k <= 8192 // 128 // 4
    assert int4_config(m, 28672, 8192, 128, 64, 132).backend != "cuda"  # not by default
    for refused in (dict(m=33), dict(group_size=64), dict(lut=True), dict(gidx=True), dict(k=8192 + 64)):
        args = dict(m=m, n=28672, k=8192, group_size=128, n_groups=64, sms=132, cuda=True) | refused
        assert int4_config(**args).backend != "cuda", refused


def test_prepare_int_refuses_what_it_would_misread():
    nf4 = quantize_weight(torch.randn(16, 128), QuantSpec("nf4", 4, "group", 64))
    with pytest.raises(LowbitError, match="integer codes in column order"):
        prepare_int(nf4)


def test_max_rows_and_stages_keep_a_thread_within_its_registers():
    assert [cuda.max_rows(t) for t in (1, 2, 4)] == [4, 2, 1]
    assert cuda.max_rows(1, 2) == 2
    assert [cuda.max_stages(r, t) for r, t in ((1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4))] == [3, 2, 2, 1, 1, 1]
    assert cuda.plan(1, 64, 512, torch.bfloat16, torch.float16, False, False, rows=4, stages=3).variant.stages == 1


# -- compiling it ---------------------------------------------------------------------------------

VARIANTS = [cuda.plan(8 * tiles, 4096, 4096, dtype, sdt, zp, bias, rows, 4, 1, stages, bits).variant
            for bits in (3, 4, 8) for dtype in (torch.bfloat16, torch.float16) for tiles in (1, 2, 4)
            for rows in (1, 2, 4) for stages in (1, 2, 3)
            for zp, bias, sdt in ((False, False, torch.float16), (True, True, torch.float32))]
VARIANTS = sorted(set(VARIANTS), key=str)  # every specialisation plan() can pick
VARIANTS += [cuda.DequantVariant(dt, sdt, zp, bits) for dt in (0, 1) for sdt in (0, 1, 2) for zp in (False, True)
             for bits in (3, 4, 8)]


# sm_80 (A100) by nvcc, sm_90 (H100, H200) by NVRTC: the compiler a GPU machine uses at the first call, for the arch
# it asks for (`cuda._function`), with ptxas's -v report (the same registers as nvcc's for sm_90a, checked
# 2026-11-29 for all of VARIANTS)
COMPILERS = {"sm_80": "nvcc", "sm_90": "nvrtc"}
MISSING = {"nvcc": shutil.which("nvcc") is None, "nvrtc": cuda._nvrtc() is None}
NAMES = [f"k{i}" for i in range(len(VARIANTS))]


@functools.cache
def _compiled() -> dict[str, tuple[bytes, dict]]:
    """Every variant's entry point in one source, compiled for each arch whose compiler is here: the image and
    ptxas's report of every entry point, by arch. Both at once (each compiler runs on one core)."""
    source = cuda.SOURCE.read_text() + "".join(v.entry_point(name) for v, name in zip(VARIANTS, NAMES))
    compile_ = {"nvcc": cuda.compile_nvcc, "nvrtc": cuda.compile_nvrtc}
    with concurrent.futures.ThreadPoolExecutor(len(COMPILERS)) as pool:
        done = {arch: pool.submit(compile_[compiler], source, arch, True) for arch, compiler in COMPILERS.items()
                if not MISSING[compiler]}
    return {arch: (future.result()[0], cuda.ptxas_reports(future.result()[1])) for arch, future in done.items()}


@pytest.mark.parametrize("arch", COMPILERS)
def test_every_specialisation_compiles_without_spilling(arch):
    if MISSING[COMPILERS[arch]]:
        pytest.skip(f"{COMPILERS[arch]} is not installed")
    image, reports = _compiled()[arch]
    assert image[:4] == b"\x7fELF"
    assert sorted(reports) == sorted(NAMES)
    for variant, name in zip(VARIANTS, NAMES):
        assert name.encode() in image
        report = reports[name]
        assert report["spill_stores"] == 0 and report["spill_loads"] == 0, (variant, report)
        if isinstance(variant, cuda.DequantVariant):  # 256 threads per block: at most 255 registers anyway
            assert report["registers"] <= 128, (variant, report)
        assert report["registers"] <= 255


@pytest.mark.skipif(MISSING["nvrtc"], reason="NVRTC is not installed (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[-1]], ids=str)
def test_nvrtc_compiles_a_variants_source_as_shipped(variant):
    """The source a GPU machine compiles at the first call, with the entry point's own name (every specialisation
    compiles without CUDA headers: the sm_90 compile above)."""
    image = cuda.compile_nvrtc(variant.source(), "sm_90")[0]
    assert image[:4] == b"\x7fELF" and variant.ENTRY.encode() in image


@pytest.mark.parametrize("compiler", ["nvrtc", "nvcc"])
def test_a_compile_error_names_the_source(compiler):
    if MISSING[compiler]:
        pytest.skip(f"{compiler} is not installed")
    compile_ = cuda.compile_nvrtc if compiler == "nvrtc" else cuda.compile_nvcc
    with pytest.raises(LowbitError, match="w4a16_mma.cu"):
        compile_("this is not CUDA", "sm_90")


# -- its source, run on the CPU ---------------------------------------------------------------

HERE = Path(__file__).parent
GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU of compute capability 8.0 or newer")


_BUILDS: dict[tuple, concurrent.futures.Future] = {}
_BUILDER = concurrent.futures.ThreadPoolExecutor(2)  # g++ runs on one core: two builds at once


def _host_kernel(variant: cuda.Variant | cuda.DequantVariant, build_dir: str) -> ctypes.CDLL:
    """w4a16_mma.cu compiled for the CPU (-DLOWBIT_HOST: w4a16_host.h's primitives, lanes as threads), once; a
    DequantVariant leaves the MMA kernel's other arguments at placeholders. `_start_build` may have begun it."""
    return _start_build(variant, build_dir).result()


def _start_build(variant: cuda.Variant | cuda.DequantVariant, build_dir: str) -> concurrent.futures.Future:
    key = (variant, build_dir)
    if key not in _BUILDS:
        _BUILDS[key] = _BUILDER.submit(_build_host_kernel, variant, build_dir)
    return _BUILDS[key]


def _build_host_kernel(variant: cuda.Variant | cuda.DequantVariant, build_dir: str) -> ctypes.CDLL:
    out = Path(build_dir) / f"w4a16_host_{abs(hash(variant))}.so"
    get = lambda name, default: getattr(variant, name, default)  # noqa: E731
    flags = [f"-DV_{key}={value}" for key, value in (
        ("DT", variant.dt), ("SDT", variant.sdt), ("R", get("rows", 1)), ("NT", get("token_tiles", 1)),
        ("ZP", str(variant.zero_points).lower()), ("BIAS", str(get("bias", False)).lower()),
        ("WARPS", get("warps", 4)), ("S", get("stages", 1)), ("BITS", variant.bits))]
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DLOWBIT_HOST", *flags,
           f"-I{cuda.SOURCE.parent}", f"-I{HERE}", str(HERE / "w4a16_host_run.cpp"), "-o", str(out)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"g++ could not build the host kernel:\n{built.stderr[-3000:]}"
    return ctypes.CDLL(str(out))


def _host_plan(x, prepared, bias=None, rows=2, warps=4, split_k=1, stages=1, bits=4) -> cuda.Launch:
    """The plan `cuda.launch_mma` makes for this call."""
    M, K = x.shape
    return cuda.plan(M, prepared["qweight"].shape[0], K, x.dtype, prepared["scales"].dtype,
                     prepared.get("zeros") is not None, bias is not None, rows, warps, split_k, stages, bits)


def run_on_host(x, prepared, group, bias=None, rows=2, warps=4, split_k=1, stages=1, build_dir="/tmp",
                bits=4) -> torch.Tensor:
    """`cuda.launch_mma`'s call, made by the kernel's own source on the CPU."""
    M, K = x.shape
    N = prepared["qweight"].shape[0]
    zeros = prepared.get("zeros")
    run = _host_plan(x, prepared, bias, rows, warps, split_k, stages, bits)
    y = torch.full((M, N), float("nan"), dtype=x.dtype)
    ws = torch.full((run.splits, M, N), float("nan"))
    counters = torch.zeros(run.blocks, dtype=torch.int32)
    tensors = [x.contiguous(), prepared["qweight"], prepared["scales"], zeros if zeros is not None else y,
               bias if bias is not None else y, y, ws, counters]
    pointers = [ctypes.c_void_p(t.data_ptr()) for t in tensors]
    ints = [ctypes.c_int(v) for v in (M, N, K, group, run.kb_split, run.blocks, run.splits)]
    _host_kernel(run.variant, build_dir).run(*pointers, *ints)
    assert not counters.any(), "the split-K counters were not left at zero"
    return y


needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@needs_gxx
@pytest.mark.parametrize("m,k,n,group,symmetric,scale_dtype,rows,warps,split,stages,bias", [
    (1, 256, 48, 128, True, "float16", 2, 4, 1, 1, False),
    (1, 896, 48, 128, True, "float16", 1, 4, 1, 2, True),  # 7 blocks: the 3-buffer rotation's every phase
    (3, 384, 80, 128, False, "float32", 1, 4, 3, 1, True),
    (8, 512, 64, 256, True, "bfloat16", 4, 8, 2, 2, True),
    (9, 256, 160, None, False, "float16", 2, 4, 2, 1, False),
    (16, 640, 32, 128, True, "float32", 2, 8, 5, 1, True),
    (17, 1152, 48, 128, False, "float16", 2, 4, 2, 3, True),
    (32, 384, 16, 128, True, "bfloat16", 1, 4, 2, 1, False),
])
def test_the_kernel_source_computes_the_quantised_product_on_the_cpu(m, k, n, group, symmetric, scale_dtype, rows,
                                                                      warps, split, stages, bias, tmp_path_factory):
    weight = _weight(n, k, group, symmetric, scale_dtype, seed=m * 13 + k)
    prepared = prepare_w4a16(weight)
    build = str(tmp_path_factory.getbasetemp())
    cases = {}
    for dtype in (torch.bfloat16, torch.float16):  # both specialisations built at once
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
        b = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) if bias else None
        cases[dtype] = x, b
        _start_build(_host_plan(x, prepared, b, rows, warps, split, stages).variant, build)
    for dtype, (x, b) in cases.items():
        y = run_on_host(x, prepared, group or k, b, rows, warps, split, stages, build)
        _check(y, quantized_linear(x, weight, b))
        emulated = emulate(x, prepared, group or k, b, split_k=split)  # fp32 MMA sums against float64: ulps apart
        assert torch.allclose(y.double(), emulated.to(dtype).double(), rtol=2 * TOL[dtype] / 4, atol=1e-2), dtype


class _HostDriver:
    """Stands in for libcuda: cuLaunchKernel unpacks the argument block `cuda._Function.launch` built
    and runs the kernel's source on the CPU with it (see `_host_kernel`)."""

    def __init__(self, variant_of: dict, build_dir: str):
        self.variant_of, self.build_dir, self.launches = variant_of, build_dir, []

    def cuLaunchKernel(self, function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):  # noqa: N802
        variant = self.variant_of[function.value]
        n_pointers, n_ints = variant.ARGS
        pointers = [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_void_p)).contents.value for i in range(n_pointers)]
        ints = [ctypes.cast(params[n_pointers + i], ctypes.POINTER(ctypes.c_int)).contents.value
                for i in range(n_ints)]
        assert (gz, by, bz, shared, extra) == (1, 1, 1, 0, None)
        self.launches.append((variant.ENTRY, gx, gy, ints))
        library = _host_kernel(variant, self.build_dir)
        pointers = [ctypes.c_void_p(p) for p in pointers]
        if isinstance(variant, cuda.DequantVariant):
            assert gy == 1 and bx == cuda.DEQUANT_THREADS
            library.run_dequant(*pointers, *[ctypes.c_int(i) for i in (*ints, gx, bx)])
        else:
            assert bx == 32 * variant.warps
            library.run(*pointers, *[ctypes.c_int(i) for i in (*ints, gx, gy)])
        return 0


@pytest.fixture
def host_driver(monkeypatch, tmp_path_factory):
    """`lowbit.kernels.cuda` with libcuda replaced by `_HostDriver` and torch.cuda's stream and device
    calls by CPU stand-ins: its launchers run end to end on CPU tensors."""
    variant_of = {}

    def function(variant, device):
        f = cuda._Function.__new__(cuda._Function)
        f.function, f._local = ctypes.c_void_p(1000 + len(variant_of)), threading.local()
        f.entry, (f.pointers, f.ints) = variant.ENTRY, variant.ARGS
        variant_of[f.function.value] = variant
        return f

    driver = _HostDriver(variant_of, str(tmp_path_factory.getbasetemp()))
    driver.counters = torch.zeros(64, dtype=torch.int32)
    monkeypatch.setattr(cuda, "_driver", lambda: driver)
    monkeypatch.setattr(cuda, "_function", function)
    monkeypatch.setattr(cuda, "_counters", lambda device: driver.counters)
    monkeypatch.setattr(cuda, "_make_current", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    return driver


@needs_gxx
def test_the_launcher_passes_the_kernel_its_arguments_in_order(host_driver):
    """`cuda.launch_mma` end to end — plan, workspace, counters, the driver call's argument block — with
    the driver replaced by the kernel's source run on the CPU."""
    weight = _weight(80, 384, 128, False, "float16", seed=3)
    p = prepare_w4a16(weight)
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    bias = torch.randn(80, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = torch.full((5, 80), float("nan"), dtype=torch.bfloat16)
    cuda.launch_mma(out, x, p["qweight"], p["scales"], p["zeros"], bias, 128, rows=1, warps=4, split_k=3, stages=2)
    # 80 rows / 64 per block, 3 splits of 1 block of columns
    assert host_driver.launches == [(cuda.ENTRY, 2, 3, [5, 80, 384, 128, 1])]
    assert not host_driver.counters.any()
    _check(out, quantized_linear(x, weight, bias))


@needs_gxx
@pytest.mark.parametrize("bits,group,symmetric,scale_dtype,dtype", [
    (3, 128, False, "float16", torch.bfloat16), (3, None, True, "float32", torch.float16),
    (4, 256, True, "bfloat16", torch.bfloat16), (8, None, True, "float16", torch.bfloat16),
    (8, 128, False, "float32", torch.float16)])
def test_the_dequantise_kernel_writes_the_references_weight_bit_for_bit(host_driver, bits, group, symmetric,
                                                                         scale_dtype, dtype):
    weight = _weight(48, 384, group, symmetric, scale_dtype, seed=bits, bits=bits)
    p = prepare_int(weight)
    ref = weight.dequantize(dtype)
    w = torch.full((32, 384), float("nan"), dtype=dtype)
    cuda.dequantize(w, p["qweight"], p["scales"], p.get("zeros"), group or 384, bits, row0=16)  # rows 16 .. 47
    assert torch.equal(w, ref[16:])


@needs_gxx
@pytest.mark.parametrize("bits", [3, 8])
def test_many_tokens_take_dequantise_and_a_gemm_in_chunks(host_driver, monkeypatch, bits):
    """Above 32 tokens: the weight dequantised a chunk of rows at a time (two chunks here), each chunk's GEMM."""
    monkeypatch.setenv("LOWBIT_CUDA_KERNELS", "1")
    monkeypatch.setattr(cuda, "DEQUANT_CHUNK", 32)
    monkeypatch.setattr(cuda, "_device_reason", lambda device: None)  # CPU tensors stand in for the GPU's
    weight = _weight(48, 256, 128, False, "float16", seed=bits, bits=bits)
    x = torch.randn(2, 20, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 40 tokens
    bias = torch.randn(48, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    p = prepare_int(weight)
    out = torch.ops.lowbit.int_a16_cuda(x, p["qweight"], p["scales"], p["zeros"], bias, weight.group_size, bits)
    assert [launch[0] for launch in host_driver.launches] == ["lowbit_dequant"] * 2
    assert [launch[3][-1] for launch in host_driver.launches] == [0, 32]  # row0 of each chunk
    assert out.shape == (2, 20, 48)
    _check(out.reshape(40, 48), quantized_linear(x.reshape(40, 256), weight, bias))


# -- running it -----------------------------------------------------------------------------------



def test_calls_it_cannot_take_say_why():
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    p = prepare_w4a16(_weight(32, 256, 128, True, "float16", 0))
    assert "CUDA" in cuda.unsupported(x, p["qweight"], p["scales"], None, 128, False, False)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 2, 7, 9, 16, 32])
@pytest.mark.parametrize("k,n,group,rows,warps,split,stages", [
    (256, 48, 128, 2, 4, 1, 1), (1152, 80, 128, 1, 4, 3, 3), (640, 4096 + 16, 128, 4, 8, 2, 1),
    (512, 96, None, 2, 4, 4, 2), (1024, 32, 256, 2, 4, 8, 2), (8192, 256, 128, 1, 4, 2, 3)])
def test_the_kernel_matches_the_reference(dtype, symmetric, m, k, n, group, rows, warps, split, stages):
    weight = _weight(n, k, group, symmetric, "float16", seed=m * 31 + n)
    dev = torch.device("cuda")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dev, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dev, dtype) if m % 2 else None
    p = {key: v.to(dev) for key, v in prepare_w4a16(weight).items()}
    assert cuda.unsupported(x, p["qweight"], p["scales"], p.get("zeros"), group or k, False, False) is None
    for _ in range(2):  # twice: the split-K counters must be back at zero
        out = torch.full((m, n), float("nan"), dtype=dtype, device=dev)
        cuda.launch_mma(out, x, p["qweight"], p["scales"], p.get("zeros"), bias, group or k, rows, warps, split,
                          stages)
        torch.cuda.synchronize()
        _check(out.cpu(), quantized_linear(x.cpu(), weight, None if bias is None else bias.cpu()))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 5, 16, 32, 33])
@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("k,n,group,symmetric", [(4096, 4096, None, True), (640, 4096 + 16, 128, False),
                                                 (1024, 48, 256, True)])
def test_int3_and_int8_through_the_dispatcher_match_the_reference(monkeypatch, bits, dtype, m, k, n, group,
                                                                  symmetric):
    """W3A16 / W8A16 on the GPU: `lowbit::int_a16_cuda` up to 32 tokens, dequantise + cuBLAS above, opcheck on
    the op."""
    from lowbit.kernels import dispatch

    monkeypatch.setenv("LOWBIT_CUDA_KERNELS", "1")
    dev = torch.device("cuda")
    cpu_weight = _weight(n, k, group, symmetric, "float16", seed=m + n, bits=bits)
    weight = QuantizedWeight(cpu_weight.qdata.to(dev), cpu_weight.scale.to(dev),
                             None if cpu_weight.zero_point is None else cpu_weight.zero_point.to(dev),
                             cpu_weight.shape, cpu_weight.spec)
    kernel = dispatch.choose(weight, None, dev, m)
    assert kernel.name == "cuda-int-a16"
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dev, dtype)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    out = kernel.run(x, kernel.prepare(weight), weight, bias, None)
    _check(out.cpu(), quantized_linear(x.cpu(), cpu_weight, bias.cpu()))
    if m <= cuda.MAX_TOKENS and m % 16 == 0:
        p = prepare_int(weight)
        torch.library.opcheck(torch.ops.lowbit.int_a16_cuda.default, (x, p["qweight"], p["scales"], p.get("zeros"),
                                                                       bias, weight.group_size, bits))


@needs_gpu
@pytest.mark.parametrize("bits,group,symmetric", [(3, 128, False), (4, 128, True), (8, None, True), (8, 256, False)])
def test_the_dequantise_kernel_matches_the_reference_bit_for_bit(bits, group, symmetric):
    dev = torch.device("cuda")
    cpu_weight = _weight(4096 + 16, 1024, group, symmetric, "float16", seed=bits, bits=bits)
    p = prepare_int(cpu_weight)
    p = {key: v.to(dev) for key, v in p.items()}
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.full((4096, 1024), float("nan"), dtype=dtype, device=dev)
        cuda.dequantize(w, p["qweight"], p["scales"], p.get("zeros"), group or 1024, bits, row0=16)
        assert torch.equal(w.cpu(), cpu_weight.dequantize(dtype)[16:])
