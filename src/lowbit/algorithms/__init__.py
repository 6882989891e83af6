"""Quantisation methods: a pure function core per method plus a small frozen config."""

from typing import Any

from lowbit.algorithms.awq import AWQ, awq_search
from lowbit.algorithms.gptq import GPTQ, gptq_quantize
from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.algorithms.rtn import RTN, rtn_quantize
from lowbit.algorithms.smoothquant import SmoothQuant, smoothquant_scale
from lowbit.errors import LowbitError

# The names the command line accepts for --method.
METHODS = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant}
# "awq+gptq", "smoothquant+gptq": the scales of the first, the rounding of GPTQ.
COMPOSITIONS = ("awq+gptq", "smoothquant+gptq")
METHOD_NAMES = ("rtn", "gptq", "awq", "awq+gptq", "smoothquant", "smoothquant+gptq")


def method_from_name(name: str, **options: Any):  # -> method config
    """The method config for --method NAME: rtn, gptq, awq, smoothquant, or awq+gptq / smoothquant+gptq
    (the first's scales, GPTQ's rounding), with the command line's options by their keyword names
    (``act_order``, ``alpha``, ``propagate``, …). Options a method does not have are refused when given."""
    if name not in METHODS and name not in COMPOSITIONS:
        raise LowbitError(f"unknown method {name!r}; this version has {', '.join(METHOD_NAMES)}.")
    given = {k: v for k, v in options.items() if v is not None}
    gptq_keys = ("act_order", "static_groups", "damp", "block_size", "true_sequential")
    own = {"smoothquant": ("alpha", "search_alpha", "propagate"), "awq": ("clip", "propagate"), "gptq": gptq_keys,
           "rtn": ()}
    first, _, second = name.partition("+")
    allowed = {*own[first], *(gptq_keys if second else ()), *(("calib_dtype",) if name != "rtn" else ())}
    if second:  # GPTQ's pass makes the next layer's inputs
        allowed.discard("propagate")
    stray = sorted(k for k in given if k not in allowed)
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        raise LowbitError(f"{flag} does not apply to --method {name}.")
    gptq = GPTQ(**{k: v for k, v in given.items() if k in (*gptq_keys, "calib_dtype")}) if "gptq" in name else None
    dtype = {"calib_dtype": given["calib_dtype"]} if "calib_dtype" in given else {}
    extra = {k: given[k] for k in ("clip", "alpha", "propagate") if k in given}
    if first == "awq":
        return AWQ(gptq=gptq, **dtype, **extra)
    if first == "smoothquant":
        return SmoothQuant(gptq=gptq, search=bool(given.get("search_alpha")), **dtype, **extra)
    return gptq if gptq is not None else METHODS[name]()

__all__ = ["AWQ", "COMPOSITIONS", "GPTQ", "METHODS", "METHOD_NAMES", "RTN", "HessianAccumulator", "SmoothQuant", "awq_search",
           "gptq_quantize", "method_from_name", "rtn_quantize", "smoothquant_scale"]
