"""Immutable index segments: doc ids and unit vectors on disk, searched by HNSW or exactly.

Which of a segment's positions are live the store keeps as a bitmap per segment, changed by commits;
its docs' shops and filterable values as columns built with the segment (search.fields). A search
hands the bitmaps over as they are.

A commit writes a small `flat` segment (searched exactly: cheap to write, searchable at once);
compaction merges segments into one of the index's kind (`SegmentParams.kind`, fixed per index):

- `hnsw`: FAISS `IndexHNSWFlat`, inner product; the graph owns the float vectors.
- `hnsw_sq8`: FAISS `IndexHNSWSQ`, 8-bit scalar quantisation (a quarter of the floats' bytes).
- `ivf_pq`: FAISS IVF-PQ from `index_factory` (max(d/8, 16) bytes a vector, in inverted lists).

The compressed kinds ask their index for a pool of candidates and re-score it exactly with the
float vectors of the memory-mapped file, so their ranking is the float ranking of that pool.
Files are written to a temporary name, fsynced and renamed, so a segment either exists whole
or not at all; the manifest (in the store's SQLite database) says which segments are live.
Each segment carries the CRC-32 of its files (`NAME.sums.json`), verified whenever it is opened:
a flipped bit or a truncated file is an error, never a silently different search result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path

import faiss
import numpy as np

from search import hugepages
from search.index.errors import StoreError

__all__ = ["SEGMENT_KINDS", "Segment", "SegmentCorrupted", "SegmentInfo", "SegmentParams", "filtered_ef", "top_k"]

SEGMENT_KINDS = ("hnsw", "hnsw_sq8", "ivf_pq")  # what compaction builds; a commit writes "flat"
# Candidates a compressed kind hands to exact re-scoring: max(ef_search, factor × k).
RESCORE_FACTOR = {"hnsw_sq8": 2, "ivf_pq": 4}


@dataclasses.dataclass(frozen=True)
class SegmentParams:
    """How compaction builds a segment: the index's kind and its FAISS parameters."""

    kind: str = "hnsw"
    m: int = 16  # HNSW graph degree
    ef_construction: int = 512
    nprobe: int = 32  # ivf_pq: inverted lists probed per search
    # ivf_pq: a merge of fewer vectors than this stays flat (exact): 8-bit PQ codebooks need
    # about 39 × 256 training points, and such a segment is cheap to search exactly anyway.
    ivf_min: int = 10_000

    def __post_init__(self):
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {', '.join(SEGMENT_KINDS)}, not {self.kind!r}")

    def kind_for(self, count: int) -> str:
        """The kind a merge of `count` vectors is written as."""
        return "flat" if self.kind == "ivf_pq" and count < max(2, self.ivf_min) else self.kind


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    name: str
    kind: str  # "flat" or one of SEGMENT_KINDS
    count: int


class SegmentCorrupted(StoreError, ValueError):
    """A segment file does not match the checksum written with it (or is missing)."""


def _write_atomically(path: Path, write, publish: bool = True) -> int:
    """Writes through a fsynced temporary file, renamed into place when `publish`; the CRC-32."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        crc = zlib.crc32(f.read())
        os.fsync(f.fileno())
    if publish:
        os.replace(tmp, path)
    return crc


def _save_npy(path: Path, array: np.ndarray, publish: bool = True) -> int:
    def write(name):
        with open(name, "wb") as f:
            np.save(f, array)

    return _write_atomically(path, write, publish)


def _verified(directory: Path, name: str, sums: dict[str, int] | None) -> Path:
    """The file's path once its CRC-32 matches `sums` (None: a segment written before checksums).
    Read in chunks: a segment's gigabytes never sit in memory twice."""
    path = directory / name
    crc = 0
    try:
        with open(path, "rb") as f:
            while sums is not None and (chunk := f.read(1 << 24)):
                crc = zlib.crc32(chunk, crc)
    except FileNotFoundError as e:
        raise SegmentCorrupted(f"{path} is missing") from e
    if sums is not None and crc != sums.get(name):
        raise SegmentCorrupted(f"{path} does not match its checksum (corrupted or truncated)")
    return path


