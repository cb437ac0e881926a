"""The process's memory, as the OS sees it."""

from __future__ import annotations

import contextlib
import ctypes


def release_memory() -> None:
    """Hand freed heap back to the OS: glibc keeps a large build's temporaries otherwise (they count as RSS)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
