"""Immutable index segments: doc ids and unit vectors on disk, searched by HNSW or exactly.

A commit writes a small `flat` segment (searched exactly: cheap to write, searchable at once);
compaction merges segments into an `hnsw` segment (FAISS `IndexHNSWFlat`, inner product).
Files are written to a temporary name, fsynced and renamed, so a segment either exists whole
or not at all; the manifest (in the store's SQLite database) says which segments are live.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import faiss
import numpy as np

__all__ = ["HnswParams", "Segment", "SegmentInfo", "top_k"]


@dataclasses.dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 512


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    name: str
    kind: str  # "flat" or "hnsw"
    count: int


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(name):
        with open(name, "wb") as f:
            np.save(f, array)

    _write_atomically(path, write)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


class Segment:
    def __init__(self, directory: Path, info: SegmentInfo):
        self.info = info
        self.ids = np.load(directory / f"{info.name}.ids.npy")
        self.vectors = np.load(directory / f"{info.name}.vectors.npy")
        self.index = faiss.read_index(str(directory / f"{info.name}.hnsw")) if info.kind == "hnsw" else None
        if len(self.ids) != info.count or len(self.vectors) != info.count:
            raise ValueError(f"segment {info.name} holds {len(self.ids)} ids for a manifest count of {info.count}")

    @staticmethod
    def files(name: str) -> list[str]:
        return [f"{name}.ids.npy", f"{name}.vectors.npy", f"{name}.hnsw"]

    @classmethod
    def write(cls, directory: Path, name: str, ids: np.ndarray, vectors: np.ndarray, kind: str,
              params: HnswParams = HnswParams()) -> SegmentInfo:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(vectors.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params.ef_construction
            index.add(vectors)
            _write_atomically(directory / f"{name}.hnsw", lambda tmp: faiss.write_index(index, tmp))
        elif kind != "flat":
            raise ValueError(f"unknown segment kind {kind!r}")
        _save_npy(directory / f"{name}.vectors.npy", vectors)
        _save_npy(directory / f"{name}.ids.npy", ids)  # last: its presence means the segment is whole
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
