"""Immutable index segments: doc ids and unit vectors on disk, searched by HNSW or exactly.

Which of a segment's positions are live, and which belong to a shop, the store keeps as
bitmaps and postings maintained at commit; a search hands them over as they are.

A commit writes a small `flat` segment (searched exactly: cheap to write, searchable at once);
compaction merges segments into an `hnsw` segment (FAISS `IndexHNSWFlat`, inner product).
Files are written to a temporary name, fsynced and renamed, so a segment either exists whole
or not at all; the manifest (in the store's SQLite database) says which segments are live.
Each segment carries the CRC-32 of its files (`NAME.sums.json`), verified whenever it is opened:
a flipped bit or a truncated file is an error, never a silently different search result.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zlib
from pathlib import Path

import faiss
import numpy as np

__all__ = ["HnswParams", "Segment", "SegmentCorrupted", "SegmentInfo", "top_k"]


@dataclasses.dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 512


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    name: str
    kind: str  # "flat" or "hnsw"
    count: int


class SegmentCorrupted(ValueError):
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


def _verified(directory: Path, name: str, sums: dict[str, int] | None) -> bytes:
    """The file's bytes, checked against `sums` (None: a segment written before checksums)."""
    path = directory / name
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise SegmentCorrupted(f"{path} is missing") from e
    if sums is not None and zlib.crc32(data) != sums.get(name):
        raise SegmentCorrupted(f"{path} does not match its checksum (corrupted or truncated)")
    return data


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
            self.ids = np.load(io.BytesIO(_verified(directory, f"{info.name}.ids.npy", sums)))
            # Verified, then memory-mapped: the float vectors live in the page cache (which the OS can
            # drop), touched only by exact search and merges; an HNSW segment's index owns its copy.
            _verified(directory, f"{info.name}.vectors.npy", sums)
            self.vectors = np.load(directory / f"{info.name}.vectors.npy", mmap_mode="r")
            self.index = None
            if info.kind == "hnsw":
                data = _verified(directory, f"{info.name}.hnsw", sums)
                self.index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        except (ValueError, EOFError, RuntimeError) as e:  # a legacy segment's unreadable file
            if isinstance(e, SegmentCorrupted):
                raise
            raise SegmentCorrupted(f"segment {info.name} in {directory} cannot be read: {e}") from e
        # The ids in order, for `locate`: made here, not on first use, since searches run in threads.
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        if len(self.ids) != info.count or len(self.vectors) != info.count:
            raise SegmentCorrupted(f"segment {info.name} holds {len(self.ids)} ids for a manifest count of {info.count}")

    @staticmethod
    def files(name: str) -> list[str]:
        return [f"{name}.ids.npy", f"{name}.vectors.npy", f"{name}.hnsw", f"{name}.sums.json"]

    @classmethod
    def write(cls, directory: Path, name: str, ids: np.ndarray, vectors: np.ndarray, kind: str,
              params: HnswParams = HnswParams()) -> SegmentInfo:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        sums = {}
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(vectors.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
            index.add(vectors)
            sums[f"{name}.hnsw"] = _write_atomically(directory / f"{name}.hnsw", lambda tmp: faiss.write_index(index, tmp))
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
        """Top-k (scores, doc ids) by HNSW among the positions set in `bits` (packed, little bit
        order; `allowed` of them). The bitmap is handed to FAISS as it is: nothing is rebuilt."""
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef_search, k)
        selector = None  # held here: faiss does not own it, nor the bitmap under it
        if allowed < self.info.count:
            selector = faiss.IDSelectorBitmap(self.info.count, faiss.swig_ptr(bits))
            params.sel = selector
        scores, positions = self.index.search(query.reshape(1, -1), k, params=params)
        keep = positions[0] >= 0
        return scores[0][keep], self.ids[positions[0][keep]]

    def search_positions(self, query: np.ndarray, k: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, doc ids) exactly, over the given positions only (read from the memory map)."""
        if not len(positions):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        scores = self.vectors[positions] @ query
        best = top_k(scores, k)
        return scores[best], self.ids[positions[best]]
