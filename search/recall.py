"""Recall of the approximate search against exact search over the same live vectors (docs/ARCHITECTURE.md §9).

    python -m search.recall --index_dir DIR --k 100 --ef_search 100,500,2000 [--queries 200]

For each efSearch it reports recall@k as mean, median, standard deviation and minimum over the
queries (the mean alone hides the queries that fail, as the Marqo write-up shows), and p50/p99
latency of both searches. Queries are live vectors with a little noise, so a query is near its
product but is not it. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from argtypes import bounded
from search.sharded import ShardedIndex

__all__ = ["measure_recall", "main"]


def _timed(fn) -> tuple[list, float]:
    started = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - started) * 1000


def measure_recall(index, k: int, ef_searches: list[int], queries: int, seed: int = 0,
                   noise: float = 0.05) -> dict:
    """`index` is anything with `search(query, k, ef_search, exact=...)` and `live_vectors()`."""
    _, vectors = index.live_vectors()
    if len(vectors) == 0:
        raise ValueError("the index holds no live vectors")
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)]
    picked = picked + rng.normal(scale=noise / np.sqrt(vectors.shape[1]), size=picked.shape).astype(np.float32)
    picked /= np.linalg.norm(picked, axis=1, keepdims=True)
    exact, exact_ms = [], []
    for query in picked:
        hits, took = _timed(lambda: index.search(query, k=k, exact=True))
        exact.append({hit.product_id for hit in hits})
        exact_ms.append(took)
    rows = []
    for ef in ef_searches:
        recalls, latencies = [], []
        for query, truth in zip(picked, exact):
            hits, took = _timed(lambda: index.search(query, k=k, ef_search=ef))
            latencies.append(took)
            recalls.append(len(truth & {hit.product_id for hit in hits}) / max(1, len(truth)))
        recalls = np.array(recalls)
        rows.append({
            "ef_search": ef, "mean": float(recalls.mean()), "median": float(np.median(recalls)),
            "std": float(recalls.std()), "min": float(recalls.min()),
            "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
            "recalls": recalls.round(4).tolist(),
        })
    return {"k": k, "queries": len(picked), "live_vectors": int(len(vectors)),
            "exact_p50_ms": float(np.percentile(exact_ms, 50)), "exact_p99_ms": float(np.percentile(exact_ms, 99)),
            "by_ef_search": rows}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["by_ef_search"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.boxplot([row["recalls"] for row in rows], tick_labels=[str(row["ef_search"]) for row in rows], showmeans=True)
    left.set_xlabel("efSearch")
    left.set_ylabel(f"recall@{report['k']} per query")
    left.set_title(f"recall@{report['k']} over {report['queries']} queries ({report['live_vectors']} vectors)")
    efs = [row["ef_search"] for row in rows]
    right.plot(efs, [row["p50_ms"] for row in rows], "o-", label="HNSW p50")
    right.plot(efs, [row["p99_ms"] for row in rows], "o--", label="HNSW p99")
    right.axhline(report["exact_p50_ms"], color="grey", label="exact p50")
    right.set_xscale("log")
    right.set_xlabel("efSearch")
    right.set_ylabel("latency (ms)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m search.recall", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--index_dir", required=True, help="the index to measure (a local path)")
    # As the service: at most 1,000 results a query, efSearch up to 20,000; queries are exact searches
    # too, so 100,000 of them is hours already.
    parser.add_argument("--k", type=bounded(int, 1, 1000), default=100, help="recall@k: results compared per query")
    parser.add_argument("--ef_search", default="100,500,2000", help="comma-separated efSearch values")
    parser.add_argument("--queries", type=bounded(int, 1, 100_000), default=200,
                        help="queries, drawn from the index's live vectors")
    parser.add_argument("--output", default=None, help="JSON path (none: INDEX_DIR/recall.json); PNG beside it")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ef_searches = [int(x) for x in args.ef_search.split(",")]
    except ValueError:
        parser.error(f"--ef_search {args.ef_search!r} must be comma-separated whole numbers")
    if not all(1 <= ef <= 20_000 for ef in ef_searches):
        parser.error("--ef_search: every value must be in 1..20000")
    if "://" in args.index_dir:
        parser.error("--index_dir must be a local path (measure a replica: search.server --cache_dir keeps one)")
    try:
        index = ShardedIndex.open(args.index_dir)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    report = measure_recall(index, args.k, ef_searches, args.queries)
    output = Path(args.output or Path(args.index_dir) / "recall.json")
    output.write_text(json.dumps(report, indent=2))
    plot(report, output.with_suffix(".png"))
    print(f"recall@{report['k']} over {report['queries']} queries, {report['live_vectors']} live vectors "
          f"(exact search p50 {report['exact_p50_ms']:.2f} ms)")
    print(f"{'efSearch':>9} {'mean':>7} {'median':>7} {'std':>7} {'min':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for row in report["by_ef_search"]:
        print(f"{row['ef_search']:>9} {row['mean']:>7.4f} {row['median']:>7.4f} {row['std']:>7.4f} "
              f"{row['min']:>7.4f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f}")
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
