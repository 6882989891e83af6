"""Timing shared by the GPU benches (bench/gpu_kernels.py, bench/gpu_e8p.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_us(fn: Callable[[], object], smoke: bool, warmup_ms: int, rep_ms: int) -> float:
    """Median microseconds of one call of ``fn``: ``triton.testing.do_bench`` (device events, L2 flushed
    before each repetition) on a GPU; with ``smoke`` (CPU, Triton interpreter) the wall-clock median
    of 3 calls after one warm-up call, which is a check that the code runs, not a measurement."""
    if smoke:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e6 * statistics.median(times)
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
