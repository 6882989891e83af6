"""CPU kernels for 2/3/4/8-bit integer, NF4 and FP4 weights, reading lowbit's packed codes as they are stored.

``csrc/lowbit_cpu*.cpp`` (three translation units, compiled side by side) are built on first use with the
machine's C++ compiler (through ``torch.utils.cpp_extension``, cached under the torch extensions directory) for
``-march=native``, or the target named by ``LOWBIT_CPU_MARCH`` (e.g. ``x86-64-v3``; each
target is its own build). Its kernels need no prepared copy of the weight — the stored
``qdata``, ``scale`` and ``zero_point`` are their inputs (NF4 / FP4 add their 16 levels;
double-quantised scales are decoded where they are read) — so a quantised model's weight
memory is its packed size:

- ``lowbit::int_gemv_cpu`` (decode: up to 4–32 tokens by format and build, ``gemv_max_m``): each code is turned into its float
  weight in registers and multiplied with x at once; no float weight is written. 4-bit affine codes in groups
  of 32, 64 or a multiple of 128 columns (or per channel) are multiplied in integers where the build has
  AVX-512 VNNI: each token's x is rounded to block floating point (a power-of-two unit per 128 columns, each value within
  2^-22 of its block's largest magnitude: float32's precision for the block's large values, less for small
  ones beside an outlier), split into three byte planes, and ``vpdpbusd`` does 64 exact products where a
  float multiply-add does 16. ``LOWBIT_CPU_FLOAT_GEMV=1`` keeps the float path; an x holding inf or NaN
  takes it too.
- ``lowbit::dequant_linear_cpu`` (prefill, more tokens): the reference's arithmetic, ``F.linear`` on
  the float weight, but never on a whole float copy of the layer: the weight is written a block
  of rows at a time (``block_rows``), each thread dequantising its own blocks into a workspace it
  keeps (``BLOCK_BYTES`` to ``MAX_BLOCK_BYTES``) and multiplying each while it is in
  cache. These are the reference's sums split by rows of the weight, within float rounding of
  the reference's (torch's GEMM, single-threaded on a worker thread, may order a sum differently
  from one call on the whole weight; on the default model the prefill logits of W4A16, W8A16 and
  NF4 came out equal to the reference's all the same).
- ``lowbit::dequant_cpu``: the float weight (N, K) of a layer in one pass, equal to the
  reference's ``dequantize()``.
- ``lowbit::float_gemv_cpu``: ``x @ W.T`` for a float32, bfloat16 or float16 weight and a few tokens, float32
  sums: the layers a quantised model keeps in float (`lowbit.nn.FloatLinear`, the tied head above all), which
  torch's own GEMV read at a fraction of the memory bandwidth on this project's machine
  (bench/results/cpu_float_gemv.md).

Without AVX-512, x86 CPUs with AVX2 and FMA (AMD Zen 2/3, Intel's client CPUs) run 8-lane versions of the
float kernels for every format (the portable loops had a 4-bit layer at 0.9x float32 ``F.linear`` there); the
integer (VNNI) path is AVX-512's alone, and the GEMV hands over to the prefill kernel earlier (``MAX_M_AVX2`` and
the rest). The prefill kernel's dequantise has 8-lane table lookups for 2/3/4-bit codes and NF4 / FP4 there (the
portable byte loops had the default model's 576 × 1536 int4 layer at 0.75-0.87x float32 F.linear from 16 tokens on;
now 1.02-1.43x, bench/results/cpu_prefill_avx2.md).

Act-order weights (GPTQ's desc_act, a ``g_idx`` naming each column's group) are read in column order, each
column's scale fetched from its group: the ops take the ``g_idx`` as it is stored, whatever the group size or
width, and the dequantised weight is again the reference's bit for bit. The ones GPTQ writes — groups that are
runs of ``group_size`` columns once sorted — never get here from a model: `lowbit.nn.QuantLinear` keeps their
codes in group order and gathers x's columns into that order, so they run as plain grouped weights.

Where the extension cannot be built, `supports` says why and the dispatcher falls back to
the reference kernel.

torch's own packed CPU ops are not registered: on this project's 2-core x86_64 machine
(2026-11-27, torch 2.13.0, M = 1, 60 distinct 1536×576 weights so they come from DRAM)
``_weight_int4pack_mm_for_cpu`` took 783 µs per layer and ``_weight_int8pack_mm`` 374 µs,
against 338 µs for float32 ``F.linear``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
from pathlib import Path

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import Kernel, register
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, fake_quantize, lut_levels

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# the ops, then the kernels for 16-bit and for 32-bit / int8 scales, each instantiated from lowbit_cpu_kernels.h
SOURCES = [CSRC / name for name in ("lowbit_cpu.cpp", "lowbit_cpu_scales16.cpp", "lowbit_cpu_scales32.cpp")]
HEADER = CSRC / "lowbit_cpu_kernels.h"
NAME = "lowbit_cpu"
LOOKUP_FORMATS = ("nf4", "fp4")  # 4-bit codes that index a table of 16 levels
# The GEMV's range of tokens, by format: above it, dequantise + GEMM (in blocks) is faster. The GEMV's
# cost grows with M, the dequantise's does not, so the crossover is where the GEMV's decode of the codes
# stops paying for itself: early for int8 (one code per byte, a cheap dequantise), int2, NF4 and FP4, later
# for 3/4-bit codes, and late for act-order weights (read in column order: `QuantLinear` runs GPTQ's as plain
# grouped weights), whose scattered groups make the dequantise slow.
# From bench/results/cpu_prefill.md (2026-11-28, 2 threads, the default model's and LLaMA-7B's shapes).
MAX_M = 8  # int8, int2, NF4, FP4
MAX_M_BY_BITS = {3: 16, 4: 12}  # affine codes of these widths
MAX_M_ACT_ORDER = 32
# Without AVX-512 (the 8-lane AVX2 kernels; an AMD EPYC Zen 3, 2 threads, 2026-11-29, the default model's and
# LLaMA-7B's shapes): the GEMV keeps up with the prefill kernel to 6 tokens for 2/3/4-bit and NF4 codes, 8 for
# int8; at 8 tokens a 4096 × 4096 layer's 2/3/4-bit GEMV took 1.7x float32 F.linear's time, dequantise + GEMM
# 0.55-0.58x; act-order weights read in column order hand over after 4.
MAX_M_AVX2 = 6
MAX_M_BY_BITS_AVX2 = {8: 8}
MAX_M_ACT_ORDER_AVX2 = 4
# Prefill dequantises a block of rows at a time, each thread its own blocks, each block's GEMM right after
# it is written, while it is in cache: at least BLOCK_BYTES of float32 (or M rows, so that x, read once per
# block, is not read more than the weight, up to MAX_BLOCK_BYTES: each thread keeps its workspace), and at
# most an even share of BLOCKS_PER_THREAD blocks per thread (so that the threads finish together). One-off
# sweeps of block sizes on this project's machine (int4 g128, 2 threads, 2026-11-28;
# bench/results/cpu_prefill.md times the rule as it stands): at 64 tokens 4096 × 4096
# took 22.1 / 17.6 / 16.4 / 16.8 ms in blocks of 16 / 64 / 128 / 512 rows (F.linear on the float weight
# 26.1), 576 × 1536 took 0.80 / 0.68 / 0.67 / 0.85 ms in blocks of 64 / 144 / 288 / all 576 rows (F.linear
# 0.77), and 1536 × 576 0.71 / 0.68 / 0.69 / 0.88 ms in blocks of 192 / 384 / 768 / 1536 (F.linear 0.86).
BLOCK_BYTES = 2 << 20
MAX_BLOCK_BYTES = 16 << 20
BLOCKS_PER_THREAD = 2


def gemv_max_m(weight: QuantizedWeight) -> int:
    """The most tokens the GEMV runs for this weight on this machine's build; the prefill kernel takes more."""
    wide = _avx512()
    if weight.g_idx is not None:  # read in column order
        return MAX_M_ACT_ORDER if wide else MAX_M_ACT_ORDER_AVX2
    if not wide:
        return MAX_M_BY_BITS_AVX2.get(weight.spec.bits, MAX_M_AVX2)
    if weight.spec.format in LOOKUP_FORMATS:
        return MAX_M
    return MAX_M_BY_BITS.get(weight.spec.bits, MAX_M)


