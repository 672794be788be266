"""Index growth benchmark: query cost, memory and recall from 100k to 1M vectors (3M for the
compressed kinds), per segment kind, unscoped and scoped to one shop.

    python -m bench.scale [--sizes 100000,300000,1000000] [--large 3000000] [--kinds hnsw,hnsw_sq8,ivf_pq]

Per (kind, N), with the clustered 512-d vectors of bench.index and shops of 500, 5,000 and 50,000
products (the rest in shops of 1,000), each shop's products spread at random over the index:

1. Build, in a process of its own that ends before the next step (its memory gone with it): the
   vectors go in through `IndexStore.apply` (commits of 20,000), then one compaction makes a single
   segment of the kind with every core: its build rate.
2. Query, in a fresh process that opens the store read-only, so its memory is the served index's
   alone: single-thread p50/p99 latency and QPS at k=10 and k=100, unscoped and per shop, at the
   service's default efSearch, with recall@10/@100 (mean, median, min) against exact search over
   the same scope. Memory per vector: the process's anonymous resident bytes (its own), and beside
   them its file-backed resident bytes (the memory-mapped float vectors: page cache the OS can
   drop), against the FAISS index file's size.
3. Ingest at that size: 20 commits of 1,000 new products, each searched for right after its commit.

Writes bench/results/scale.json (each cell merged in when it is done, so a partial run keeps what
it measured) and scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.index import RESULTS, WHEN, embedding_like, summary
from schemas import EmbeddingRecord

DIM = 512
SHOPS = (500, 5_000, 50_000)  # the shops queries are scoped to; the rest hold 1,000 products each
SCOPES = ("all",) + tuple(f"shop-{size}" for size in SHOPS)
COMMIT = 20_000
INGEST_COMMITS, INGEST_BATCH = 20, 1_000


def shop_of_products(n: int, seed: int = 0) -> np.ndarray:
    """Each product's shop: the named shops first, then shops of 1,000, in a random order."""
    names = [f"shop-{size}" for size in SHOPS for _ in range(size)]
    rest = n - len(names)
    names += [f"shop-r{i // 1000}" for i in range(max(0, rest))]
    return np.random.default_rng(seed).permutation(np.array(names[:n], dtype=object))


def records(vectors: np.ndarray, shops: np.ndarray, start: int) -> list[EmbeddingRecord]:
    return [EmbeddingRecord(f"p{start + i}", shops[i], "upsert", 1, f"e{start + i}", v, (), (), 1, "", "", "bench",
                            WHEN, WHEN) for i, v in enumerate(vectors)]


def exact_truth(vectors: np.ndarray, queries: np.ndarray, shops: np.ndarray) -> dict[str, np.ndarray]:
    """Per scope, the doc ids (= row numbers: products go in in order) of the exact top 100."""
    import faiss

    truth = {"all": faiss.knn(queries, vectors, 100, faiss.METRIC_INNER_PRODUCT)[1]}  # no copy of millions
    for scope in SCOPES[1:]:
        rows = np.flatnonzero(shops == scope)
        truth[scope] = rows[faiss.knn(queries, np.ascontiguousarray(vectors[rows]), 100, faiss.METRIC_INNER_PRODUCT)[1]]
    return truth


