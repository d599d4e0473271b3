"""Giving freed memory back to the operating system."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Hand the heap pages glibc holds free back to the OS (`malloc_trim`).

    glibc keeps freed blocks below its mmap threshold (up to 32 MB) in the heap for reuse; a pass
    that frees many such blocks while keeping others (a layer's float weights and temporaries,
    freed, between the quantized layers, kept) leaves resident memory far above what is live.
    Called after each decoder layer of a layer-by-layer pass and after passes that free a lot.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
