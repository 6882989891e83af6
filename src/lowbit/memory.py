"""Keeping the resident memory of a long quantisation run down (Linux; a no-op elsewhere).

Weights loaded from safetensors are views of a memory-mapped file. Once a layer's float
weights are replaced by quantised ones, their pages stay resident until the whole file
is unmapped. `release_pages` asks the kernel to reclaim them with
``madvise(MADV_PAGEOUT)``, which never loses data: a clean file page is simply read again
if anything touches it, an anonymous page is kept (or swapped). Between layers,
`trim_heap` hands the malloc heap's free pages back: the calibration chunks' tensors
(tens of MB each) live in the heap, not in their own mappings, and would otherwise leave
it fragmented and growing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys

from torch import Tensor

_MADV_PAGEOUT = 21


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def release_pages(tensor: Tensor) -> bool:
    """Ask the kernel to reclaim the whole pages of a CPU tensor's storage no longer needed; True if it agreed."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu":
        return False
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    first = -(-start // page) * page  # whole pages inside the storage only
    last = (start + size) // page * page
    if last <= first:
        return False
    return libc.madvise(first, last - first, _MADV_PAGEOUT) == 0


def trim_heap() -> bool:
    """Return the malloc heap's free pages to the system (glibc ``malloc_trim``); True if any were."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))
