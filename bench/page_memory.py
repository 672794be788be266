"""A search server's memory under page sizes that vary, against the same count of requests at one size.

    python -m bench.page_memory [--products 20000] [--requests 500,5000] [--clients 8]

Starts `python -m search.server` on an index of `--products` 64-d products and measures its resident
memory (VmRSS of that process, where the user's queries land) after a warm-up, after each count of
vector queries with k=10 (the baseline), and after each count with k drawn from 1..1000 (what a
storefront's "show 24 / 48 / 96" and an API client's page sizes do). A statement per page size kept
prepared by sqlite3 (128 per connection, a connection per thread and shard) once grew this process
from 108 to 370 MB in two minutes; the target: 10x the random-size requests grow resident memory by
at most 10% more than the same requests at one size.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from bench.common import write_result
from search.sharded import ShardedIndex
from search.store import IndexStore
from tests.support.index_helpers import record
from tests.support.server_process import ServerProcess

DIM = 64
# Vectors from an embedder the service does not run: it answers vector queries and loads no query
# model, so what grows is the service's own memory.
MODEL = "bench:vectors-64"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def build(directory: Path, products: int) -> None:
    ShardedIndex.ensure_layout(directory, 1, MODEL, DIM)
    store = IndexStore(ShardedIndex.shard_dir(directory, 0), model=MODEL, dim=DIM)
    for start in range(0, products, 5000):
        store.apply([record(f"p{n}", 1, dim=DIM, model=MODEL, seed=n) for n in range(start, min(products, start + 5000))])
    store.compact(force=True)
    store.close()


def run_queries(url: str, count: int, clients: int, page_size) -> float:
    """`count` vector queries from `clients` threads; returns the seconds they took."""
    rng = np.random.default_rng(count)
    vectors = rng.normal(size=(64, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    session = requests.Session()

    def one(n: int) -> None:
        response = session.post(f"{url}/v1/search", json={"vector": vectors[n % 64].tolist(), "k": page_size(n)},
                                timeout=30)
        response.raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(count)))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=20_000)
    parser.add_argument("--requests", default="500,5000", help="request counts, the second 10x the first")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.requests.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-page-memory-") as tmp:
        build(Path(tmp) / "index", args.products)
        rows = {}
        for name, page_size in (("fixed_k10", lambda n: 10),
                                ("random_k1_1000", lambda n, r=random.Random(7): r.randint(1, 1000))):
            server = ServerProcess(Path(tmp) / "index")  # a fresh process per series: each starts alike
            try:
                pid = server.process.pid
                run_queries(server.url, 200, args.clients, lambda n: 10)  # warm-up: threads, pages, caches
                series = {"after_warmup_mb": round(rss_mb(pid), 1)}
                for count in counts:
                    took = run_queries(server.url, count, args.clients, page_size)
                    series[f"after_{count}_mb"] = round(rss_mb(pid), 1)
                    series[f"qps_{count}"] = round(count / took, 1)
                    print(f"{name}: after {count} more requests {series[f'after_{count}_mb']} MB "
                          f"({series[f'qps_{count}']} queries/s)", flush=True)
                rows[name] = series
            finally:
                server.stop()
    growth = {name: round(s[f"after_{counts[-1]}_mb"] - s["after_warmup_mb"], 1) for name, s in rows.items()}
    ratio = round(rows["random_k1_1000"][f"after_{counts[-1]}_mb"] / rows["fixed_k10"][f"after_{counts[-1]}_mb"], 3)
    result = {
        "name": "page_memory",
        "what": "VmRSS of a search.server process (MB) after a warm-up and after each count of vector queries, "
                "k fixed at 10 (baseline) against k drawn from 1..1000",
        "products": args.products, "clients": args.clients, "request_counts": counts, "series": rows,
        "growth_mb": growth, "random_over_fixed": ratio,
        "target": "random-size pages end at most 1.1x the fixed-size process's memory", "holds": ratio <= 1.1,
    }
    print(f"growth over the run: {growth}; random/fixed at the end {ratio} (target <= 1.1: "
          f"{'holds' if result['holds'] else 'MISSED'})")
    write_result("page_memory", result)


if __name__ == "__main__":
    main()
