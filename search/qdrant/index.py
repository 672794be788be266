"""The storefront's queries on a Qdrant collection that `pipelines.index --sink qdrant` writes: the same
methods as `search.sharded.ShardedIndex`, so the service's routes, the page and the router serve
either (`python -m search.server --backend qdrant`; docs/ARCHITECTURE.md §18).

How each query maps onto the engine (points as transforms.qdrant_sink writes them):
- every query filters out tombstones (`live_only`) and scopes by `shop_id` (a tenant index);
- a filter (search.filters' canonical tree) becomes a Qdrant filter over the typed `fields.NAME`
  payload: equality and `in` as `MatchValue`/`MatchAny` for keywords and booleans, numbers always as a
  `Range` (an int field's `eq 3.0` is 3), `and`/`or` as `must`/`should`;
- vector mode is `query_points` on the `dense` vector with `hnsw_ef = ef_search` and the page's
  `offset`; lexical mode is Qdrant's own BM25 (`TextQuery` on the `keywords` text index); hybrid
  fuses the two lists here, with search.hybrid's reciprocal rank fusion over the same window as the
  FAISS store, so the fusion is the same code on both backends;
- facets: `facet` per field (exact counts over the filter), and for bucketed numbers one exact `count`
  per bucket (the last bucket closed, as numpy's histogram and the FAISS store);
- similar products: the product's stored vector, its candidates, near-copies collapsed by
  search.sharded.collapse_near_copies.

What differs from the FAISS store, by design of the engine: BM25 runs on one field with Qdrant's word
tokenizer (lowercased, no stemming: "shirts" does not match "shirt", which FTS5's porter stemmer
matches), the field weights folded into that field as repetitions (BM25F); the collection has no
commit generations (`generation` is 0); and a collection is served whole (one "shard", 0), whatever
its own shards are: Qdrant routes and merges them itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import numpy as np

from search.fields import SHOP, Field, parse_filterable
from search.filters import Filter
from search import hybrid
from search.merge import MAX_FACET_VALUES
from search.query.searcher import Hit
from search.sharded import DUPLICATE_COSINE, SIMILAR_POOL, collapse_near_copies
from search.index.errors import IndexUnavailable
from search.qdrant.collection import (VECTOR_NAME, Clients, QdrantCollection, QdrantTarget, describe_failure,
                                      live_only, point_id, status_of, transient)

__all__ = ["QdrantIndex", "qdrant_filter"]

_log = logging.getLogger(__name__)
STATS_SECS = 1.0  # the live count and the layout are read again at most this often
_REFUSING_STATUS = (401, 403, 404)  # the key refused, the collection gone: not transient, still not the query's fault
FACET_VALUES = 100 * MAX_FACET_VALUES  # values a facet reads from the engine: the answer lists the most frequent
PAYLOAD = ["product_id", "shop_id", "version", "title", "image_url", "attributes", "embedded_at"]


def qdrant_filter(tree: tuple | None, shop_id: str | None = None, exclude: str = ""):
    """A parsed filter's tree (search.filters), the shop and a product to leave out → the Qdrant filter
    of live points that pass."""
    from qdrant_client import models

    must = []
    if shop_id is not None:
        must.append(models.FieldCondition(key="shop_id", match=models.MatchValue(value=shop_id)))
    if tree is not None:
        must.append(_condition(tree))
    must_not = list(live_only().must_not)
    if exclude:
        must_not.append(models.HasIdCondition(has_id=[point_id(exclude)]))
    return models.Filter(must=must or None, must_not=must_not)


def _condition(tree: tuple):
    from qdrant_client import models

    if tree[0] in ("and", "or"):
        children = [_condition(child) for child in tree[1]]
        return models.Filter(must=children) if tree[0] == "and" else models.Filter(should=children)
    name, op, operand = tree
    key = "shop_id" if name == SHOP.name else f"fields.{name}"
    if op in ("gt", "gte", "lt", "lte"):
        return models.FieldCondition(key=key, range=models.Range(**{op: operand}))
    values = operand if op == "in" else [operand]
    if isinstance(values[0], bool) or isinstance(values[0], str):
        if len(values) == 1:
            return models.FieldCondition(key=key, match=models.MatchValue(value=values[0]))
        if isinstance(values[0], str):
            return models.FieldCondition(key=key, match=models.MatchAny(any=list(values)))
        return models.Filter(should=[models.FieldCondition(key=key, match=models.MatchValue(value=v)) for v in values])
    # Numbers: a range of one value, which an int and a float index both answer (3.0 is the int 3).
    ranges = [models.FieldCondition(key=key, range=models.Range(gte=v, lte=v)) for v in values]
    return ranges[0] if len(ranges) == 1 else models.Filter(should=ranges)


class QdrantIndex:
    """A collection, queried as ShardedIndex is (the methods the service, the page and the router call)."""

    num_shards = 1
    shard_ids = [0]

    def __init__(self, target: QdrantTarget):
        self.target = target
        client, lock = Clients.acquire(target)
        self._collection = QdrantCollection(target, client, lock)
        self.reload_errors: dict[int, str] = {}
        self.failed_reloads = 0
        try:
            layout = self._read()
        except Exception:
            Clients.release(target)
            raise
        self.model, self.dim, self.projection = layout["model"], layout["dim"], layout["projection"]
        self.segment_kind = layout["segment_kind"]
        self._closed = False

    def _read(self) -> dict:
        """Reads the collection's layout (its declared fields) and live count; FileNotFoundError when it is
        missing."""
        layout = self._collection.layout()
        if layout is None:
            raise FileNotFoundError(f"{self.target.where} does not exist: write it with pipelines.index --sink qdrant")
        self._filterable = parse_filterable(layout["filterable"])
        self._stats = {"live_docs": self._collection.count_live(), "generation": 0}
        self._read_at = time.monotonic()
        return layout

    @classmethod
    def open(cls, target: QdrantTarget) -> "QdrantIndex":
        return cls(target)

    @property
    def filterable(self) -> tuple[Field, ...]:
        return self._filterable

    @property
    def available(self) -> bool:
        """False while the engine does not answer (the last read failed): /healthz is then a 503."""
        return 0 not in self.reload_errors

    @contextlib.contextmanager
    def _engine(self):
        """Engine calls: one that cannot be answered now (unreachable, timed out, overloaded, the key
        refused, the collection gone) is IndexUnavailable, a 503 naming why; anything else is raised."""
        try:
            with self._collection.locked():
                yield self._collection.client
        except Exception as e:
            if transient(e) or status_of(e) in _REFUSING_STATUS:
                raise IndexUnavailable(describe_failure(e, self.target)) from e
            raise

    def _query(self, **kwargs):
        with self._engine() as client:
            return client.query_points(self.target.collection, with_payload=PAYLOAD, **kwargs).points

    def refresh(self) -> bool:
        """The engine serves its newest writes itself; this re-reads the live count and the declared
        fields (at most every STATS_SECS). An engine that does not answer is reported, not raised: the
        last figures stand and queries answer (or fail) on their own."""
        if time.monotonic() - self._read_at < STATS_SECS:
            return False
        self._read_at = time.monotonic()  # a failed read waits its turn too
        try:
            self._read()
        except Exception as e:
            reason = describe_failure(e, self.target)
            if 0 not in self.reload_errors:
                self.failed_reloads += 1
                _log.error("%s; searches answer 503 until it does", reason)
            self.reload_errors[0] = reason
            return False
        self.reload_errors.pop(0, None)
        return True

    def search(self, query: np.ndarray | Callable[[], np.ndarray] | None, k: int = 10, ef_search: int = 128,
               shop_id: str | None = None, exact: bool = False, filter: Filter | None = None, text: str | None = None,
               mode: str = "vector", lexical_weight: float = 1.0, offset: int = 0,
               fusion_window: int | None = None) -> list[Hit]:
        """Results offset..offset+k, as ShardedIndex.search answers them."""
        where = qdrant_filter(filter.tree if filter else None, shop_id)
        if callable(query):
            query = query()
        if mode == "vector":
            return self._hits(self._dense(query, k, ef_search, exact, where, offset))
        if mode == "lexical":
            return self._hits(self._lexical(text, k, where, offset))
        window = hybrid.fusion_window(k, fusion_window)
        dense, lexical = self._dense(query, window, ef_search, exact, where), self._lexical(text, window, where)
        points = {p.id: p for p in [*lexical, *dense]}
        fused = hybrid.fuse([[(p.score, p.id) for p in dense], [(p.score, p.id) for p in lexical]], (1.0, lexical_weight))
        return [hit for score, pid in fused[offset:offset + k] for hit in self._hits([points[pid]], score)]

    def _dense(self, query: np.ndarray, k: int, ef_search: int, exact: bool, where, offset: int = 0) -> list:
        vector = np.asarray(query, np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise ValueError(f"{vector.shape[0]}-d query for a {self.dim}-d index")
        return self._query(query=vector.tolist(), using=VECTOR_NAME, query_filter=where, limit=k, offset=offset,
                           search_params=self._params(ef_search, exact))

    def _params(self, ef_search: int, exact: bool = False):
        """The graph's search depth; none in the local mode, which searches exactly (and warns per query)."""
        from qdrant_client import models

        return None if self.target.path else models.SearchParams(hnsw_ef=ef_search, exact=exact)

    def _lexical(self, text: str | None, k: int, where, offset: int = 0) -> list:
        from qdrant_client import models

        words = hybrid.query_terms(hybrid.fold(text or ""))
        if not words:
            return []
        return self._query(query=models.TextQuery(text=" ".join(words)), using="keywords", query_filter=where, limit=k,
                           offset=offset)

    @staticmethod
    def _hits(points, score: float | None = None) -> list[Hit]:
        out = []
        for p in points:
            payload = p.payload or {}
            out.append(Hit(payload["product_id"], payload["shop_id"], float(p.score if score is None else score),
                           int(payload["version"]), payload.get("title", ""), payload.get("image_url", ""),
                           payload.get("attributes") or {}, payload.get("embedded_at", ""), 0))
        return out

    def facets(self, names: list[str], shop_id: str | None = None, filter: Filter | None = None,
               buckets: dict[str, list[float]] | None = None) -> dict[str, dict]:
        """Exact counts over the live products of the scope, in the FAISS store's shape."""
        from qdrant_client import models

        where = qdrant_filter(filter.tree if filter else None, shop_id)
        out = {}
        with self._engine() as client:
            for name in names:
                key = f"fields.{name}"
                edges = (buckets or {}).get(name)
                if edges:
                    counts = []
                    for n, (low, high) in enumerate(zip(edges, edges[1:])):
                        last = n == len(edges) - 2
                        bucket = models.FieldCondition(key=key, range=models.Range(gte=low, **{"lte" if last else "lt": high}))
                        scoped = models.Filter(must=[*(where.must or []), bucket], must_not=where.must_not)
                        counts.append(client.count(self.target.collection, count_filter=scoped, exact=True).count)
                    out[name] = {"buckets": counts}
                else:
                    answer = client.facet(self.target.collection, key, facet_filter=where, limit=FACET_VALUES,
                                          exact=True)
                    out[name] = {"values": {hit.value: hit.count for hit in answer.hits}}
        return out

    def product_vector(self, product_id: str) -> np.ndarray | None:
        """A live product's stored vector, or None."""
        with self._engine() as client:
            points = client.retrieve(self.target.collection, [point_id(product_id)], with_payload=["deleted"],
                                     with_vectors=[VECTOR_NAME])
        if not points or (points[0].payload or {}).get("deleted") or not points[0].vector:
            return None
        return np.asarray(points[0].vector[VECTOR_NAME], np.float32)

    def similar(self, vector: np.ndarray, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
                filter: Filter | None = None, exclude: str = "", duplicate_cosine: float = DUPLICATE_COSINE,
                with_vectors: bool = False) -> list[Hit] | list[tuple[Hit, np.ndarray]]:
        """As ShardedIndex.similar: the candidates (the product `exclude` left out), near-copies collapsed."""
        where = qdrant_filter(filter.tree if filter else None, shop_id, exclude)
        points = self._query(query=np.asarray(vector, np.float32).tolist(), using=VECTOR_NAME, query_filter=where,
                             limit=SIMILAR_POOL * k + 1, with_vectors=[VECTOR_NAME],
                             search_params=self._params(ef_search))
        candidates = [(hit, np.asarray(p.vector[VECTOR_NAME], np.float32))
                      for p, hit in zip(points, self._hits(points))]
        candidates.sort(key=lambda c: (-c[0].score, c[0].product_id))
        kept = collapse_near_copies(candidates, vector, k, duplicate_cosine)
        return kept if with_vectors else [hit for hit, _ in kept]

    def live_products(self) -> dict[str, tuple[int, str]]:
        """product_id → (version, shop_id) of every live product."""
        return self._collection.live_products()

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(product ids, vectors) of every live product: the exact baseline of search.recall."""
        points = self._collection.points(with_vectors=True)
        ids = np.array([p.payload["product_id"] for p in points], dtype=object)
        vectors = np.array([p.vector[VECTOR_NAME] for p in points], np.float32).reshape(len(points), self.dim)
        return ids, vectors

    def stats(self) -> dict:
        return {"model": self.model, "dim": self.dim, "num_shards": 1, "served_shards": [0],
                "segment_kind": self.segment_kind, **self._stats}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            Clients.release(self.target)
