"""Quantisation methods: a pure function core per method plus a small frozen config."""

from lowbit.algorithms.rtn import RTN, rtn_quantize

METHODS = {"rtn": RTN}

__all__ = ["METHODS", "RTN", "rtn_quantize"]
