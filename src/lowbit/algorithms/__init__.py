"""Quantisation methods: a pure function core per method plus a small frozen config."""

from lowbit.algorithms.awq import AWQ, awq_search
from lowbit.algorithms.gptq import GPTQ, gptq_quantize
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.rtn import RTN, rtn_quantize
from lowbit.algorithms.smoothquant import SmoothQuant, smoothquant_scale

# The names the command line accepts for --method.
METHODS = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant}
# "awq+gptq", "smoothquant+gptq": the scales of the first, the rounding of GPTQ.
COMPOSITIONS = ("awq+gptq", "smoothquant+gptq")

__all__ = ["AWQ", "COMPOSITIONS", "GPTQ", "METHODS", "RTN", "HessianAccumulator", "SmoothQuant", "awq_search",
           "gptq_quantize", "rtn_quantize", "smoothquant_scale"]
