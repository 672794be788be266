"""glibc malloc settings for a long-running search process, applied once at start.

A serving process replaces its snapshot's arrays on every commit and its segments on every merge.
glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so after a few merges
arrays of a few MB come from the heap instead, are freed into it, and the heap's holes keep the
process's resident memory growing round after round of updates (bench.freshness_scale: 1.39× after
ten rounds of updating every product). A fixed threshold keeps every block over 128 KiB in a mapping
of its own, returned to the kernel when freed. Another allocator (tcmalloc, jemalloc), or a libc
without `mallopt`, is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD", "fix_mmap_threshold"]

_log = logging.getLogger(__name__)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's initial default, kept fixed


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fixes glibc's mmap threshold; True if glibc took it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not done:
        _log.info("malloc's mmap threshold left as it is (not glibc's malloc)")
    return done
