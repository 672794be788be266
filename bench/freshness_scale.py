"""Freshness where the user stands: commit → visible in a separate `search.server` process, as a shard grows.

    python -m bench.freshness_scale [--sizes 100000,1000000] [--rounds 20] [--update_size 100000]

Per size: a shard of that many live 32-d products (filterable brand and price) is built and merged
into one HNSW segment (small graph settings, m 8 and efConstruction 40: this measures bookkeeping,
not the graph), and `python -m search.server` serves it. This process is the writer: each round
commits 1,000 upserts of new products (a shop of their own), 50 deletes and 50 attribute patches,
then asks the server every 10 ms for that shop until all 1,000 are there. Reported per size:
- commit → visible p50/p99, from the writer's commit returning to the server's answer holding them;
- the writer's commit p50 (1,000 upserts, 50 deletes, 50 patches);
- a reader's CPU per refresh: a read-only store in this process applies each commit, timed by its
  thread's CPU time (the same code the server's refresh runs);
- the server's resident memory, and the time to open the shard cold in a process of its own (the
  baseline: what each commit cost a replica when it reloaded the shard).
Then, at `--update_size` products, memory under updates: every product is updated 10 times (batches
of 10,000, merges in the background as the index pipeline runs them) and the server's resident
memory after the tenth round is compared with after the first.

Targets (issue: fresh at scale): visible p50 <= 0.5 s and p99 <= 1 s at every size, p50 growing at
most 1.5x from the first size to the last; the writer's commit p50 growing at most 1.5x; the server's
memory after 10 update rounds at most 1.2x after the first. Writes freshness_scale.json and .png.
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


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory (VmRSS), or one part of it (RssAnon, RssFile), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


def serve(directory: Path) -> ServerProcess:
    return ServerProcess(directory, ready_secs=1800)  # a cold open of 10M products takes minutes


def measure(directory: Path, size: int, rounds: int) -> dict:
    server = serve(directory)
    shard = ShardedIndex.shard_dir(directory, 0)
    store = IndexStore(shard, model=MODEL, dim=DIM, settings=SETTINGS)
    reader = IndexStore(shard, read_only=True)
    rng = np.random.default_rng(size)
    visible, commits, refresh_cpu = [], [], []
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
            cpu = time.thread_time()
            reader.refresh()
            refresh_cpu.append(time.thread_time() - cpu)
            store.compact_in_background()
        store.wait_for_compaction()
        memory = rss_mb(server.process.pid)
    finally:
        server.stop()
        store.close()
        reader.close()
    vis50, vis99 = percentiles(visible, 50, 99)
    (commit50,) = percentiles([t * 1000 for t in commits], 50)  # in ms: percentiles rounds to 3 decimals
    (cpu50,) = percentiles([t * 1000 for t in refresh_cpu], 50)
    return {"live_products": size, "visible_p50_s": round(vis50, 3), "visible_p99_s": round(vis99, 3),
            "commit_p50_ms": commit50, "reader_refresh_cpu_p50_ms": cpu50,
            "server_rss_mb": round(memory, 1)}


def update_rounds(directory: Path, size: int, rounds: int = 10) -> dict:
    """The server's resident memory after each round in which every product is updated once."""
    server = serve(directory)
    store = IndexStore(ShardedIndex.shard_dir(directory, 0), model=MODEL, dim=DIM, settings=SETTINGS)
    memory, anon = [], []
    try:
        for r in range(rounds):
            started = time.perf_counter()
            for start in range(0, size, 10_000):
                store.apply(records(start, min(10_000, size - start), version=2 + r))
                store.compact_in_background()
            store.finish_compaction()
            deadline = time.perf_counter() + 120
            while requests.get(f"{server.url}/healthz", timeout=10).json()["generation"] != store.generation:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"round {r}: the server did not reach generation {store.generation}")
                time.sleep(0.05)
            time.sleep(0.5)  # the old segments' memory released
            memory.append(round(rss_mb(server.process.pid), 1))
            anon.append(round(rss_mb(server.process.pid, "RssAnon"), 1))
            print(f"  update round {r + 1}: {size:,} products in {time.perf_counter() - started:.0f} s, server "
                  f"{memory[-1]} MB ({anon[-1]} MB anonymous), segments {[(s['kind'], s['count'], s['live']) for s in store.stats()['segments']]}", flush=True)
    finally:
        server.stop()
        store.close()
    return {"live_products": size, "rounds": rounds, "server_rss_mb_by_round": memory,
            "ratio_last_to_first": round(memory[-1] / memory[0], 3)}


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [c["live_products"] for c in cells]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(sizes, [c["visible_p50_s"] for c in cells], "o-", label="commit → visible in the server, p50")
    left.plot(sizes, [c["visible_p99_s"] for c in cells], "s--", label="p99")
    left.plot(sizes, [c["baseline_whole_load_s"] for c in cells], "x:", label="a whole load (before)")
    left.set_yscale("log")
    left.set_ylabel("seconds")
    right.plot(sizes, [c["commit_p50_ms"] for c in cells], "o-", label="writer commit p50 (1,100 records)")
    right.plot(sizes, [c["reader_refresh_cpu_p50_ms"] for c in cells], "s--", label="reader CPU per refresh p50")
    right.set_ylabel("milliseconds")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("live products in the shard")
        ax.legend(fontsize=8)
    fig.suptitle("One shard, 32-d vectors, a separate search.server process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--update_size", type=int, default=100_000)
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON and the PNG go")
    args = parser.parse_args(argv)
    cells = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-freshness-scale-") as tmp:
            directory = Path(tmp) / "index"
            build(directory, size)
            cell = measure(directory, size, args.rounds)
            cell["baseline_whole_load_s"] = cell["cold_open_s"] = round(cold_open_secs(directory), 3)
            cells.append(cell)
            print(f"{size:>10,} products: visible p50 {cell['visible_p50_s']} s, p99 {cell['visible_p99_s']} s; "
                  f"commit p50 {cell['commit_p50_ms']} ms; reader CPU per refresh {cell['reader_refresh_cpu_p50_ms']} "
                  f"ms; server {cell['server_rss_mb']} MB; cold open (each commit's cost to a replica before) "
                  f"{cell['cold_open_s']} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-freshness-updates-") as tmp:
        build(Path(tmp) / "index", args.update_size)
        updates = update_rounds(Path(tmp) / "index", args.update_size)
    first, last = cells[0], cells[-1]
    growth = round(last["visible_p50_s"] / first["visible_p50_s"], 2)
    commit_growth = round(last["commit_p50_ms"] / first["commit_p50_ms"], 2)
    checks = {
        "visible p50 <= 0.5 s and p99 <= 1 s at every size": all(
            c["visible_p50_s"] <= 0.5 and c["visible_p99_s"] <= 1.0 for c in cells),
        "visible p50 grows <= 1.5x": growth <= 1.5,
        "writer commit p50 grows <= 1.5x": commit_growth <= 1.5,
        "server memory after 10 update rounds <= 1.2x the first": updates["ratio_last_to_first"] <= 1.2,
    }
    result = {
        "what": "commit -> visible in a separate search.server process (s) for 1,000 upserts + 50 deletes + 50 "
                "patches per commit, 32-d vectors, one HNSW segment (m 8, efConstruction 40) plus the commits' "
                "flat segments, filterable brand and price; baseline: a whole load of the shard (what each "
                "commit cost a replica before commits were applied as changes)",
        "command": "python -m bench.freshness_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cells": cells, "visible_p50_growth": growth, "commit_p50_growth": commit_growth,
        "update_rounds": updates, "checks": checks, "holds": all(checks.values()),
    }
    for name, ok in checks.items():
        print(f"{'holds ' if ok else 'MISSED'}  {name}")
    print(f"visible p50 growth {first['live_products']:,} -> {last['live_products']:,}: {growth}x; commit p50 "
          f"growth {commit_growth}x; server memory after 10 update rounds / after 1: {updates['ratio_last_to_first']}")
    write_result("freshness_scale", result, args.output)
    plot(cells, args.output / "freshness_scale.png")


if __name__ == "__main__":
    main()
