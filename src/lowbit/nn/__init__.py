"""Modules that run quantised weights."""

from lowbit.nn.quant_linear import QuantLinear, quantized_modules

__all__ = ["QuantLinear", "quantized_modules"]
