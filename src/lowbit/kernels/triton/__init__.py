"""Triton GPU kernels: W4A16 (int4 weight-only), NF4, and W8A8 (int8 × per-token int8).

Importing this package never needs triton: the layouts (`layout`) are pure torch and
the ``lowbit::*_triton`` custom ops are registered here, but the kernels themselves
(`jit`) are imported at their first launch. `available()` says whether they can run.
On a machine without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1,
set before the first launch), which is how the tests check them against
`lowbit.kernels.reference.quantized_linear`.

Use: ``p = prepare_w4a16(weight)`` once per device, then
``w4a16_linear(x, p, weight.group_size, bias)`` per call (likewise `prepare_nf4` /
`nf4_linear`, `prepare_w8a8` / `w8a8_linear`). ``*_unsupported(weight, activations)``
returns None when the kernel can run a weight, else the reason.
"""

from lowbit.kernels.triton.layout import (
    Prepared,
    nf4_unsupported,
    prepare_nf4,
    prepare_w4a16,
    prepare_w8a8,
    w4a16_unsupported,
    w8a8_unsupported,
)
from lowbit.kernels.triton.ops import (
    BlockConfig,
    available,
    int4_config,
    nf4_linear,
    w4a16_linear,
    w8a8_config,
    w8a8_linear,
)

__all__ = [
    "BlockConfig", "Prepared", "available", "int4_config", "nf4_linear", "nf4_unsupported", "prepare_nf4",
    "prepare_w4a16", "prepare_w8a8", "w4a16_linear", "w4a16_unsupported", "w8a8_config", "w8a8_linear",
    "w8a8_unsupported",
]
