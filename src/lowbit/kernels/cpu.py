"""CPU kernels for 2/3/4/8-bit integer, NF4 and FP4 weights, reading lowbit's packed codes as they are stored.

``csrc/lowbit_cpu.cpp`` is compiled on first use with the machine's C++ compiler (through
``torch.utils.cpp_extension``, cached under the torch extensions directory) for
``-march=native``, or the target named by ``LOWBIT_CPU_MARCH`` (e.g. ``x86-64-v3``; each
target is its own build). Its kernels need no prepared copy of the weight — the stored
``qdata``, ``scale`` and ``zero_point`` are their inputs (NF4 / FP4 add their 16 levels;
double-quantised scales are decoded where they are read) — so a quantised model's weight
memory is its packed size:

- ``lowbit::int_gemv_cpu`` (M ≤ 8 tokens, decode): each code is turned into its float
  weight in registers and multiplied with x at once; no float weight is written.
- ``lowbit::dequant_cpu`` (M > 8, prefill): the float weight of one layer, written in one
  pass and equal to the reference's ``dequantize()``, for ``F.linear`` — the reference's own
  arithmetic, so prefill logits are the reference's bit for bit; only its dequantise is faster
  (one pass instead of torch's unpack, cast, expand and multiply).

Act-order weights (GPTQ's desc_act, a ``g_idx`` naming each column's group) are read in column
order, each column's scale fetched from its group: both ops take the ``g_idx`` as it is stored,
whatever the group size or width, and the prefill weight is again the reference's bit for bit.

Where the extension cannot be built, `supports` says why and the dispatcher falls back to
the reference kernel.

torch's own packed CPU ops are not registered: on this project's 2-core x86_64 machine
(2026-11-27, torch 2.13.0, M = 1, 60 distinct 1536×576 weights so they come from DRAM)
``_weight_int4pack_mm_for_cpu`` took 783 µs per layer and ``_weight_int8pack_mm`` 374 µs,
against 338 µs for float32 ``F.linear``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.kernels.dispatch import Kernel, register
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight, fake_quantize, lut_levels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lowbit_cpu.cpp"
NAME = "lowbit_cpu"
LOOKUP_FORMATS = ("nf4", "fp4")  # 4-bit codes that index a table of 16 levels
# The GEMV's range. Above it dequantise + GEMM is faster: per 1536×576 weight from DRAM, one
# thread (2026-11-27), int4 g128 314 vs 355 µs at M = 8, 610 vs 475 at M = 16; int8 452 vs 401
# at M = 8, 229 vs 350 at M = 4.
MAX_M = 8


@functools.cache
def extension() -> str | None:
    """Build (once per machine and target) and load the C++ kernels: None, or why they cannot be."""
    if os.environ.get("LOWBIT_NO_CPP"):
        return "disabled by LOWBIT_NO_CPP"
    march = os.environ.get("LOWBIT_CPU_MARCH", "native")
    name = NAME if march == "native" else NAME + "_" + re.sub(r"\W", "_", march)
    try:
        from torch.utils.cpp_extension import load

        log.info("building lowbit's CPU kernels for -march=%s (once) ...", march)
        load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", f"-march={march}", "-fopenmp", "-ffp-contract=off"],
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
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

    def load_then_call(*args):
        reason = extension()
        if reason is not None:
            raise LowbitError(f"{qualname} cannot run: {reason}")
        if args[0].device.type != "cpu":
            raise LowbitError(f"{qualname} runs on CPU tensors, not {args[0].device.type}")
        return getattr(torch.ops.lowbit, name).default(*args)

    torch.library.impl(qualname, "default", load_then_call)


# x (..., K) float32 @ dequant(W).T from the packed codes, no float weight written; ``levels`` (16,) float32
# for a 4-bit lookup format (NF4, FP4: w = levels[c] * s), else the codes are affine ((c - z) * s); int8 ``scale``
# codes with ``scale_scale`` and ``scale_offset`` for double-quantised scales (decoded as the kernels read them);
# ``g_idx`` (K,) int32 for act-order weights, the group of each column
_define("int_gemv_cpu", "(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, int bits, int group, "
        "int out_features, Tensor? levels=None, Tensor? scale_scale=None, Tensor? scale_offset=None, "
        "Tensor? g_idx=None) -> Tensor",
        lambda x, qdata, scale, zero_point, bits, group, out_features, levels=None, scale_scale=None,
        scale_offset=None, g_idx=None: x.new_empty((*x.shape[:-1], out_features)))
# the float32 weight (N, K) the codes stand for, equal to the reference's dequantise()
_define("dequant_cpu", "(Tensor qdata, Tensor scale, Tensor? zero_point, int bits, int group, int in_features, "
        "Tensor? levels=None, Tensor? scale_scale=None, Tensor? scale_offset=None, Tensor? g_idx=None) -> Tensor",
        lambda qdata, scale, zero_point, bits, group, in_features, levels=None, scale_scale=None, scale_offset=None,
        g_idx=None: qdata.new_empty((qdata.shape[0], in_features), dtype=torch.float32))
_INT_GEMV_OP = torch.ops.lowbit.int_gemv_cpu.default
_DEQUANT_OP = torch.ops.lowbit.dequant_cpu.default


def _supports(weight: QuantizedWeight, activations: QuantSpec | None, device: torch.device) -> str | None:
    spec = weight.spec
    if activations is not None and activations.format != "int":
        return f"integer activations only, not {activations.describe()}"
    lookup = spec.format in LOOKUP_FORMATS
    if not (spec.format == "int" and spec.bits in (2, 3, 4, 8) or lookup):
        return f"integer 2/3/4/8-bit, NF4 or FP4 weights only, not {spec.describe()}"
    if spec.granularity == "tensor":
        return "per-group or per-channel scales only, not one per tensor"
    group, cols = weight.group_size, weight.shape[1]
    if weight.g_idx is not None:  # act-order: g_idx places every column's group, of any size
        if spec.bits == 3 and cols % 8:  # whole 3-byte words of 8 codes
            return f"3-bit codes need in_features to be a multiple of 8, not {cols}"
        return extension()
    if spec.bits == 3 and (group % 8 or cols % 8):  # whole 3-byte words of 8 codes per group
        return f"3-bit codes need the group size and in_features to be multiples of 8, not {group} and {cols}"
    if group % (8 // spec.bits) and group < cols:  # groups start on a byte
        return f"groups of {group} do not fill whole bytes"
    return extension()


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


def _run(x: Tensor, prepared: dict, weight: QuantizedWeight, bias: Tensor | None, activations) -> Tensor:
    if activations is not None:  # W8A8: the reference's per-call activation quantisation, then the same sums
        x = fake_quantize(x, activations)
    packed, extra = _operands(weight, prepared)
    y = _INT_GEMV_OP(x if x.dtype == torch.float32 else x.float(), *packed, weight.shape[0], **extra)
    if bias is not None:
        y = y + bias.float()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _run_dequant(x: Tensor, prepared: dict, weight: QuantizedWeight, bias: Tensor | None, activations) -> Tensor:
    # the reference's arithmetic (dequantise, then F.linear) with a one-pass dequantise
    if activations is not None:
        x = fake_quantize(x, activations)
    packed, extra = _operands(weight, prepared)
    w = _DEQUANT_OP(*packed, weight.shape[1], **extra)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


INT_GEMV = Kernel("cpu-int-gemv", "cpu", supports=_supports, prepare=_prepare, run=_run, max_m=MAX_M)
DEQUANT_GEMM = Kernel("cpu-dequant-gemm", "cpu", supports=_supports, prepare=_prepare, run=_run_dequant,
                      min_m=MAX_M + 1)
register(INT_GEMV)
register(DEQUANT_GEMM)
