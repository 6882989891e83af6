"""Keeping the resident memory of a long quantisation run down (Linux; a no-op elsewhere).

Weights loaded from safetensors are views of a memory-mapped file. Once a layer's float
weights are replaced by quantised ones, their pages stay resident until the whole file
is unmapped. `release_pages` drops them from this process with ``madvise(MADV_DONTNEED)``
when /proc/self/pagemap shows that every resident page of the range is a file page (not
a private copy made by a write): such a page is simply read again if anything touches
it, so nothing is lost. ``MADV_PAGEOUT``, tried otherwise, also never loses data, but the
kernel skips pages that other processes map too — the page cache of a model file that
another process has open — and on this machine it reclaimed none of them.
`drop_file_pages` does the same for a tensor still in use that will not be read for a
while (the embeddings, once the calibration tokens have gone through them). Between layers,
`trim_heap` hands the malloc heap's free pages back: the calibration chunks' tensors
(tens of MB each) live in the heap, not in their own mappings, and would otherwise leave
it fragmented and growing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import resource
import sys

from torch import Tensor

_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21
_PAGE_PRESENT = 1 << 63  # /proc/pid/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
_PAGE_SWAPPED = 1 << 62
_PAGE_FILE = 1 << 61  # a file page or shared anonymous page: dropping it from this process loses nothing


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


def _only_file_pages(first: int, last: int) -> bool:
    """Whether every page in [first, last) is a file page or absent (never a private or swapped one)."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(first // page * 8)
            entries = memoryview(pagemap.read((last - first) // page * 8)).cast("Q")
    except OSError:
        return False
    return len(entries) == (last - first) // page and all(
        (e & _PAGE_FILE) if e & _PAGE_PRESENT else not e & _PAGE_SWAPPED for e in entries)


def _whole_pages(tensor: Tensor) -> tuple[int, int] | None:
    """The page-aligned address range inside a CPU tensor's storage; None if it holds no whole page."""
    if _libc() is None or tensor.device.type != "cpu":
        return None
    storage = tensor.untyped_storage()
    return _page_range(storage.data_ptr(), storage.nbytes())


def _page_range(start: int, size: int) -> tuple[int, int] | None:
    """The whole pages inside [start, start + size); None if there is none (a neighbour may share the partial ones)."""
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = (start + size) // page * page
    return (first, last) if last > first else None


def drop_file_pages(tensor: Tensor) -> bool:
    """Drop a tensor's pages from this process if they are all file pages (read again if touched); True if done.

    Loses nothing, so it also suits tensors still in use that will not be read for a while.
    """
    pages = _whole_pages(tensor)
    if pages is None or not _only_file_pages(*pages):
        return False
    return _libc().madvise(pages[0], pages[1] - pages[0], _MADV_DONTNEED) == 0  # type: ignore[union-attr]


def release_pages(tensor: Tensor) -> bool:
    """Give back the whole pages of a CPU tensor's storage no longer needed, without losing data; True if done.

    File pages are dropped (`drop_file_pages`); otherwise the kernel is asked to reclaim
    the pages (``MADV_PAGEOUT``), which it may decline.
    """
    if drop_file_pages(tensor):
        return True
    pages = _whole_pages(tensor)
    if pages is None:
        return False
    return _libc().madvise(pages[0], pages[1] - pages[0], _MADV_PAGEOUT) == 0  # type: ignore[union-attr]


def discard_pages(tensor: Tensor) -> bool:
    """Hand back the whole pages under ``tensor``, a contiguous part of a larger storage whose contents there
    are not wanted any more (``MADV_DONTNEED``: private pages read back as zeros if touched again); True if done.
    """
    if _libc() is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    pages = _page_range(tensor.data_ptr(), tensor.numel() * tensor.element_size())
    if pages is None:
        return False
    return _libc().madvise(pages[0], pages[1] - pages[0], _MADV_DONTNEED) == 0  # type: ignore[union-attr]


def trim_heap() -> bool:
    """Return the malloc heap's free pages to the system (glibc ``malloc_trim``); True if any were."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's memory (VmHWM on Linux).

    Not ``getrusage``'s ``ru_maxrss`` on Linux: that survives ``exec``, so a process started
    by a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux >= 4.0), so `peak_rss_bytes` measures from
    now; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
