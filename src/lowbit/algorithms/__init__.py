"""Quantisation methods: a pure function core per method plus a small frozen config."""

from lowbit.algorithms.gptq import GPTQ, gptq_quantize
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.rtn import RTN, rtn_quantize

# The names the command line accepts for --method.
METHODS = {"rtn": RTN, "gptq": GPTQ}

__all__ = ["GPTQ", "METHODS", "RTN", "HessianAccumulator", "gptq_quantize", "rtn_quantize"]
