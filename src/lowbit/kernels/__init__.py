"""Quantised matmul kernels; `reference` is the pure-torch truth the others are tested against.

`dispatch.choose` picks the kernel for a call; `ops` holds the ``torch.library`` custom ops.
"""

from lowbit.kernels.reference import quantized_linear

__all__ = ["quantized_linear"]
