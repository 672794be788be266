"""Index benchmark: ingest, time to searchable, recall and latency of HNSW against exact search.

    python -m bench.index [--vectors 200000] [--dim 512]

Vectors resemble embeddings: a Gaussian mixture (1,000 clusters of uneven size) in a 64-d latent
space, projected to `dim` and normalised, so neighbourhoods are real and not uniform noise.
Queries are held-out points of the same distribution.

1. Ingest through `IndexStore.apply` in commits of 1,000 with compaction in the background, as
   the index pipeline runs it: upserts/s, and per commit the time from its start until its
   first vector is found by a search in this, the writer's, process (each batch must be searchable within 1 s;
   a separate serving process is measured by bench.freshness_scale).
2. Compact to one HNSW segment (M=16, efConstruction=512), then per efSearch: recall@10 and
   recall@100 against exact search (mean, median, std, min), latency p50/p99 and single-thread
   QPS, against the exact baseline (FAISS `IndexFlatIP`, BLAS) in the same run.

Writes bench/results/index.json and index.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from schemas import EmbeddingRecord
from search.store import IndexStore, StoreSettings

RESULTS = Path(__file__).resolve().parent / "results"
WHEN = dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)


def embedding_like(n: int, dim: int, seed: int = 0, clusters: int = 1000, latent: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(clusters, 0.7))
    labels = rng.choice(clusters, size=n, p=sizes)
    centers = rng.normal(size=(clusters, latent)).astype(np.float32)
    projection = rng.normal(size=(latent, dim)).astype(np.float32) / np.sqrt(latent)
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in float32 chunks: millions of vectors without float64 copies
        part = labels[start:start + 100_000]
        points = centers[part] + 0.6 * rng.standard_normal((len(part), latent), np.float32)
        chunk = points @ projection + 0.15 * rng.standard_normal((len(part), dim), np.float32)
        vectors[start:start + len(part)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def records(vectors: np.ndarray, start: int) -> list[EmbeddingRecord]:
    return [EmbeddingRecord(f"p{start + i}", f"shop-{(start + i) % 20}", "upsert", 1, f"e{start + i}",
                            tuple(v.tolist()), (), (), 1, "", "", "bench", WHEN, WHEN)
            for i, v in enumerate(vectors)]


def ingest(store: IndexStore, vectors: np.ndarray, batch: int) -> dict:
    compactions = []

    def compact_when_asked():
        while not stop.is_set():
            if store.compaction_plan():
                started = time.perf_counter()
                store.compact()
                compactions.append(time.perf_counter() - started)
            stop.wait(0.2)

    stop = threading.Event()
    compactor = threading.Thread(target=compact_when_asked, daemon=True)
    compactor.start()
    to_searchable, commit_ms = [], []
    prepared = [records(vectors[i:i + batch], i) for i in range(0, len(vectors), batch)]  # not timed
    started = time.perf_counter()
    for n, batch_records in enumerate(prepared):
        t0 = time.perf_counter()
        store.apply(batch_records)
        t1 = time.perf_counter()
        probe = vectors[n * batch]
        while store.search(probe, k=1, ef_search=64)[0].product_id != batch_records[0].product_id:
            time.sleep(0.001)  # never taken so far: a commit is searchable when apply returns
        to_searchable.append(time.perf_counter() - t0)
        commit_ms.append((t1 - t0) * 1000)
    seconds = time.perf_counter() - started
    stop.set()
    compactor.join()
    return {
        "vectors": len(vectors), "batch": batch, "seconds": round(seconds, 2),
        "upserts_per_s": round(len(vectors) / seconds, 1),
        "commit_ms_p50": round(float(np.percentile(commit_ms, 50)), 2),
        "commit_ms_p99": round(float(np.percentile(commit_ms, 99)), 2),
        "searchable_s_p50": round(float(np.percentile(to_searchable, 50)), 4),
        "searchable_s_p99": round(float(np.percentile(to_searchable, 99)), 4),
        "searchable_s_max": round(float(np.max(to_searchable)), 4),
        "background_compactions": len(compactions),
    }


def timed_queries(search, queries: np.ndarray) -> tuple[list, np.ndarray]:
    results, latencies = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(search(query))
        latencies.append((time.perf_counter() - started) * 1000)
    return results, np.array(latencies)


def summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(values.mean()), 4), "median": round(float(np.median(values)), 4),
            "std": round(float(values.std()), 4), "min": round(float(values.min()), 4)}


def query_benchmark(store: IndexStore, queries: np.ndarray, ef_searches: list[int]) -> dict:
    ids, vectors = store.live_vectors()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    out = {"exact": {}, "hnsw": []}
    truth = {}
    for k in (10, 100):
        found, latency = timed_queries(lambda q: flat.search(q.reshape(1, -1), k)[1][0], queries)
        truth[k] = [set(ids[f].tolist()) for f in found]
        out["exact"][f"k{k}"] = {"p50_ms": round(float(np.percentile(latency, 50)), 3),
                                 "p99_ms": round(float(np.percentile(latency, 99)), 3),
                                 "qps": round(1000 / float(latency.mean()), 1)}
    for ef in ef_searches:
        row = {"ef_search": ef}
        for k in (10, 100):
            found, latency = timed_queries(lambda q: [doc for _, doc in store.search_ids(q, k=k, ef_search=ef)],
                                           queries)
            recalls = [len(t & set(f)) / k for t, f in zip(truth[k], found)]
            row[f"recall@{k}"] = summary(recalls)
            row[f"k{k}"] = {"p50_ms": round(float(np.percentile(latency, 50)), 3),
                            "p99_ms": round(float(np.percentile(latency, 99)), 3),
                            "qps": round(1000 / float(latency.mean()), 1)}
        out["hnsw"].append(row)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["queries"]["hnsw"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, marker in ((10, "o"), (100, "s")):
        ax.plot([r[f"recall@{k}"]["mean"] for r in rows], [r[f"k{k}"]["qps"] for r in rows], marker + "-",
                label=f"HNSW k={k} (labels: efSearch)")
        for r in rows:
            ax.annotate(str(r["ef_search"]), (r[f"recall@{k}"]["mean"], r[f"k{k}"]["qps"]), fontsize=7)
        ax.axhline(result["queries"]["exact"][f"k{k}"]["qps"], linestyle="--", color="grey" if k == 10 else "black",
                   label=f"exact (FAISS flat) k={k}")
    ax.set_yscale("log")
    ax.set_xlabel("mean recall")
    ax.set_ylabel("queries per second (one thread)")
    ax.set_title(f"{result['vectors']:,} vectors, {result['dim']}-d")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--ef_search", default="16,32,64,128,256,512,1024")
    parser.add_argument("--ingest_only", action="store_true", help="measure ingest only; write no results")
    parser.add_argument("--default_ef_search", type=int, default=None,
                        help="the service's default (search.server.DEFAULT_EF_SEARCH)")
    args = parser.parse_args(argv)
    from search.server import DEFAULT_EF_SEARCH

    default_ef = args.default_ef_search or DEFAULT_EF_SEARCH
    efs = sorted({int(x) for x in args.ef_search.split(",")} | {default_ef})
    data = embedding_like(args.vectors + args.queries, args.dim)
    vectors, queries = data[:args.vectors], data[args.vectors:]
    directory = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        store = IndexStore(directory, model="bench", dim=args.dim, settings=StoreSettings())
        print(f"ingesting {args.vectors:,} {args.dim}-d vectors in commits of {args.batch} ...", flush=True)
        ingested = ingest(store, vectors, args.batch)
        print(json.dumps(ingested))
        if args.ingest_only:
            return ingested
        store.settings = dataclasses.replace(store.settings, build_threads=0)  # offline now: every core
        started = time.perf_counter()
        store.compact(force=True)
        build_s = time.perf_counter() - started
        faiss.omp_set_num_threads(1)  # queries: one thread each, for HNSW and the exact baseline alike
        print(f"compacted to one HNSW segment in {build_s:.1f}s; querying ...", flush=True)
        queried = query_benchmark(store, queries, efs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    at_default = next(r for r in queried["hnsw"] if r["ef_search"] == default_ef)
    good = [r for r in queried["hnsw"] if r["recall@10"]["mean"] >= 0.99]
    best = max(good, key=lambda r: r["k10"]["qps"]) if good else None
    speedup = best["k10"]["qps"] / queried["exact"]["k10"]["qps"] if best else 0.0
    r100 = at_default["recall@100"]
    targets = {
        "recall@100 at default efSearch: mean >= 0.99, median 1.0, min >= 0.9":
            r100["mean"] >= 0.99 and r100["median"] == 1.0 and r100["min"] >= 0.9,
        "sustained upserts >= 2500/s": ingested["upserts_per_s"] >= 2500,
        "each batch searchable within 1 s of its commit": ingested["searchable_s_max"] <= 1.0,
        "HNSW QPS >= 10x exact at recall@10 >= 0.99": speedup >= 10,
    }
    result = {
        "name": "index", "vectors": args.vectors, "dim": args.dim, "queries": len(queries),
        "hnsw": {"m": 16, "ef_construction": 512, "compaction_build_s": round(build_s, 1)},
        "default_ef_search": default_ef, "ingest": ingested, "queries_by_ef": queried,
        "figure": {"qps_at_recall10_0.99": best["k10"]["qps"] if best else None,
                   "ef_search": best["ef_search"] if best else None},
        "baseline": {"what": "exact search, FAISS IndexFlatIP, one thread", "qps_k10": queried["exact"]["k10"]["qps"]},
        "ratio": round(speedup, 1),
        "targets": targets,
        "holds": all(targets.values()),
    }
    result["queries"] = queried
    del result["queries_by_ef"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "index.png")

    print(f"\n{'efSearch':>8} | {'recall@10 mean/min':>19} | {'recall@100 mean/med/min':>25} | "
          f"{'k=10 p50/p99 ms':>16} | {'k=10 QPS':>8} | {'k=100 p50/p99 ms':>17}")
    for r in queried["hnsw"]:
        print(f"{r['ef_search']:>8} | {r['recall@10']['mean']:>9.4f}/{r['recall@10']['min']:<9.3f} | "
              f"{r['recall@100']['mean']:>9.4f}/{r['recall@100']['median']:.3f}/{r['recall@100']['min']:<9.3f} | "
              f"{r['k10']['p50_ms']:>7.2f}/{r['k10']['p99_ms']:<8.2f} | {r['k10']['qps']:>8.0f} | "
              f"{r['k100']['p50_ms']:>7.2f}/{r['k100']['p99_ms']:<8.2f}")
    e = queried["exact"]
    print(f"{'exact':>8} | {'1':>19} | {'1':>25} | {e['k10']['p50_ms']:>7.2f}/{e['k10']['p99_ms']:<8.2f} | "
          f"{e['k10']['qps']:>8.0f} | {e['k100']['p50_ms']:>7.2f}/{e['k100']['p99_ms']:<8.2f}")
    print(f"\ningest: {ingested['upserts_per_s']:,.0f} upserts/s; searchable after a commit: "
          f"p99 {ingested['searchable_s_p99'] * 1000:.1f} ms, max {ingested['searchable_s_max'] * 1000:.1f} ms")
    for name, ok in targets.items():
        print(f"{'holds' if ok else 'MISSES'}: {name}")
    print(f"wrote {RESULTS / 'index.json'} and index.png")
    return result


if __name__ == "__main__":
    main()
