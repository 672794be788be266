"""Huge pages for a loaded index's graph and codes: fewer TLB misses on HNSW's random reads.

An HNSW search reads a few thousand vectors at random places. On 4 KB pages nearly each read misses
the TLB once the index outgrows the caches: an 8-bit HNSW query at 1M vectors took 1.8 ms on 4 KB
pages and 1.0 ms on 2 MB ones (bench/results/scale.json). FAISS allocates with plain malloc, so the
ranges are advised after loading: MADV_HUGEPAGE, then MADV_COLLAPSE (Linux 6.1) to move what is
already there onto huge pages now rather than whenever khugepaged gets to it. Whatever the kernel
refuses (no THP, an older kernel) leaves the index on small pages, as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

import faiss

__all__ = ["advise", "advise_index", "huge_bytes"]

_log = logging.getLogger(__name__)
HUGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
_libc = None
_warned = False


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise


def advise(address: int, nbytes: int) -> bool:
    """Puts the 2 MB-aligned part of [address, address + nbytes) on huge pages; True if the kernel did."""
    start, end = _aligned(address, nbytes)
    if end <= start:
        return False
    madvise = _madvise()
    if madvise(start, end - start, MADV_HUGEPAGE) or madvise(start, end - start, MADV_COLLAPSE):
        global _warned
        if not _warned:  # once a process: every segment would say the same
            _warned = True
            _log.warning("the kernel keeps the index on 4 KB pages (madvise errno %d; THP: %s): HNSW searches "
                         "of a million vectors run about 1.7x slower", ctypes.get_errno(), _thp_mode())
        return False
    return True


def _aligned(address: int, nbytes: int) -> tuple[int, int]:
    """The 2 MB-aligned part of [address, address + nbytes): what huge pages can hold."""
    return -(-address // HUGE) * HUGE, (address + nbytes) // HUGE * HUGE


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def advise_index(index: faiss.Index) -> int:
    """Advises an HNSW index's vector codes and graph; returns the bytes now on huge pages."""
    if not isinstance(index, faiss.IndexHNSW):
        return 0
    storage = faiss.downcast_index(index.storage)
    hnsw = index.hnsw
    ranges = [(storage.codes.data(), storage.codes.size()),
              (hnsw.neighbors.data(), hnsw.neighbors.size() * 4),  # storage_idx_t: int32
              (hnsw.offsets.data(), hnsw.offsets.size() * 8)]
    done = 0
    for pointer, nbytes in ranges:
        if advise(int(pointer), nbytes):
            start, end = _aligned(int(pointer), nbytes)
            done += end - start
    return done


def huge_bytes(address: int, nbytes: int) -> int:
    """How much of [address, address + nbytes) the kernel holds on huge pages (/proc/self/smaps, which
    lists an advised part of a mapping as a mapping of its own)."""
    inside, total = False, 0
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                low, high = (int(x, 16) for x in first.split("-"))
                inside = low < address + nbytes and address < high
            elif inside and first == "AnonHugePages:":
                total += int(line.split()[1]) * 1024
    return total
