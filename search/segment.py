"""Immutable index segments: doc ids and unit vectors on disk, searched by HNSW or exactly.

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
            self.vectors = np.load(io.BytesIO(_verified(directory, f"{info.name}.vectors.npy", sums)))
            self.index = None
            if info.kind == "hnsw":
                data = _verified(directory, f"{info.name}.hnsw", sums)
                self.index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        except (ValueError, EOFError, RuntimeError) as e:  # a legacy segment's unreadable file
            if isinstance(e, SegmentCorrupted):
                raise
            raise SegmentCorrupted(f"segment {info.name} in {directory} cannot be read: {e}") from e
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

    def search(self, query: np.ndarray, k: int, ef_search: int, allowed: np.ndarray,
               exact_below: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, doc ids) among the positions `allowed` (bool mask) marks.

        Filtered HNSW loses recall when few positions are allowed, so a small allowed set
        (fewer than `exact_below`) is searched exactly instead.
        """
        n_allowed = int(allowed.sum())
        if n_allowed == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if self.index is None or n_allowed < exact_below:
            return self.search_exact(query, k, allowed)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef_search, k)
        bits = np.packbits(allowed, bitorder="little")
        selector = None  # held here: faiss does not own it, nor the bitmap under it
        if n_allowed < len(allowed):
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bits))
            params.sel = selector
        scores, positions = self.index.search(query.reshape(1, -1), k, params=params)
        keep = positions[0] >= 0
        return scores[0][keep], self.ids[positions[0][keep]]

    def search_exact(self, query: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.flatnonzero(allowed)
        scores = self.vectors[positions] @ query
        best = top_k(scores, k)
        return scores[best], self.ids[positions[best]]
