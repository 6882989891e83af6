"""CPU kernels: weight-only integer GEMV that reads lowbit's packed codes as they are stored.

``csrc/lowbit_cpu.cpp`` is compiled on first use with the machine's C++ compiler (through
``torch.utils.cpp_extension``, cached under the torch extensions directory) for
``-march=native``. It needs no prepared copy of the weight — the stored ``qdata``,
``scale`` and ``zero_point`` are its inputs — so a quantised model's weight memory is its
packed size. Where it cannot be built, `supports` says why and the dispatcher falls back
to the reference kernel.

torch's own packed CPU ops are not registered: on this project's 2-core x86_64 machine
(2026-11-27, torch 2.13.0, M = 1, 60 distinct 1536×576 weights so they come from DRAM)
``_weight_int4pack_mm_for_cpu`` took 783 µs per layer and ``_weight_int8pack_mm`` 374 µs,
against 338 µs for float32 ``F.linear``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from lowbit.kernels.dispatch import Kernel, register
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lowbit_cpu.cpp"
MAX_M = 16  # above this, dequantise + GEMM (the reference) is faster


@functools.cache
def extension() -> ModuleType | str:
    """The compiled extension, or the reason it could not be built."""
    if os.environ.get("LOWBIT_NO_CPP"):
        return "disabled by LOWBIT_NO_CPP"
    try:
        from torch.utils.cpp_extension import load

        log.info("building lowbit's CPU kernels (once per machine) ...")
        return load(name="lowbit_cpu", sources=[str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: use the reference
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"the C++ kernels could not be built ({first})"


@torch.library.custom_op("lowbit::int_gemv_cpu", mutates_args=())
def int_gemv_cpu(x: Tensor, qdata: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, group: int,
                 out_features: int) -> Tensor:
    """``x @ dequant(W).T`` for x (M, K) float32 and a 2/4/8-bit integer weight, from its packed codes."""
    ext = extension()
    assert not isinstance(ext, str), ext
    zp = zero_point if zero_point is not None else qdata.new_empty(0)
    return ext.int_gemv(x.contiguous(), qdata, scale, zp, bits, group, out_features)


@int_gemv_cpu.register_fake
def _(x, qdata, scale, zero_point, bits, group, out_features):
    return x.new_empty((x.shape[0], out_features))


def _supports(weight: QuantizedWeight, activations: QuantSpec | None, device: torch.device) -> str | None:
    spec = weight.spec
    if activations is not None:
        return "weight-only"
    if spec.format != "int" or spec.bits not in (2, 4, 8):
        return f"integer 2/4/8-bit weights only, not {spec.describe()}"
    if spec.granularity == "tensor" or weight.g_idx is not None:
        return "per-group or per-channel scales in column order only (no g_idx)"
    if weight.group_size % (8 // spec.bits):
        return f"groups of {weight.group_size} do not fill whole bytes"
    ext = extension()
    return ext if isinstance(ext, str) else None


def _run(x: Tensor, prepared: dict, weight: QuantizedWeight, bias: Tensor | None, activations) -> Tensor:
    lead = x.shape[:-1]
    y = torch.ops.lowbit.int_gemv_cpu(x.reshape(-1, x.shape[-1]).float(), weight.qdata, weight.scale,
                                      weight.zero_point, weight.spec.bits, weight.group_size, weight.shape[0])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


INT_GEMV = Kernel("cpu-int-gemv", "cpu", supports=_supports, prepare=lambda w: {}, run=_run, max_m=MAX_M)
register(INT_GEMV)
