"""The process's memory, as the OS sees it."""

from __future__ import annotations

import contextlib
import ctypes
import functools

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def release_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps a large build's temporaries otherwise (they count as RSS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@functools.cache
def map_large_blocks(threshold: int = 64 << 10) -> None:
    """Give every heap block of `threshold` bytes or more a mapping of its own from the OS (glibc's
    M_MMAP_THRESHOLD; by default it rises to 32 MB as mapped blocks are freed, and blocks below it come
    from the heap). FAISS grows an IVF list's codes to the next power of two bytes: in a mapping the tail
    not yet written takes no RAM, in the heap it may reuse pages that freed blocks left resident
    (benchmarks/results/serve-10m.md: about 10% of a 10M index)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)
