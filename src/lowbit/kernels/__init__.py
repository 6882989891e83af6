"""Quantised matmul kernels; `reference` is the pure-torch truth the others are tested against."""

from lowbit.kernels.reference import quantized_linear

__all__ = ["quantized_linear"]
