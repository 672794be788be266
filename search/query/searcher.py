"""Runs a query on a store's current snapshot: vector, lexical or hybrid search, facets, and the hits.

A vector query is planned per segment (search.query.planner) over its scope (search.query.scope);
each segment's top k are merged. A lexical query is BM25 in the catalog's FTS5 index; a hybrid one
fuses both lists by rank (search.hybrid). Hits are filled in from the catalog, and a doc tombstoned
since the search is dropped, never returned stale.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from search.filters import Filter
from search.hybrid import BM25_WEIGHTS, fts_query, fuse, fusion_window
from search.index import catalog
from search.index.catalog import Catalog
from search.index.errors import IndexMismatch
from search.index.reader import Reader
from search.index.settings import StoreMeta
from search.index.snapshot import Snapshot, unpack
from search.query import planner
from search.query.scope import Scope, Scopes, bitmap, positions
from search.segment import Segment, top_k

__all__ = ["Hit", "LEXICAL_IN_LIST", "Searcher"]

LEXICAL_IN_LIST = 20_000  # a keyword search's scope up to this many docs is passed to SQLite as a list


@dataclasses.dataclass(frozen=True)
class Hit:
    product_id: str
    shop_id: str
    score: float
    version: int
    title: str
    image_url: str
    attributes: dict = dataclasses.field(default_factory=dict)
    embedded_at: str = ""
    generation: int = 0  # the generation of the shard it was served from


class Searcher:
    def __init__(self, catalog: Catalog, reader: Reader, meta: StoreMeta):
        self.catalog = catalog
        self.reader = reader
        self.meta = meta
        self.scopes = Scopes()

    def search(self, query: np.ndarray | None, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
               exact: bool = False, filter: Filter | None = None, text: str | None = None, mode: str = "vector",
               lexical_weight: float = 1.0, lexical: list[tuple[float, int]] | None = None,
               window: int | None = None) -> list[Hit]:
        """Top-k live products: by inner product with `query` (mode vector; `k` and `ef_search` are
        independent), by BM25 on `text` (lexical), or both fused by rank (hybrid: each list's top
        `window`, default max(k, FUSION_WINDOW), fused; `lexical`: the keyword list,
        `lexical_ids(text, window, ...)`, when the caller made it)."""
        view = self.reader.snapshot
        if mode == "vector":
            scored = self.search_ids(query, k, ef_search, shop_id, exact, filter, view)
        elif mode == "lexical":
            scored = self.lexical_ids(text, k, shop_id, filter, view)
        else:
            window = fusion_window(k, window)
            if lexical is None:
                lexical = self.lexical_ids(text, window, shop_id, filter, view)
            scored = fuse([self.search_ids(query, window, ef_search, shop_id, exact, filter, view), lexical],
                          (1.0, lexical_weight))[:k]
        return self.hits(_strictly_decreasing(scored), view.generation)

    def search_ids(self, query: np.ndarray, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
                   exact: bool = False, filter: Filter | None = None, view: Snapshot | None = None
                   ) -> list[tuple[float, int]]:
        """Top-k (score, doc id) among the live docs of `shop_id` that pass `filter` (each optional)."""
        if k < 1 or ef_search < 1:
            raise ValueError("k and ef_search must be at least 1")
        query = np.asarray(query, np.float32).reshape(-1)
        if query.shape[0] != self.meta.dim:
            raise IndexMismatch(f"{query.shape[0]}-d query for a {self.meta.dim}-d index")
        view = view or self.reader.snapshot
        settings = self.meta.settings
        scope = self.scopes.of(view, shop_id, filter)
        if scope is None:
            hits = [self._search_segment(seg, query, k, ef_search, exact, view.live[seg.info.name],
                                         view.live_count[seg.info.name]) for seg in view.segments]
        elif not len(scope.docs):
            return []
        elif exact or planner.scope_exactly(
                len(scope.docs), self._counts(view, scope), k, ef_search, settings.exact_below,
                settings.graph_step_cost):
            # A small scope is searched exactly over its own docs: cost in proportion to the scope.
            hits = [seg.search_positions(query, k, where)
                    for seg, where in zip(view.segments, self.scopes.per_segment(view, scope, positions))]
        else:
            # A large one by each segment's index, filtered by the scope's bitmap (kept per generation).
            hits = [self._search_segment(seg, query, k, ef_search, False, bits, allowed)
                    for seg, (bits, allowed) in zip(view.segments, self.scopes.per_segment(view, scope, bitmap))]
        if not hits:
            return []
        scores, docs = np.concatenate([h[0] for h in hits]), np.concatenate([h[1] for h in hits])
        best = top_k(scores, k)
        return [(float(scores[i]), int(docs[i])) for i in best]

    def _counts(self, view: Snapshot, scope: Scope) -> Iterable[planner.SegmentCounts]:
        """The planner's counts of a scope, per segment (its bitmaps made only when read)."""
        for seg, (_bits, allowed) in zip(view.segments, self.scopes.per_segment(view, scope, bitmap)):
            yield planner.SegmentCounts(seg.info.kind, seg.info.count, allowed)

    def _search_segment(self, seg: Segment, query: np.ndarray, k: int, ef_search: int, exact: bool,
                        bits: np.ndarray, allowed: int) -> tuple[np.ndarray, np.ndarray]:
        """One segment as the planner chooses: skipped, exactly over the bitmap's positions, or by its
        index filtered by the bitmap as it is."""
        choice = planner.choose(planner.SegmentCounts(seg.info.kind, seg.info.count, allowed), exact,
                                self.meta.settings.exact_below)
        if choice == planner.SKIP:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if choice == planner.EXACT or seg.index is None:
            return seg.search_positions(query, k, np.flatnonzero(unpack(bits, seg.info.count)))
        return seg.search_bitmap(query, k, ef_search, bits, allowed)

    def lexical_ids(self, text: str, k: int, shop_id: str | None = None, filter: Filter | None = None,
                    view: Snapshot | None = None) -> list[tuple[float, int]]:
        """Top-k (BM25 score, doc id) for `text` among the scope's docs. A scope of a few thousand docs
        is handed to SQLite; a larger one filters a deepening list of the best matches."""
        match = fts_query(text or "")
        if match is None:
            return []
        view = view or self.reader.snapshot
        scope = self.scopes.of(view, shop_id, filter)
        rank = f"bm25(lexical, {', '.join(map(str, BM25_WEIGHTS))})"
        with self.catalog.transaction(immediate=False) as db:
            if scope is None or len(scope.docs) <= LEXICAL_IN_LIST:
                rows = catalog.lexical_matches(db, match, rank, k, None if scope is None else scope.docs)
            else:
                limit = 4 * k
                while True:
                    rows = catalog.lexical_matches(db, match, rank, limit)
                    docs = np.array([doc for doc, _ in rows], np.int64)
                    inside = np.isin(docs, scope.docs, assume_unique=True) if len(docs) else np.zeros(0, bool)
                    if inside.sum() >= k or len(rows) < limit:
                        rows = [row for row, keep in zip(rows, inside) if keep][:k]
                        break
                    limit *= 4
        # The lexical table is at the newest commit, the snapshot may be one behind: a doc of the newer
        # commit is as live as the rest; one tombstoned since is dropped by `hits`.
        return [(-float(score), int(doc)) for doc, score in rows]  # FTS5's bm25 is lower-is-better

    def facets(self, names: Iterable[str], shop_id: str | None = None, filter: Filter | None = None,
               buckets: dict[str, list[float]] | None = None) -> dict[str, dict]:
        """Per field, exact counts over the live docs of the scope: {"values": {value: count}}, or for a
        field given bucket edges {"buckets": [count per bucket]}. Costs in proportion to the scope."""
        view = self.reader.snapshot
        scope = self.scopes.of(view, shop_id, filter)
        # The scope's positions in each segment, made once per generation (as exact search uses them).
        where = None if scope is None else self.scopes.per_segment(view, scope, positions)
        out = {}
        for name in names:
            index = view.fields[name]
            edges = (buckets or {}).get(name)
            out[name] = {"buckets": index.histogram(where, edges)} if edges else {"values": index.counts(where)}
        return out

    def hits(self, scored: Iterable[tuple[float, int]], generation: int | None = None) -> list[Hit]:
        """The products of (score, doc) pairs, in their order. A doc may have been tombstoned since the
        search: it is dropped, never returned stale."""
        scored = list(scored)
        found = self.hits_by_doc(scored, generation)
        return [found[doc] for _, doc in scored if doc in found]

    def hits_by_doc(self, scored: Sequence[tuple[float, int]], generation: int | None = None) -> dict[int, Hit]:
        if not scored:
            return {}
        with self.catalog.transaction(immediate=False) as db:
            rows = catalog.products_by_doc(db, [doc for _, doc in scored])
        generation = self.reader.snapshot.generation if generation is None else generation
        return {doc: Hit(row.product_id, row.shop_id, score, row.version, row.title, row.image_url,
                         catalog.attributes(row.attributes), row.embedded_at, generation)
                for score, doc in scored if (row := rows.get(doc)) is not None}

    def product_vector(self, product_id: str) -> np.ndarray | None:
        """A live product's stored vector, or None when this store holds no live doc of it."""
        view = self.reader.snapshot
        with self.catalog.transaction(immediate=False) as db:
            doc = catalog.doc_of(db, product_id)
        if doc is None or doc >= view.next_doc:
            return None
        vector = view.vectors_of([doc], self.meta.dim)[0]
        return vector if vector.any() else None


def _strictly_decreasing(scored: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Equal scores (ties: BM25 of equal texts, rank-fusion sums, copies) nudged down a float step each,
    in the order given: the shards' lists then merge by score into one order that every page size
    agrees on (search.sharded pages by merging each shard's top offset + k)."""
    out, last = [], np.inf
    for score, doc in scored:
        score = float(np.nextafter(last, -np.inf)) if score >= last else score
        out.append((score, doc))
        last = score
    return out
