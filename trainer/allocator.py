"""Keep freed memory in the process, so each update's buffers do not page-fault in anew.

On the CPU every torch tensor is a plain ``malloc``. glibc's malloc hands blocks of more than its mmap
threshold straight back to the OS on ``free`` and trims the top of its heap past a trim threshold, so the
activations and gradients of one update (megabytes each for a large MLP) are returned at the end of the
update and faulted in again, page by page, in the next one. For the (512, 784 → 1024 → 1024 → 10) MLP of
the benchmark that costs about 1 ms of a 22 ms update, in the elementwise work that first touches each
fresh buffer (measured: the step's work outside its matrix products fell from 2.2 ms to 1.0 ms).

``retain_freed_memory`` raises both thresholds with ``mallopt``, which is what an allocator such as
jemalloc or tcmalloc (the usual advice for CPU training) achieves by caching. Freed blocks up to
``MMAP_THRESHOLD`` then stay in the heap for the next update, and up to ``TRIM_THRESHOLD`` of free memory
at the heap's top is kept rather than returned. ``trainer fit`` and the benchmark call it; set
``HANDGRAD_MALLOC=system`` to leave malloc as it is. Outside glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit: bigger blocks are still mapped
TRIM_THRESHOLD = 256 * 2**20

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are raised."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("HANDGRAD_MALLOC", "").strip().lower() == "system" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; each call also turns off glibc's dynamic adjustment of that threshold
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
