"""Keep freed memory in the process instead of handing it back to the operating system (glibc only).

A training step allocates the same large tensors every time: activations, the (B, T, V) logits, gradients.
glibc's malloc serves a block above its mmap threshold (128 KB at first, growing to at most 32 MB) with a
fresh `mmap` and returns it to the OS with `munmap` as soon as it is freed, and it trims the top of the heap
once more than 128 KB there is free. Either way the next step gets memory the OS must zero and map again, one
page fault per 4 KB page, measured at ~2.4 GB/s against ~26 GB/s into memory already mapped (DESIGN.md).
Three settings (mallopt(3)) stop that:

    M_MMAP_MAX = 0             never serve a block with its own mmap: every block comes from the heap
    M_TRIM_THRESHOLD = 2^31-1  never give the free top of the heap back to the OS
    M_TOP_PAD = 1 GiB          when the heap must grow, grow it by 1 GiB more (address space; the OS maps a
                               page only when it is first written)

The price: the process keeps its peak memory mapped until it exits (what `ps` shows as RSS stays at the
peak). Numbers do not change, only where the bytes live. The environment variables MALLOC_MMAP_MAX_,
MALLOC_TRIM_THRESHOLD_ and MALLOC_TOP_PAD_ do the same from outside the process.
Set MINIMODELS_REUSE_MEMORY=0 to leave the allocator as the process found it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # mallopt's parameter numbers (glibc malloc.h)
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1, M_TOP_PAD: 1 << 30}


def reuse_freed_memory() -> bool:
    """Apply SETTINGS through glibc's mallopt. Returns True if they were applied; False off glibc (macOS,
    musl, Windows) or when MINIMODELS_REUSE_MEMORY=0. Calling it again is harmless."""
    if os.environ.get("MINIMODELS_REUSE_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())  # mallopt returns 1 on success
