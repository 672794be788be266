"""Freshness where the user stands: commit → visible in a separate `search.server` process, as a shard grows.

    python -m bench.freshness_scale [--sizes 100000,1000000] [--rounds 20]

Per size: a shard of that many live 32-d products (filterable brand and price) is built and merged
into one HNSW segment (small graph settings: this measures bookkeeping, not the graph), and
`python -m search.server` serves it. This process is the writer: each round commits 1,000 upserts
of new products (a shop of their own), 50 deletes and 50 attribute patches, then asks the server
every 10 ms for that shop until all 1,000 are there. Reported: commit → visible p50/p99 (from the
writer's commit returning to the server's answer holding them), the writer's commit p50, the
server's resident memory, and the baseline of the same run: what the server did per commit before
commits were applied as changes, a whole load of the shard (timed by opening it cold, in a process
of its own). Target (issue: fresh at scale): visible p50 <= 0.5 s and p99 <= 1 s at every size,
growing at most 1.5x for 10x the products.
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

from bench.common import percentiles, write_result
from search.fields import parse_filterable
from search.segment import SegmentParams
from search.sharded import ShardedIndex
from search.store import IndexStore, StoreSettings
from tests.support.index_helpers import WHEN
from tests.support.server_process import ServerProcess
from schemas import EmbeddingRecord

DIM = 32
MODEL = "bench:vectors-32"  # a model the service does not run: vector queries only, no model loaded
SETTINGS = StoreSettings(segment=SegmentParams("hnsw", m=8, ef_construction=40),
                         filterable=parse_filterable("brand,price:float"))


def records(start: int, count: int, shop: str | None = None, version: int = 1, op: str = "upsert",
            rng: np.random.Generator | None = None) -> list[EmbeddingRecord]:
    rng = rng or np.random.default_rng(start)
    vectors = rng.normal(size=(count, DIM)).astype(np.float32) if op == "upsert" else None
    if vectors is not None:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = []
    for i in range(count):
        n = start + i
        out.append(EmbeddingRecord(
            f"p{n}", shop or f"shop-{n % 1000}", op, version, f"e{n}-{version}",
            vectors[i] if vectors is not None else (), (), (), 1, f"product {n}", "", MODEL, WHEN, WHEN,
            attributes={"brand": f"brand-{n % 50}", "price": float(n % 500)}))
    return out


def build(directory: Path, size: int) -> None:
    ShardedIndex.ensure_layout(directory, 1, MODEL, DIM, SETTINGS)
    store = IndexStore(ShardedIndex.shard_dir(directory, 0), model=MODEL, dim=DIM, settings=SETTINGS)
    started = time.perf_counter()
    for start in range(0, size, 10_000):
        store.apply(records(start, min(10_000, size - start)))
    store.compact(force=True)
    print(f"  built {size:,} products in {time.perf_counter() - started:.0f} s", flush=True)
    store.close()


def cold_open_secs(directory: Path) -> float:
    """A whole load of the shard, in a fresh process: what a replica did on every commit before."""
    code = ("import time, sys; from search.store import IndexStore; t = time.perf_counter(); "
            f"IndexStore({str(ShardedIndex.shard_dir(directory, 0))!r}, read_only=True); "
            "print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return float(done.stdout.strip())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(directory: Path, size: int, rounds: int) -> dict:
    server = ServerProcess(directory)
    store = IndexStore(ShardedIndex.shard_dir(directory, 0), model=MODEL, dim=DIM, settings=SETTINGS)
    rng = np.random.default_rng(size)
    visible, commits = [], []
    try:
        probe = records(0, 1)[0].embedding.tolist()
        for r in range(rounds):
            fresh = records(size + r * 1000, 1000, shop=f"fresh-{r}", rng=rng)
            gone = records(int(rng.integers(0, size)), 50, version=2 + r, op="delete")
            patched = [dataclasses.replace(p, op="patch", version=2 + r, attributes={"brand": "patched", "price": 1.0})
                       for p in records(int(rng.integers(0, size)), 50)]
            started = time.perf_counter()
            store.apply(fresh + gone + patched)
            committed = time.perf_counter()
            commits.append(committed - started)
            deadline = committed + 30
            while time.perf_counter() < deadline:
                answer = requests.post(f"{server.url}/v1/search", json={"vector": probe, "k": 1000,
                                                                         "shop_id": f"fresh-{r}"}, timeout=10).json()
                if len(answer["results"]) == 1000:
                    visible.append(time.perf_counter() - committed)
                    break
                time.sleep(0.01)
            else:
                raise RuntimeError(f"round {r}: not visible within 30 s")
            store.compact_in_background()
        store.wait_for_compaction()
        memory = rss_mb(server.process.pid)
    finally:
        server.stop()
        store.close()
    vis50, vis99 = percentiles(visible, 50, 99)
    (commit50,) = percentiles(commits, 50)
    return {"live_products": size, "visible_p50_s": round(vis50, 3), "visible_p99_s": round(vis99, 3),
            "commit_p50_ms": round(commit50 * 1000, 1), "server_rss_mb": round(memory, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    cells = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-freshness-scale-") as tmp:
            directory = Path(tmp) / "index"
            build(directory, size)
            cell = measure(directory, size, args.rounds)
            cell["baseline_whole_load_s"] = round(cold_open_secs(directory), 3)
            cells.append(cell)
            print(f"{size:>10,} products: visible p50 {cell['visible_p50_s']} s, p99 {cell['visible_p99_s']} s; "
                  f"commit p50 {cell['commit_p50_ms']} ms; server {cell['server_rss_mb']} MB; a whole load "
                  f"(each commit's cost to a replica before) {cell['baseline_whole_load_s']} s", flush=True)
    first, last = cells[0], cells[-1]
    growth = round(last["visible_p50_s"] / first["visible_p50_s"], 2)
    holds = all(c["visible_p50_s"] <= 0.5 and c["visible_p99_s"] <= 1.0 for c in cells) and growth <= 1.5
    result = {
        "name": "freshness_scale",
        "what": "commit -> visible in a separate search.server process (s) for 1,000 upserts + 50 deletes + 50 "
                "patches per commit, 32-d vectors, one HNSW segment (m 8, efConstruction 40) plus the commits' "
                "flat segments, filterable brand and price; baseline: a whole load of the shard (what each "
                "commit cost a replica before commits were applied as changes)",
        "cells": cells, "visible_p50_growth": growth,
        "target": "visible p50 <= 0.5 s and p99 <= 1 s at every size, p50 growing <= 1.5x from the first size "
                  "to the last", "holds": holds,
    }
    print(f"visible p50 growth {first['live_products']:,} -> {last['live_products']:,}: {growth}x "
          f"({'holds' if holds else 'MISSED'})")
    write_result("freshness_scale", result)


if __name__ == "__main__":
    main()
