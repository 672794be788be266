"""Filtered HNSW recall of Qdrant's own engine against the FAISS store's, on the same vectors and shops.

    python -m bench.qdrant_recall [--sizes 20000,200000] [--queries 100] [--ef_search 64,128,256]

No Qdrant server runs here, and qdrant-client's local mode searches exactly, so it says nothing about
recall. qdrant-edge-py embeds Qdrant's engine itself (its segments, HNSW graph, payload indexes and query
planner) in process: a shard is built here with the layout `pipelines.index --sink qdrant` gives a
collection (cosine, HNSW m and ef_construct from the store's defaults, `shop_id` a tenant keyword index)
and optimised (the graph built), and the FAISS store (search.store.IndexStore) is built from the same
records and compacted to one segment. Each answers the same queries, unscoped and scoped to shops of
50%, 5% and 0.5% of the products, at each efSearch (`hnsw_ef` for Qdrant), and each answer is compared
with the same engine's exact answer: recall@10, mean and minimum over the queries, and p50 latency.
The vectors are clustered (50 centres), 64-d, so the graph has the structure real embeddings have.
Baseline: the FAISS store, in the same run. Target: none fixed by an issue; the figures say whether a
team moving to Qdrant keeps the store's filtered recall, and how both grow from the smaller size to 10x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import write_result
from schemas import EmbeddingRecord
from search.store import IndexStore, StoreSettings

DIM, K, CENTRES = 64, 10, 50
WHEN = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
MODEL = "bench:clustered-64"
SHOPS = {"shop-50pct": 0.5, "shop-5pct": 0.05, "shop-0.5pct": 0.005}  # the rest: 200 small shops


def catalogue(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors and each one's shop."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CENTRES, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, CENTRES, size)] + 0.35 * rng.normal(size=(size, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    draw, shops, low = rng.random(size), np.empty(size, dtype=object), 0.0
    for name, share in SHOPS.items():
        shops[(draw >= low) & (draw < low + share)] = name
        low += share
    rest = shops == None  # noqa: E711 (an object array's missing entries)
    shops[rest] = [f"shop-{n}" for n in rng.integers(0, 200, int(rest.sum()))]
    return vectors, shops


class QdrantEngine:
    """A Qdrant Edge shard with the collection's layout (search.qdrant.collection)."""

    def __init__(self, path: Path, settings: StoreSettings):
        import qdrant_edge as qe

        self.qe = qe
        # Qdrant's default full-scan threshold (10,000 KB: a scope estimated smaller is scored exactly, as
        # the collection the sink makes plans it); the graph built however small the shard (a collection
        # builds it past 10,000 KB of vectors, ~40k at 64-d, which the smaller size is not).
        hnsw = qe.HnswIndexConfig(m=settings.segment.m, ef_construct=settings.segment.ef_construction,
                                  full_scan_threshold=10_000)
        config = qe.EdgeConfig(vectors={"dense": qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine,
                                                                     hnsw_config=hnsw)},
                               optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1))
        self.shard = qe.EdgeShard.create(str(path), config)
        self.shard.update(qe.UpdateOperation.create_field_index("shop_id", qe.KeywordIndexParams(is_tenant=True)))

    def build(self, vectors: np.ndarray, shops: np.ndarray) -> float:
        started = time.perf_counter()
        for start in range(0, len(vectors), 2000):
            points = [self.qe.Point(n, {"dense": vectors[n].tolist()}, {"shop_id": str(shops[n])})
                      for n in range(start, min(len(vectors), start + 2000))]
            self.shard.update(self.qe.UpdateOperation.upsert_points(points))
        self.shard.optimize()
        self.indexed = self.shard.info().indexed_vectors_count
        return time.perf_counter() - started

    def search(self, query: np.ndarray, shop: str | None, ef_search: int, exact: bool) -> list[int]:
        qe = self.qe
        where = None if shop is None else qe.Filter(must=[qe.FieldCondition(key="shop_id", match=qe.MatchValue(shop))])
        request = qe.QueryRequest(limit=K, query=qe.Query.Nearest(query.tolist(), using="dense"), filter=where,
                                  params=qe.SearchParams(hnsw_ef=ef_search, exact=exact))
        return [int(p.id) for p in self.shard.query(request)]

    def close(self) -> None:
        self.shard.close()


