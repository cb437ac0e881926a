"""The process's memory, as the OS sees it."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_mapping = 0  # calls of `mapping_large_blocks` functions running
_mapping_lock = threading.Lock()
P = ParamSpec("P")
R = TypeVar("R")


def release_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps a large build's temporaries otherwise (they count as RSS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def mapping_large_blocks(f: Callable[P, R]) -> Callable[P, R]:
    """`f` run with every heap block of 64 KiB or more given a mapping of its own from the OS (glibc's
    M_MMAP_THRESHOLD), then 32 MiB again (the ceiling of glibc's own threshold, which rises to it as mapped
    blocks are freed) once no such call is running: a load and a background rebuild may overlap. FAISS grows
    an IVF list's codes to the next power of two bytes: in a mapping the tail not yet written takes no RAM,
    in the heap it may land on pages that freed blocks left resident (benchmarks/results/serve-10m.md). Only
    around the index's bulk allocations (builds, loads, rebuilds): for the whole process, a request's
    temporaries were mapped and faulted in afresh, a cost in throughput
    (benchmarks/results/serve-1m-shipped-memory-ab.md)."""

    @functools.wraps(f)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        global _mapping
        with _mapping_lock:
            _mapping += 1
            _mmap_threshold(64 << 10)
        try:
            return f(*args, **kwargs)
        finally:
            with _mapping_lock:
                _mapping -= 1
                if not _mapping:
                    _mmap_threshold(32 << 20)

    return wrapped


def _mmap_threshold(size: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, size)
