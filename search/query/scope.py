"""What a query may return: a shop and a filter as a sorted set of live docs, and that set per segment
(positions for exact search, a bitmap for filtered graph search). Each is made once per generation
and kept for the next queries of the same scope, so a query reads them as they are."""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import numpy as np

from search.filters import Filter
from search.index.snapshot import Snapshot, bitmap
from search.segment import Segment

__all__ = ["CACHE_SIZE", "Scope", "Scopes", "bitmap", "positions"]

CACHE_SIZE = 64  # scopes' doc sets, positions or bitmaps kept, over all generations; oldest dropped first


class Scope(NamedTuple):
    key: tuple  # (shop, filter key)
    docs: np.ndarray  # sorted live doc ids


def positions(seg: Segment, docs: np.ndarray) -> np.ndarray:
    """The positions in the segment of those of the doc ids `docs` it holds."""
    return seg.locate(docs)[1]


class Scopes:
    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._lock = threading.Lock()
        self._cache: dict[tuple, object] = {}  # (generation, scope key, maker) → made; oldest first

    def of(self, view: Snapshot, shop_id: str | None, filter: Filter | None) -> Scope | None:
        """The scope of a shop and a filter (each optional); None when a query may return any doc. A
        shop's docs come from the segments' shop columns, a filter's from its fields (search.filters)."""
        if filter is None and shop_id is None:
            return None
        key = (shop_id, None if filter is None else filter.key)

        def evaluate():
            if filter is None:
                return view.shop_docs(shop_id)
            docs = filter.evaluate(view.fields, view.shop_docs)
            if shop_id is not None:
                docs = np.intersect1d(docs, view.shop_docs(shop_id), assume_unique=True)
            return docs
        return Scope(key, self._cached(view, key, "docs", evaluate))

    def per_segment(self, view: Snapshot, scope: Scope, make: Callable[[Segment, np.ndarray], object]) -> list:
        """The scope's docs in each segment as `make` puts them (`positions` or `bitmap`)."""
        return self._cached(view, scope.key, make, lambda: [make(seg, scope.docs) for seg in view.segments])

    def _cached(self, view: Snapshot, key: tuple, kind, make):
        key = (view.generation, key, kind)
        with self._lock:
            cached = self._cache.get(key)
        if cached is None:
            cached = make()
            with self._lock:
                self._cache[key] = cached
                while len(self._cache) > self.size:
                    self._cache.pop(next(iter(self._cache)))
        return cached