class FaissStore:
    """The FAISS store, one compacted HNSW segment, the same records."""

    def __init__(self, path: Path, settings: StoreSettings):
        self.store = IndexStore(path, model=MODEL, dim=DIM, settings=settings)

    def build(self, vectors: np.ndarray, shops: np.ndarray) -> float:
        started = time.perf_counter()
        for start in range(0, len(vectors), 10_000):
            self.store.apply([EmbeddingRecord(f"{n}", str(shops[n]), "upsert", 1, f"e{n}", vectors[n], (), (), 1,
                                              "", "", MODEL, WHEN, WHEN)
                              for n in range(start, min(len(vectors), start + 10_000))])
        self.store.compact(force=True)
        return time.perf_counter() - started

    def search(self, query: np.ndarray, shop: str | None, ef_search: int, exact: bool) -> list[int]:
        return [int(hit.product_id) for hit in self.store.search(query, k=K, ef_search=ef_search, shop_id=shop,
                                                                  exact=exact)]

    def close(self) -> None:
        self.store.close()


def measure(engine, vectors: np.ndarray, queries: int, ef_searches: list[int], seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(0, len(vectors), queries)]
    picked = picked + 0.05 * rng.normal(size=picked.shape).astype(np.float32)
    picked /= np.linalg.norm(picked, axis=1, keepdims=True)
    out = {}
    for scope in (None, *SHOPS):
        truth = [set(engine.search(q, scope, K, True)) for q in picked]
        rows = {}
        for ef in ef_searches:
            recalls, took = [], []
            for q, exact in zip(picked, truth):
                started = time.perf_counter()
                found = engine.search(q, scope, ef, False)
                took.append((time.perf_counter() - started) * 1000)
                recalls.append(len(exact & set(found)) / max(1, len(exact)))
            rows[str(ef)] = {"recall_mean": round(float(np.mean(recalls)), 4),
                             "recall_min": round(float(np.min(recalls)), 4), "p50_ms": round(float(np.median(took)), 3)}
        out[scope or "unscoped"] = rows
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.qdrant_recall", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000,200000", help="products, comma-separated")
    parser.add_argument("--queries", type=int, default=100, help="queries per scope")
    parser.add_argument("--ef_search", default="64,128,256", help="efSearch (Qdrant: hnsw_ef) values")
    parser.add_argument("--output_dir", help="where the JSON goes (default bench/results)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ef_searches = [int(e) for e in args.ef_search.split(",")]
    settings = StoreSettings()
    result: dict = {"sizes": {}, "dim": DIM, "k": K, "queries": args.queries,
                    "layout": {"m": settings.segment.m, "ef_construct": settings.segment.ef_construction}}
    for size in sizes:
        vectors, shops = catalogue(size)
        row = {}
        for name, kind in (("qdrant", QdrantEngine), ("faiss", FaissStore)):
            work = Path(tempfile.mkdtemp(prefix=f"qdrant-recall-{name}-"))
            try:
                engine = kind(work / "index", settings)
                built = engine.build(vectors, shops)
                row[name] = {"build_s": round(built, 1), "scopes": measure(engine, vectors, args.queries, ef_searches)}
                if name == "qdrant":
                    row[name]["indexed_vectors"] = engine.indexed  # in the graph, not a plain segment
                engine.close()
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"{size:>9,} {name:6} built in {row[name]['build_s']:.1f} s", flush=True)
            for scope, rows in row[name]["scopes"].items():
                print(f"          {scope:12} " + "  ".join(
                    f"ef {ef}: recall {r['recall_mean']:.3f} (min {r['recall_min']:.2f}), {r['p50_ms']:.2f} ms"
                    for ef, r in rows.items()), flush=True)
        result["sizes"][str(size)] = row
    write_result("qdrant_recall", result, Path(args.output_dir) if args.output_dir else None or __import__(
        "bench.common", fromlist=["RESULTS"]).RESULTS)
    return result


if __name__ == "__main__":
    main()
