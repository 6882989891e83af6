"""Which kernel runs a quantised linear: by device, format, and the number of tokens M.

Kernels register here in priority order, each for one device type. For a call, the
first kernel of the input's device type whose ``supports(weight, activations, device)``
returns no reason and whose M range covers the call runs it; the reference op
(dequantise + ``F.linear``) is always last and always able — it is also the choice where
a kernel's M range ends (dequantise + GEMM wins at large M). A weight that no kernel of
its device can run at any M is named once in the log with the kernels' reasons, then
runs on the reference — never a crash.

A kernel's ``prepare`` turns the stored weight into the layout the kernel reads, once
per device; `QuantLinear` keeps the result, one per prepare function (kernels that share
one read the same layout, held once). A kernel may also ``bind`` a prepared weight: a
function of (x, bias) that `QuantLinear` keeps per (device, M) and calls instead of ``run``,
with whatever ``run`` works out from the weight on every call worked out once (a decode step
calls each layer once per token, each call a few µs of Python on top of tens of µs of work).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.kernels.ops import reference_op
from lowbit.scheme import QuantSpec
from lowbit.tensor import QuantizedWeight

log = logging.getLogger(__name__)

Prepared = dict[str, Tensor]


@dataclass(frozen=True)
class Kernel:
    name: str
    device_type: str  # "cpu", "cuda"
    # None when the kernel can run this weight on this device, else a short reason
    supports: Callable[[QuantizedWeight, QuantSpec | None, torch.device], str | None]
    prepare: Callable[[QuantizedWeight], Prepared]
    run: Callable[[Tensor, Prepared, QuantizedWeight, Tensor | None, QuantSpec | None], Tensor]
    # the kernel's range of tokens M, fixed or (a function of the weight) where it depends on the format
    min_m: int | Callable[[QuantizedWeight], int] = 1
    max_m: int | Callable[[QuantizedWeight], int] | None = None
    # (prepared, weight, activations) → a function of (x, bias) equal to ``run`` with those arguments, or None
    bind: Callable[[Prepared, QuantizedWeight, QuantSpec | None], Callable[[Tensor, Tensor | None], Tensor] | None] \
        | None = None

    def covers(self, m: int, weight: QuantizedWeight) -> bool:
        low = self.min_m(weight) if callable(self.min_m) else self.min_m
        high = self.max_m(weight) if callable(self.max_m) else self.max_m
        return m >= low and (high is None or m <= high)


REFERENCE = Kernel("reference", "any", supports=lambda w, a, d: None, prepare=lambda w: {},
                   run=lambda x, p, w, b, a: reference_op(x, w, b, a))

_KERNELS: list[Kernel] = []
_warned: set[tuple] = set()
_asked_for_reference = False  # within `reference_only`: the reference is the caller's choice, not a fallback
_generation = 0  # bumped by every change made through this module


def register(kernel: Kernel) -> None:
    """Add a kernel after those registered before it (replacing one of the same name)."""
    global _generation
    _KERNELS[:] = [*(k for k in _KERNELS if k.name != kernel.name), kernel]
    _generation += 1


def registry_state() -> tuple[int, int, int]:
    """Changes whenever the registered kernels do, so a remembered choice can tell it is stale
    (also when a test swaps or a benchmark empties the list)."""
    return id(_KERNELS), len(_KERNELS), _generation


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Within the block, every quantised linear runs on the reference kernel, as asked (no fallback warning), and
    every float one (`lowbit.nn.FloatLinear`) on ``F.linear``: the model computes what plain torch would."""
    global _KERNELS, _generation, _asked_for_reference
    saved, asked = _KERNELS, _asked_for_reference
    _KERNELS, _generation, _asked_for_reference = [], _generation + 1, True
    try:
        yield
    finally:
        _KERNELS, _generation, _asked_for_reference = saved, _generation + 1, asked


def kernels_enabled() -> bool:
    """False within `reference_only`: no kernel but torch's own runs."""
    return not _asked_for_reference


def kernels() -> list[Kernel]:
    return [*_KERNELS, REFERENCE]


def choose(weight: QuantizedWeight, activations: QuantSpec | None, device: torch.device, m: int,
           name: str = "a quantised linear") -> Kernel:
    """The kernel for ``m`` tokens through ``weight`` on ``device``."""
    device_type = device.type  # called on every forward: one attribute read, no list built
    candidates = 0
    reasons = []
    for kernel in _KERNELS:
        if kernel.device_type != device_type:
            continue
        candidates += 1
        reason = kernel.supports(weight, activations, device)
        if reason is None:
            if kernel.covers(m, weight):
                return kernel
        else:
            reasons.append(f"{kernel.name}: {reason}")
    key = (weight.spec, activations, device_type)
    if len(reasons) == candidates and key not in _warned and not _asked_for_reference:  # no kernel runs it at any M
        _warned.add(key)
        log.warning("%s (%s) runs on the reference kernel on %s%s", name, weight.spec.describe(), device.type,
                    f" ({'; '.join(reasons)})" if reasons else "")
    return REFERENCE
