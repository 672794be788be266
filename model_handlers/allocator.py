"""Which malloc this process runs on: torch on CPU is about twice as fast on tcmalloc as on glibc's.

glibc serves buffers over its mmap threshold (32 MB at most) with a fresh mapping and unmaps them on
free, so every forward pass of a batch page-faults its large activations in again: here nearly half
of the model's CPU time was the kernel zeroing pages (`python -m bench.allocator`, the packaged
backend: 35 images/s on glibc, 89 on tcmalloc). tcmalloc keeps freed memory for reuse. It has to be
loaded before the interpreter starts (LD_PRELOAD), so the worker image and the Makefile set it, and a
CPU backend loaded without it says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["TCMALLOC", "malloc_in_use", "warn_without_tcmalloc"]

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # Debian/Ubuntu: libtcmalloc-minimal4
_KNOWN = ("tcmalloc", "jemalloc", "mimalloc")


def malloc_in_use(maps: str | None = None) -> str:
    """`tcmalloc`, `jemalloc` or `mimalloc` when one is mapped into this process, else `glibc`."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux: nothing to say
            return "unknown"
    for name in _KNOWN:
        if f"/lib{name}" in maps:
            return name
    return "glibc"


def warn_without_tcmalloc(log: logging.Logger) -> None:
    malloc = malloc_in_use()
    if malloc not in ("tcmalloc", "unknown"):
        log.warning("torch runs on the CPU with %s malloc, about half the speed it has on tcmalloc: "
                    "install libtcmalloc-minimal4 and start with LD_PRELOAD=%s", malloc, TCMALLOC)
