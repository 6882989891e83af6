"""Quantised matmul kernels; `reference` is the pure-torch truth the others are tested against.

`dispatch.choose` picks the kernel for a call; `ops` holds the reference ``torch.library``
custom op; `gpu` registers the Triton kernels and the CUDA C++ ones of `cuda` (CUDA; the latter opt-in),
`cpu` the packed-integer CPU kernel.
"""

from lowbit.kernels.reference import quantized_linear
from lowbit.kernels import gpu as _gpu  # noqa: E402,F401  registers its kernels with the dispatcher
from lowbit.kernels import cpu as _cpu  # noqa: E402,F401

__all__ = ["quantized_linear"]