def _index_file(name: str, kind: str) -> str:
    return f"{name}.hnsw" if kind == "hnsw" else f"{name}.faiss"  # .hnsw: as stores before kinds had it


def _build(vectors: np.ndarray, params: SegmentParams, kind: str) -> faiss.Index:
    n, dim = vectors.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.m, faiss.METRIC_INNER_PRODUCT)
    elif kind == "hnsw_sq8":
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, params.m, faiss.METRIC_INNER_PRODUCT)
    else:
        # √n lists; d/8 sub-quantizers (8 dims each) of 8 bits, at least 16 (a low-dimensional vector
        # in d/8 bytes loses too much), fewer bits for a tiny segment. "np": no polysemous training,
        # which is for Hamming filtering we do not use and is 30× slower.
        nlist = max(1, min(65_536, int(np.sqrt(n))))
        sub = next(m for m in range(max(dim // 8, min(dim, 16)), 0, -1) if dim % m == 0)
        bits = min(8, int(np.log2(n)))
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{sub}x{bits}np", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).nprobe = params.nprobe
    if kind != "ivf_pq":
        index.hnsw.efConstruction = params.ef_construction
    if not index.is_trained:
        sample = min(n, max(50 * int(np.sqrt(n)), 50_000))  # seeded: the same vectors, the same index
        rows = np.sort(np.random.default_rng(0).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.train(vectors[rows])
    index.add(vectors)
    return index


def filtered_ef(kind: str, count: int, k: int, ef_search: int, allowed: int) -> int:
    """The beam of a graph search among `allowed` of a segment's `count` positions. It holds passing
    and filtered-out nodes alike: to hold the candidates wanted that pass, it is widened by the
    inverse of the share that passes."""
    wanted = k * RESCORE_FACTOR.get(kind, 1)
    pool = k if kind == "hnsw" else max(ef_search, wanted)
    return max(ef_search, pool, -(-wanted * count // max(allowed, 1)))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


class Segment:
    def __init__(self, directory: Path, info: SegmentInfo, require_sums: bool = True):
        """Loads and verifies a segment; `require_sums` False accepts one written before checksums."""
        self.info = info
        sums_path = directory / f"{info.name}.sums.json"
        try:
            sums = json.loads(sums_path.read_text())
        except FileNotFoundError as e:
            if require_sums:
                raise SegmentCorrupted(f"{sums_path} is missing") from e
            sums = None
        except ValueError as e:
            raise SegmentCorrupted(f"{sums_path} is unreadable: {e}") from e
        try:
            self.ids = np.load(_verified(directory, f"{info.name}.ids.npy", sums))
            # Verified, then memory-mapped: the float vectors live in the page cache (which the OS can
            # drop), touched only by exact search, re-scoring and merges; an HNSW graph owns its copy.
            self.vectors = np.load(_verified(directory, f"{info.name}.vectors.npy", sums), mmap_mode="r")
            self.index = None
            if info.kind != "flat":
                self.index = faiss.read_index(str(_verified(directory, _index_file(info.name, info.kind), sums)))
                hugepages.advise_index(self.index)
        except (OSError, ValueError, EOFError, RuntimeError) as e:  # unreadable, or removed since verified
            if isinstance(e, SegmentCorrupted):
                raise
            files = (f"{info.name}.ids.npy", f"{info.name}.vectors.npy") + \
                ((_index_file(info.name, info.kind),) if info.kind != "flat" else ())
            if not all((directory / name).exists() for name in files):  # a compaction removed it: retried
                e = FileNotFoundError(f"segment {info.name} was removed from {directory}")
            raise SegmentCorrupted(f"segment {info.name} in {directory} cannot be read: {e}") from e
        self._floats = np.asarray(self.vectors)  # the same memory map, as a plain array for FAISS's kernels
        # The ids in order, for `locate`: made here, not on first use, since searches run in threads.
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        if len(self.ids) != info.count or len(self.vectors) != info.count:
            raise SegmentCorrupted(f"segment {info.name} holds {len(self.ids)} ids for a manifest count of {info.count}")

    @staticmethod
    def files(name: str) -> list[str]:
        return [f"{name}.ids.npy", f"{name}.vectors.npy", f"{name}.hnsw", f"{name}.faiss", f"{name}.sums.json"]

    @classmethod
    def write(cls, directory: Path, name: str, ids: np.ndarray, vectors: np.ndarray, kind: str,
              params: SegmentParams = SegmentParams()) -> SegmentInfo:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        sums = {}
        if kind in SEGMENT_KINDS:
            index = _build(vectors, params, kind)
            path = directory / _index_file(name, kind)
            sums[path.name] = _write_atomically(path, lambda tmp: faiss.write_index(index, tmp))
            del index
        elif kind != "flat":
            raise ValueError(f"unknown segment kind {kind!r}")
        sums[f"{name}.vectors.npy"] = _save_npy(directory / f"{name}.vectors.npy", vectors)
        ids_path = directory / f"{name}.ids.npy"
        sums[ids_path.name] = _save_npy(ids_path, ids, publish=False)
        _write_atomically(directory / f"{name}.sums.json", lambda tmp: Path(tmp).write_text(json.dumps(sums)))
        os.replace(ids_path.with_name(ids_path.name + ".tmp"), ids_path)  # last: its presence means whole
        return SegmentInfo(name, kind, len(ids))

    def locate(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which of the sorted doc ids `docs` this segment holds, and their positions in it)."""
        at = np.searchsorted(self._sorted, docs)
        found = at < len(self._sorted)
        found[found] = self._sorted[at[found]] == docs[found]
        return found, self._order[at[found]]

    def search_bitmap(self, query: np.ndarray, k: int, ef_search: int, bits: np.ndarray,
                      allowed: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, doc ids) by the segment's index among the positions set in `bits` (packed,
        little bit order; `allowed` of them). The bitmap is handed to FAISS as it is: nothing is
        rebuilt. A compressed kind's candidates are re-scored with the float vectors."""
        kind = self.info.kind
        pool = k if kind == "hnsw" else max(ef_search, k * RESCORE_FACTOR.get(kind, 1))
        if kind == "ivf_pq":
            params = faiss.SearchParametersIVF()
            params.nprobe = faiss.extract_index_ivf(self.index).nprobe
        else:
            params = faiss.SearchParametersHNSW()
            params.efSearch = self.filtered_ef(k, ef_search, allowed)
        selector = None  # held here: faiss does not own it, nor the bitmap under it
        if allowed < self.info.count:
            selector = faiss.IDSelectorBitmap(self.info.count, faiss.swig_ptr(bits))
            params.sel = selector
        scores, positions = self.index.search(query.reshape(1, -1), pool, params=params)
        keep = positions[0] >= 0
        if kind != "hnsw":
            return self.search_positions(query, k, positions[0][keep])
        return scores[0][keep], self.ids[positions[0][keep]]

    def filtered_ef(self, k: int, ef_search: int, allowed: int) -> int:
        return filtered_ef(self.info.kind, self.info.count, k, ef_search, allowed)

    def search_positions(self, query: np.ndarray, k: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, doc ids) exactly, over the given positions only (read from the memory map)."""
        if not len(positions):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores = self.inner_products(query, positions)
        best = top_k(scores, k)
        return scores[best], self.ids[positions[best]]

    def inner_products(self, query: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """query · vectors[positions], each row read once straight from the memory map by FAISS's
        kernel: no gathered copy (a 5,000-row gather and product took 1.5 ms at 1M vectors, this 0.55)."""
        positions = np.ascontiguousarray(positions, np.int64)
        query = np.ascontiguousarray(query, np.float32)
        if positions.min() < 0 or positions.max() >= self.info.count or query.shape != (self.vectors.shape[1],):
            raise IndexError(f"positions or query out of range for segment {self.info.name}")
        scores = np.empty(len(positions), np.float32)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(scores), faiss.swig_ptr(query), faiss.swig_ptr(self._floats),
                                         faiss.swig_ptr(positions), self.vectors.shape[1], 1, len(positions))
        return scores