def _rss() -> dict[str, int]:
    """The process's own and page-cache resident bytes, and how much of its own is on huge pages."""
    fields = {}
    for path in ("/proc/self/status", "/proc/self/smaps_rollup"):
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "AnonHugePages"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def timed_scope(store, queries: np.ndarray, truth: np.ndarray, k: int, ef_search: int, shop: str | None) -> dict:
    """One thread's p50/p99 latency, QPS and recall@k against `truth` (doc ids per query) of a scope."""
    for q in queries[:20]:  # warm-up: the pages a query touches, mapped once, and the scope's cached docs
        store.search_ids(q, k, ef_search, shop)
    latencies, recalls = [], []
    for q, expected in zip(queries, truth):
        started = time.perf_counter()
        found = store.search_ids(q, k, ef_search, shop)
        latencies.append((time.perf_counter() - started) * 1000)
        recalls.append(len({doc for _, doc in found} & set(expected[:k].tolist())) / k)
    latencies = np.array(latencies)
    return {"p50_ms": round(float(np.percentile(latencies, 50)), 3), "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "qps": round(1000 / float(latencies.mean()), 1), f"recall@{k}": summary(recalls)}


def query_cell(directory: str, truth_file: str, ef_search: int) -> dict:
    """Runs in its own process: opens the store read-only, measures memory, latency and recall."""
    import faiss

    from search.store import IndexStore

    faiss.omp_set_num_threads(1)
    truth = np.load(truth_file)
    queries = truth["queries"]
    before = _rss()
    store = IndexStore(directory, read_only=True)
    opened = _rss()
    out = {"ef_search": ef_search, "scopes": {}}
    for scope in SCOPES:
        shop = None if scope == "all" else scope
        out["scopes"][scope] = {f"k{k}": timed_scope(store, queries, truth[scope], k, ef_search, shop)
                                for k in (10, 100)}
    after = _rss()
    stats = store.stats()
    index_bytes = sum(path.stat().st_size for path in Path(directory).glob("seg-*")
                      if path.suffix in (".hnsw", ".faiss"))
    n = stats["live_docs"]
    out["memory"] = {
        "index_file_bytes_per_vector": round(index_bytes / n, 1),
        "anon_bytes_per_vector": round((after["RssAnon"] - before["RssAnon"]) / n, 1),
        "anon_bytes_per_vector_after_open": round((opened["RssAnon"] - before["RssAnon"]) / n, 1),
        "file_bytes_per_vector": round((after["RssFile"] - before["RssFile"]) / n, 1),
        "anon_huge_page_share": round(after["AnonHugePages"] / max(after["RssAnon"], 1), 3),
    }
    out["segments"] = [(s["kind"], s["count"]) for s in stats["segments"]]
    return out


def ingest_at_size(store, n: int, seed: int) -> dict:
    """20 commits of 1,000 new products into the built index; each must be found after its commit."""
    fresh = embedding_like(INGEST_COMMITS * INGEST_BATCH, DIM, seed=seed)
    shops = np.array([f"shop-r{i % 50}" for i in range(len(fresh))], dtype=object)
    batches = [records(fresh[i:i + INGEST_BATCH], shops[i:i + INGEST_BATCH], n + i)
               for i in range(0, len(fresh), INGEST_BATCH)]
    to_searchable = []
    started = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        store.apply(batch)
        while store.search(batch[0].embedding, k=1, ef_search=64)[0].product_id != batch[0].product_id:
            time.sleep(0.001)
        to_searchable.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    return {"upserts_per_s": round(len(fresh) / seconds, 1),
            "searchable_s_p50": round(float(np.median(to_searchable)), 4),
            "searchable_s_max": round(float(np.max(to_searchable)), 4)}


def bench_settings(kind: str, ef_construction: int):
    from search.merge_policy import MergePolicy
    from search.segment import SegmentParams
    from search.store import StoreSettings

    return StoreSettings(segment=SegmentParams(kind, ef_construction=ef_construction),
                         merge=MergePolicy(delta_limit=10**12, max_delta_segments=10**6), build_threads=0)


def build_cell(kind: str, n: int, queries_n: int, ef_construction: int, work: Path) -> dict:
    """Runs in its own process: the vectors, the exact truth, then the store applied and compacted."""
    import faiss

    from search.store import IndexStore

    data = embedding_like(n + queries_n, DIM)
    vectors, queries = data[:n], np.ascontiguousarray(data[n:])
    shops = shop_of_products(n)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    np.savez(work / "truth.npz", queries=queries, **exact_truth(vectors, queries, shops))
    store = IndexStore(work / f"{kind}-{n}", model="bench", dim=DIM, settings=bench_settings(kind, ef_construction))
    started = time.perf_counter()
    for start in range(0, n, COMMIT):
        store.apply(records(vectors[start:start + COMMIT], shops[start:start + COMMIT], start))
    apply_s = time.perf_counter() - started
    del data, vectors
    started = time.perf_counter()
    store.compact(force=True)
    build_s = time.perf_counter() - started
    store.close()
    return {"apply_s": apply_s, "build_s": build_s}


def run_cell(kind: str, n: int, queries_n: int, ef_search: int, ef_construction: int, work: Path) -> dict:
    """Build, query and ingest each in a process of its own: the builder's memory (millions of floats,
    and what its allocator keeps) is given back before the query process measures, and its page
    cache is the OS's to give the index (at 3M, a builder kept alive left 1 GB free, no huge pages)."""
    from search.store import IndexStore

    directory = work / f"{kind}-{n}"
    built = json.loads(_child(["--build_cell", kind, str(n), str(queries_n), str(ef_construction), str(work)]))
    apply_s, build_s = built["apply_s"], built["build_s"]
    print(f"  {kind} {n:,}: applied at {n / apply_s:,.0f}/s, built at {n / build_s:,.0f} vectors/s; querying ...",
          flush=True)
    # The system allocator there: one that keeps freed pages (tcmalloc) would count them as the index's.
    env = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    cell = json.loads(_child(["--query_cell", str(directory), str(work / "truth.npz"), str(ef_search)], env))
    store = IndexStore(directory, settings=bench_settings(kind, ef_construction))
    cell.update(kind=kind, vectors=n, apply_per_s=round(n / apply_s, 1), build_s=round(build_s, 1),
                build_per_s=round(n / build_s, 1), ingest=ingest_at_size(store, n, seed=n + 1))
    store.close()
    shutil.rmtree(directory, ignore_errors=True)
    return cell


def _child(args: list[str], env: dict[str, str] | None = None) -> str:
    """`python -m bench.scale ARGS` → the JSON line it prints last (its stderr passes through)."""
    child = subprocess.run([sys.executable, "-m", "bench.scale", *args], stdout=subprocess.PIPE, text=True,
                           check=True, env=env)
    return child.stdout.strip().splitlines()[-1]


def targets(cells: dict) -> dict:
    def cell(kind, n):
        return cells.get(f"{kind}/{n}")

    out = {}
    small, big = 100_000, 1_000_000
    for kind in ("hnsw", "hnsw_sq8", "ivf_pq"):
        a, b = cell(kind, small), cell(kind, big)
        if not (a and b):
            continue
        shop_a, shop_b = a["scopes"]["shop-5000"]["k10"]["p50_ms"], b["scopes"]["shop-5000"]["k10"]["p50_ms"]
        out[f"{kind}: shop of 5,000 p50 <= 2 ms at 1M and <= 1.2x its 100k figure"] = \
            shop_b <= 2.0 and shop_b <= 1.2 * shop_a
        if kind != "ivf_pq":  # HNSW's logarithmic cost; IVF's grows with the square root by design
            growth = b["scopes"]["all"]["k10"]["p50_ms"] / a["scopes"]["all"]["k10"]["p50_ms"]
            out[f"{kind}: unscoped p50 grows <= 1.5x from 100k to 1M"] = growth <= 1.5
        out[f"{kind}: ingest at 1M >= 2,500 upserts/s, each commit searchable within 1 s"] = \
            b["ingest"]["upserts_per_s"] >= 2500 and b["ingest"]["searchable_s_max"] <= 1.0
    hnsw = cell("hnsw", big)
    if hnsw:
        memory = hnsw["memory"]
        out["hnsw: anonymous resident bytes <= 1.15x the FAISS index's size"] = \
            memory["anon_bytes_per_vector"] <= 1.15 * memory["index_file_bytes_per_vector"]
        for kind, ratio, recall in (("hnsw_sq8", 0.4, 0.99), ("ivf_pq", 0.1, 0.95)):
            other = cell(kind, big)
            if other:
                out[f"{kind}: <= {ratio}x hnsw's bytes per vector with recall@10 >= {recall}"] = \
                    other["memory"]["anon_bytes_per_vector"] <= ratio * memory["anon_bytes_per_vector"] and \
                    other["scopes"]["all"]["k10"]["recall@10"]["mean"] >= recall
    return out


def plot(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, colour in (("hnsw", "C0"), ("hnsw_sq8", "C1"), ("ivf_pq", "C2")):
        rows = sorted((c for c in cells.values() if c["kind"] == kind), key=lambda c: c["vectors"])
        if not rows:
            continue
        sizes = [c["vectors"] for c in rows]
        for scope, style in (("all", "o-"), ("shop-5000", "s--"), ("shop-50000", "^:")):
            latency.plot(sizes, [c["scopes"][scope]["k10"]["p50_ms"] for c in rows], style, color=colour,
                         label=f"{kind}, {scope}")
        memory.plot(sizes, [c["memory"]["anon_bytes_per_vector"] for c in rows], "o-", color=colour,
                    label=f"{kind}: process's own")
        memory.plot(sizes, [c["memory"]["file_bytes_per_vector"] for c in rows], "x:", color=colour,
                    label=f"{kind}: page cache (mmap)")
    latency.set(xscale="log", yscale="log", xlabel="vectors in the index", ylabel="p50 ms, k=10, one thread",
                title="query latency as the index grows")
    memory.set(xscale="log", yscale="log", xlabel="vectors in the index", ylabel="resident bytes per vector",
               title="memory per vector")
    latency.legend(fontsize=7)
    memory.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--large", type=int, default=3_000_000, help="one more size, for the compressed kinds")
    parser.add_argument("--kinds", default="hnsw,hnsw_sq8,ivf_pq")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef_construction", type=int, default=200,
                        help="HNSW build breadth here (the store's default, 512, builds ~2.5x slower)")
    parser.add_argument("--ef_search", type=int, default=None, help="default: the service's (search.server)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where scale.json and scale.png go")
    parser.add_argument("--query_cell", nargs=3, metavar=("DIR", "TRUTH", "EF"), help=argparse.SUPPRESS)
    parser.add_argument("--build_cell", nargs=5, metavar=("KIND", "N", "QUERIES", "EFC", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_cell:
        kind, n, queries_n, ef_construction, work = args.build_cell
        print(json.dumps(build_cell(kind, int(n), int(queries_n), int(ef_construction), Path(work))))
        return {}
    if args.query_cell:
        directory, truth_file, ef = args.query_cell
        print(json.dumps(query_cell(directory, truth_file, int(ef))))
        return {}
    from search.server import DEFAULT_EF_SEARCH

    ef_search = args.ef_search or DEFAULT_EF_SEARCH
    kinds = args.kinds.split(",")
    plan = [(kind, int(n)) for kind in kinds for n in args.sizes.split(",")]
    plan += [(kind, args.large) for kind in ("ivf_pq", "hnsw_sq8") if kind in kinds and args.large]  # cheap first
    path = args.output / "scale.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    cells = result.get("cells", {})
    args.output.mkdir(parents=True, exist_ok=True)
    for kind, n in plan:
        print(f"== {kind}, {n:,} vectors", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
            cells[f"{kind}/{n}"] = run_cell(kind, n, args.queries, ef_search, args.ef_construction, Path(work))
        result = {"name": "scale", "dim": DIM, "queries": args.queries, "ef_search": ef_search,
                  "ef_construction": args.ef_construction, "hnsw_m": 16, "ivf_nprobe": 32,
                  "shops": list(SHOPS), "cells": cells, "targets": targets(cells)}
        result["holds"] = all(result["targets"].values())
        path.write_text(json.dumps(result, indent=2) + "\n")
        report(cells[f"{kind}/{n}"])
    plot(cells, args.output / "scale.png")
    for name, ok in result.get("targets", {}).items():
        print(f"{'holds' if ok else 'MISSES'}: {name}")
    print(f"wrote {path} and scale.png")
    return result


def report(cell: dict) -> None:
    m = cell["memory"]
    print(f"  memory per vector: {m['anon_bytes_per_vector']:,.0f} B own, {m['file_bytes_per_vector']:,.0f} B page "
          f"cache, index file {m['index_file_bytes_per_vector']:,.0f} B; build {cell['build_per_s']:,.0f}/s; ingest "
          f"{cell['ingest']['upserts_per_s']:,.0f}/s, searchable within {cell['ingest']['searchable_s_max']:.3f} s")
    print(f"  {'scope':>10} | {'k=10 p50/p99 ms':>16} | {'QPS':>6} | {'recall@10':>9} | {'k=100 p50/p99 ms':>17} | "
          f"{'recall@100':>10}")
    for scope, row in cell["scopes"].items():
        print(f"  {scope:>10} | {row['k10']['p50_ms']:>7.2f}/{row['k10']['p99_ms']:<8.2f} | {row['k10']['qps']:>6.0f} | "
              f"{row['k10']['recall@10']['mean']:>9.4f} | {row['k100']['p50_ms']:>7.2f}/{row['k100']['p99_ms']:<9.2f} | "
              f"{row['k100']['recall@100']['mean']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