@functools.cache
def _avx512() -> bool:
    return "avx512" in build_features()


BUILD_NOTICE_S = 3.0  # a load of the kernels still going after this long is compiling them: `extension` says so


@functools.cache
def extension() -> str | None:
    """Build (once per machine and target) and load the C++ kernels: None, or why they cannot be."""
    if os.environ.get("LOWBIT_NO_CPP"):
        return "disabled by LOWBIT_NO_CPP"
    march = os.environ.get("LOWBIT_CPU_MARCH", "native")
    name = NAME if march == "native" else NAME + "_" + re.sub(r"\W", "_", march)
    try:
        from torch.utils.cpp_extension import load

        log.info("loading lowbit's CPU kernels for -march=%s ...", march)
        # torch rebuilds when a source or a flag changes, and hashes no header: the header's hash is a flag
        header = hashlib.sha256(HEADER.read_bytes()).hexdigest()[:16]
        # a load that has to compile takes a minute (47 s on this project's 2-core machine): say so, where the
        # user would otherwise see a run stop without a word; a load from torch's cache is done long before
        notice = threading.Timer(BUILD_NOTICE_S, log.warning, (
            "compiling lowbit's CPU kernels for -march=%s: once for this machine and version, about a minute ...",
            march))
        notice.daemon = True
        notice.start()
        try:
            load(name=name, sources=[str(s) for s in SOURCES], extra_include_paths=[str(CSRC)],
                 extra_cflags=["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=off",
                               f"-DLOWBIT_KERNELS_H={header}"],
                 extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        finally:
            notice.cancel()
        return None
    except Exception as err:  # noqa: BLE001 - any build failure means: use the reference
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"the C++ kernels could not be built ({first})"


def _define(name: str, schema: str, fake) -> None:
    """Declare ``lowbit::<name>`` with its fake (shape-only) implementation. Its CPU
    implementation is C++, registered when the extension loads; until then the default one
    loads it and calls again (the C++ CPU kernel takes precedence over a default one)."""
    qualname = f"lowbit::{name}"
    torch.library.define(qualname, schema)
    torch.library.register_fake(qualname, fake)

    def load_then_call(*args, **kwargs):
        reason = extension()
        if reason is not None:
            raise LowbitError(f"{qualname} cannot run: {reason}")
        if args[0].device.type != "cpu":
            raise LowbitError(f"{qualname} runs on CPU tensors, not {args[0].device.type}")
        return getattr(torch.ops.lowbit, name).default(*args, **kwargs)

    torch.library.impl(qualname, "default", load_then_call)


# x (..., K) float32 @ dequant(W).T from the packed codes, no float weight written; ``levels`` (16,) float32
# for a 4-bit lookup format (NF4, FP4: w = levels[c] * s), else the codes are affine ((c - z) * s); int8 ``scale``
# codes with ``scale_scale`` and ``scale_offset`` for double-quantised scales (decoded as the kernels read them);
# ``g_idx`` (K,) int32 for act-order weights, the group of each column
# ``x_bits`` > 0: x quantised per token first (symmetric, float32 scale amax / qmax), as `fake_quantize` does W8A8's
# dynamic activations, in the op rather than in five torch calls per layer
_define("int_gemv_cpu", "(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, int bits, int group, "
        "int out_features, Tensor? levels=None, Tensor? scale_scale=None, Tensor? scale_offset=None, "
        "Tensor? g_idx=None, int x_bits=0) -> Tensor",
        lambda x, qdata, scale, zero_point, bits, group, out_features, levels=None, scale_scale=None,
        scale_offset=None, g_idx=None, x_bits=0: x.new_empty((*x.shape[:-1], out_features)))
# the float32 weight (N, K) the codes stand for, equal to the reference's dequantise()
_define("dequant_cpu", "(Tensor qdata, Tensor scale, Tensor? zero_point, int bits, int group, int in_features, "
        "Tensor? levels=None, Tensor? scale_scale=None, Tensor? scale_offset=None, Tensor? g_idx=None) -> Tensor",
        lambda qdata, scale, zero_point, bits, group, in_features, levels=None, scale_scale=None, scale_offset=None,
        g_idx=None: qdata.new_empty((qdata.shape[0], in_features), dtype=torch.float32))
# F.linear(x, dequant(W), bias) for float32 / bfloat16 / float16 x, the weight dequantised ``block_rows`` (> 0) rows
# at a time (>= out_features: all at once, the reference's own call)
_define("dequant_linear_cpu", "(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, int bits, int group, "
        "int out_features, Tensor? levels=None, Tensor? scale_scale=None, Tensor? scale_offset=None, "
        "Tensor? g_idx=None, Tensor? bias=None, *, int block_rows) -> Tensor",
        lambda x, qdata, scale, zero_point, bits, group, out_features, levels=None, scale_scale=None,
        scale_offset=None, g_idx=None, bias=None, *, block_rows: x.new_empty((*x.shape[:-1], out_features)))
# x (..., K) @ weight.T (+ bias) for a float32 / bfloat16 / float16 weight (N, K): a few tokens' GEMV, float32 sums
_define("float_gemv_cpu", "(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor",
        lambda x, weight, bias=None: x.new_empty((*x.shape[:-1], weight.shape[0])))
# what the build was compiled with, 0/1 each: AVX-512, VBMI, VNNI, and AVX2 + FMA without AVX-512 (the anchor only
# routes the call to the CPU kernel)
_define("build_features_cpu", "(Tensor anchor) -> int[]", lambda anchor: [0, 0, 0, 0])
BUILD_FEATURES = ("avx512", "vbmi", "vnni", "avx2")


def build_features() -> frozenset[str]:
    """The instruction sets the C++ kernels were built for (``vnni``: the one-token 4-bit path in integers is
    there); empty where they could not be built."""
    if extension() is not None:
        return frozenset()
    flags = torch.ops.lowbit.build_features_cpu(torch.empty(0))
    return frozenset(name for name, on in zip(BUILD_FEATURES, flags, strict=True) if on)
_INT_GEMV_OP = torch.ops.lowbit.int_gemv_cpu.default
_DEQUANT_LINEAR_OP = torch.ops.lowbit.dequant_linear_cpu.default
FLOAT_GEMV_OP = torch.ops.lowbit.float_gemv_cpu.default


def _supports(weight: QuantizedWeight, activations: QuantSpec | None, device: torch.device) -> str | None:
    spec = weight.spec
    if activations is not None and activations.format != "int":
        return f"integer activations only, not {activations.describe()}"
    lookup = spec.format in LOOKUP_FORMATS
    if not (spec.format == "int" and spec.bits in (2, 3, 4, 8) or lookup):
        return f"integer 2/3/4/8-bit, NF4 or FP4 weights only, not {spec.describe()}"
    if spec.granularity == "tensor":
        return "per-group or per-channel scales only, not one per tensor"
    cols = weight.shape[1]
    if weight.g_idx is not None:  # act-order: g_idx places every column's group, of any size
        if spec.bits == 3 and cols % 8:  # whole 3-byte words of 8 codes
            return f"3-bit codes need in_features to be a multiple of 8, not {cols}"
        return extension()
    return weight.group_layout_issue() or extension()


def _prepare(weight: QuantizedWeight) -> dict:
    """Nothing for integer codes (the kernels read the stored tensors); for NF4 / FP4 their 16 levels."""
    return {"levels": lut_levels(weight.spec.format).contiguous()} if weight.spec.format in LOOKUP_FORMATS else {}


def _operands(weight: QuantizedWeight, prepared: dict) -> tuple[tuple, dict]:
    """The packed weight's positional arguments of the C++ ops (qdata, scale, zero_point, bits, group) and
    their keyword arguments (levels, double-quantised scales' block scales and offset, act-order's g_idx)."""
    extra = {} if weight.g_idx is None else {"g_idx": weight.g_idx}
    if weight.spec.format in LOOKUP_FORMATS:  # `_prepare`'s dict, as the dispatcher passes it
        extra["levels"] = prepared["levels"]
    scale = weight.scale
    if weight.scale_scale is not None:  # int8 codes, read in place as (N, G)
        scale = scale.view(weight.scale_shape)
        extra.update(scale_scale=weight.scale_scale, scale_offset=weight.scale_offset)
    return (weight.qdata, scale, weight.zero_point, weight.spec.bits, weight.group_size), extra


def token_bits(activations: QuantSpec | None) -> int:
    """The width of symmetric per-token integer activations with float32 scales (W8A8's), which the GEMV
    quantises itself (its ``x_bits``); 0 for none or any other spec."""
    if (activations is not None and activations.format == "int" and activations.symmetric
            and activations.granularity == "token" and activations.torch_scale_dtype == torch.float32):
        return activations.bits
    return 0


def _run(x: Tensor, prepared: dict, weight: QuantizedWeight, bias: Tensor | None, activations) -> Tensor:
    # W8A8: the reference's per-call activation quantisation (in the op where it can: float32 x, whose quantised
    # values the reference keeps in float32), then the same sums
    x_bits = token_bits(activations) if x.dtype == torch.float32 else 0
    if activations is not None and not x_bits:
        x = fake_quantize(x, activations)
    packed, extra = _operands(weight, prepared)
    if x_bits:
        extra["x_bits"] = x_bits
    y = _INT_GEMV_OP(x if x.dtype == torch.float32 else x.float(), *packed, weight.shape[0], **extra)
    if bias is not None:
        y = y + bias.float()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _bind(prepared: dict, weight: QuantizedWeight, activations: QuantSpec | None):
    """`_run` for this weight with its operands gathered once, where there is nothing to do per call but the op:
    no activation quantisation, float32 x and no bias (any other call takes `_run`)."""
    if activations is not None:
        return None
    packed, extra = _operands(weight, prepared)
    out_features = weight.shape[0]

    def gemv(x: Tensor, bias: Tensor | None) -> Tensor:
        if x.dtype != torch.float32 or bias is not None:
            return _run(x, prepared, weight, bias, activations)
        return _INT_GEMV_OP(x, *packed, out_features, **extra)

    return gemv


def block_rows(out_features: int, in_features: int, tokens: int) -> int:
    """Rows of float weight dequantised at a time for prefill (module comment at ``BLOCK_BYTES``), in whole
    16-row steps."""
    rows = min(max(BLOCK_BYTES // (4 * in_features), tokens), MAX_BLOCK_BYTES // (4 * in_features))
    share = -(-out_features // (BLOCKS_PER_THREAD * torch.get_num_threads()))
    return max(16, min(rows, share) // 16 * 16)


def _run_dequant(x: Tensor, prepared: dict, weight: QuantizedWeight, bias: Tensor | None, activations) -> Tensor:
    # the reference's arithmetic (dequantise, then F.linear), a block of rows at a time
    if activations is not None:
        x = fake_quantize(x, activations)
    packed, extra = _operands(weight, prepared)
    rows = block_rows(*weight.shape, x.numel() // max(1, weight.shape[1]))
    return _DEQUANT_LINEAR_OP(x, *packed, weight.shape[0], **extra, bias=bias, block_rows=rows)


INT_GEMV = Kernel("cpu-int-gemv", "cpu", supports=_supports, prepare=_prepare, run=_run, max_m=gemv_max_m,
                  bind=_bind)
DEQUANT_GEMM = Kernel("cpu-dequant-gemm", "cpu", supports=_supports, prepare=_prepare, run=_run_dequant,
                      min_m=lambda weight: gemv_max_m(weight) + 1)
register(INT_GEMV)
register(DEQUANT_GEMM)
