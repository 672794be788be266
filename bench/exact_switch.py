"""Scoped queries with and without the cost rule that scores a scope exactly when the graph's widened
beam would cost more (`StoreSettings.graph_step_cost`), on one store, in one run.

    python -m bench.exact_switch [--kind hnsw_sq8] [--vectors 1000000]

The vectors and shops of bench.scale (shops of 500, 5,000 and 50,000 products spread over the index),
one compacted segment, one thread, the service's efSearch: p50/p99 latency and recall@k against
exact search over the shop, at k=10 and k=100, with the rule (`graph_step_cost` rows a step) and without it (only
`exact_below`, 10,000 docs, decides: the baseline). Writes bench/results/exact_switch.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from bench.index import RESULTS, embedding_like
from bench.scale import COMMIT, DIM, SCOPES, bench_settings, exact_truth, records, shop_of_products, timed_scope


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="hnsw_sq8")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--ef_construction", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import faiss

    from search.server import DEFAULT_EF_SEARCH
    from search.store import IndexStore

    n = args.vectors
    data = embedding_like(n + args.queries, DIM)
    vectors, queries = data[:n], np.ascontiguousarray(data[n:])
    shops = shop_of_products(n)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    truth = exact_truth(vectors, queries, shops)
    settings = bench_settings(args.kind, args.ef_construction)
    result = {"name": "exact_switch", "kind": args.kind, "vectors": n, "ef_search": DEFAULT_EF_SEARCH,
              "graph_step_cost": settings.graph_step_cost, "exact_below": settings.exact_below, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-exact-switch-") as work:
        store = IndexStore(Path(work), model="bench", dim=DIM, settings=settings)
        for start in range(0, n, COMMIT):
            store.apply(records(vectors[start:start + COMMIT], shops[start:start + COMMIT], start))
        del data, vectors
        store.compact(force=True)
        store.close()
        faiss.omp_set_num_threads(1)
        stores = {"rule": IndexStore(work, read_only=True, settings=settings),
                  "exact_below only": IndexStore(work, read_only=True,
                                                 settings=dataclasses.replace(settings, graph_step_cost=0))}
        print(f"{args.kind}, {n:,} vectors, efSearch {DEFAULT_EF_SEARCH}, one thread")
        print(f"  {'shop':>10} {'k':>4} | {'with the rule p50/p99 ms':>25} {'recall':>7} | "
              f"{'exact_below only p50/p99':>25} {'recall':>7}")
        for scope in SCOPES[1:]:
            for k in (10, 100):
                row = {"shop": scope, "k": k}
                for name, store in stores.items():
                    row[name] = timed_scope(store, queries, truth[scope], k, DEFAULT_EF_SEARCH, scope)
                a, b = row["rule"], row["exact_below only"]
                print(f"  {scope:>10} {k:>4} | {a['p50_ms']:>12.2f}/{a['p99_ms']:<12.2f} "
                      f"{a[f'recall@{k}']['mean']:>7.4f} | {b['p50_ms']:>12.2f}/{b['p99_ms']:<12.2f} "
                      f"{b[f'recall@{k}']['mean']:>7.4f}", flush=True)
                result["rows"].append(row)
        for store in stores.values():
            store.close()
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "exact_switch.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output / 'exact_switch.json'}")
    return result


if __name__ == "__main__":
    main()
