"""How the process's allocator treats freed memory.

A calibrated conversion allocates and frees tensors of tens of megabytes for every piece of
images and every layer (activations, unfolded patches, float64 copies). glibc's ``malloc``
returns freed memory at the top of its heap to the system once more than its trim threshold
is free, and serves blocks above its (adaptive) mmap threshold with fresh ``mmap`` pages, so
the same memory is page-faulted in, zeroed, over and over: measured on MobileNetV2 (every 3x3
conv, 256 calibration images, 2-core AMD EPYC), 23 million page faults and 43 s of system time
in a 95 s conversion; with freed memory kept for reuse, 1.3 million faults, 4 s and 67 s wall,
the peak resident memory 1.74 -> 1.87 GB (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc's largest allowed mmap threshold).
_MMAP_THRESHOLD = 32 << 20
#: Free memory kept at the top of the heap before any is given back.
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Tell glibc's ``malloc`` to keep freed memory for reuse (up to 1 GiB at the heap's top)
    and to serve blocks up to 32 MiB from the heap, for the rest of the process. Memory freed
    is reused instead of page-faulted in anew; the peak resident memory grows a little (up to
    ~7 % measured: freed blocks are not given back between layers). Called by the command
    line, which owns its process; a Python program may call it too.

    Returns:
        Whether the settings took (False off glibc, e.g. on macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    )
