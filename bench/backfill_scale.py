"""A batch backfill through `pipelines.index` as a user runs it, at 100k and 1M products: is the shard
left merged, and does a shop-scoped query over HTTP cost the same at 10x the products?

    python -m bench.backfill_scale [--sizes 100000,1000000] [--queries 300]

Per size: that many 32-d records (shops of 1,000 products, filterable brand and price) in one JSON-lines
file; `python -m pipelines.index --num_shards 1` (DirectRunner, HNSW m 8, efConstruction 40: small
graph settings, since this measures what the backfill leaves, not the graph); then the shard's segments
are read (flat vectors against the merge policy: what `finish_compaction` promises), and
`python -m search.server` answers `--queries` vector queries scoped to a random shop, k 10.
Target (issue: fresh at scale): no more flat vectors than the merge policy allows, and the shop-scoped
query p50 at the largest size at most 1.5x the smallest's.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from bench.common import RESULTS, percentiles, write_result
from bench.freshness_scale import records
from search.merge_policy import MergePolicy
from search.sharded import ShardedIndex
from search.store import IndexStore
from tests.support.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
SHOP_SIZE = 1000


def write_input(directory: Path, size: int) -> None:
    directory.mkdir(parents=True)
    with open(directory / "records-00000-of-00001.jsonl", "w") as out:
        for start in range(0, size, 10_000):
            for r in records(start, min(10_000, size - start)):
                shop = f"shop-{int(r.product_id[1:]) // SHOP_SIZE}"
                out.write(dataclasses.replace(r, shop_id=shop).to_json() + "\n")


def backfill(input_dir: Path, index_dir: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.index", "--input_dir", str(input_dir), "--index_dir",
                    str(index_dir), "--num_shards", "1", "--filterable", "brand,price:float", "--hnsw_m", "8",
                    "--hnsw_ef_construction", "40"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def segments_left(index_dir: Path) -> dict:
    store = IndexStore(ShardedIndex.shard_dir(index_dir, 0), read_only=True)
    try:
        stats = store.stats()
    finally:
        store.close()
    flat = [s for s in stats["segments"] if s["kind"] == "flat"]
    policy = MergePolicy()
    return {"live_docs": stats["live_docs"], "segments": len(stats["segments"]), "flat_segments": len(flat),
            "flat_vectors": sum(s["count"] for s in flat),
            "within_policy": sum(s["count"] for s in flat) < policy.delta_limit
            and len(flat) <= policy.max_delta_segments}


def shop_queries(index_dir: Path, size: int, queries: int) -> list[float]:
    server = ServerProcess(index_dir, ready_secs=600)
    rng = np.random.default_rng(0)
    took = []
    try:
        vector = records(0, 1)[0].embedding.tolist()
        for n in range(queries + 20):
            shop = f"shop-{int(rng.integers(0, size // SHOP_SIZE))}"
            started = time.perf_counter()
            answer = requests.post(f"{server.url}/v1/search", json={"vector": vector, "k": 10, "shop_id": shop},
                                   timeout=30)
            elapsed = time.perf_counter() - started
            answer.raise_for_status()
            if len(answer.json()["results"]) != 10:
                raise RuntimeError(f"{shop}: {len(answer.json()['results'])} results, not 10")
            if n >= 20:  # the first ones warm the scope cache and the page cache
                took.append(elapsed)
    finally:
        server.stop()
    return took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--output", type=Path, default=RESULTS, help="where backfill_scale.json goes")
    args = parser.parse_args(argv)
    cells = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
            write_input(Path(tmp) / "input", size)
            seconds = backfill(Path(tmp) / "input", Path(tmp) / "index")
            cell = {"products": size, "backfill_s": round(seconds, 1), **segments_left(Path(tmp) / "index")}
            took_ms = [t * 1000 for t in shop_queries(Path(tmp) / "index", size, args.queries)]
            p50, p99 = percentiles(took_ms, 50, 99)  # in ms: percentiles rounds to 3 decimals
            cell |= {"shop_query_p50_ms": p50, "shop_query_p99_ms": p99}
            cells.append(cell)
            print(f"{size:>10,} products: backfill {cell['backfill_s']} s; {cell['segments']} segments, "
                  f"{cell['flat_vectors']:,} flat vectors in {cell['flat_segments']} flat segments "
                  f"({'within' if cell['within_policy'] else 'BEYOND'} the merge policy); shop query over HTTP "
                  f"p50 {cell['shop_query_p50_ms']} ms, p99 {cell['shop_query_p99_ms']} ms", flush=True)
    growth = round(cells[-1]["shop_query_p50_ms"] / cells[0]["shop_query_p50_ms"], 2)
    holds = all(c["within_policy"] and c["live_docs"] == c["products"] for c in cells) and growth <= 1.5
    print(f"shop query p50 growth {growth}x ({'holds' if holds else 'MISSED'})")
    write_result("backfill_scale", {
        "what": f"a batch backfill through pipelines.index (DirectRunner, 1 shard, 32-d, HNSW m 8 efConstruction "
                f"40, filterable brand and price), then {args.queries} vector queries (k 10) over HTTP to "
                f"search.server, each scoped to a random shop of {SHOP_SIZE:,} products",
        "cells": cells, "shop_query_p50_growth": growth,
        "target": "flat vectors within the merge policy, shop query p50 growing <= 1.5x", "holds": holds},
        args.output)


if __name__ == "__main__":
    main()
