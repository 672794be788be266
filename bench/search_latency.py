"""End-to-end search latency: text → query vector → search, over HTTP from a second process.

    python -m bench.search_latency [--vectors 50000] [--rate 20] [--concurrency 4] [--seconds 20]

Builds an index of clustered vectors in the packaged model's space (1,664-d), starts
`python -m search.server` as its own process on 127.0.0.1, and drives it with an open-loop load
(requests sent at a fixed rate by `--concurrency` threads, latency measured by the client) of
text queries, which the server embeds with the model before searching. Baseline, same run, same
load: vector queries, which skip the embedding. Writes bench/results/search_latency.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.common import percentiles, write_result
from bench.index import embedding_like
from localstack.emulator import free_port
from model_handlers.backends import embedding_dim
from model_handlers.config import DEFAULT_MODEL
from schemas import EmbeddingRecord
from search.sharded import ShardedIndex, shard_of

QUERIES = ["black ankle boot", "white sneaker", "leather bag", "summer dress", "wool coat", "denim trousers",
           "striped t-shirt", "red sandal", "grey pullover", "linen shirt"]


def build_index(directory: Path, vectors: int, shards: int) -> None:
    dim = embedding_dim(DEFAULT_MODEL)
    ShardedIndex.ensure_layout(directory, shards, DEFAULT_MODEL, dim)
    writer = ShardedIndex.open(directory, read_only=False)
    data = embedding_like(vectors, dim, seed=1)
    when = dt.datetime.now(dt.timezone.utc)
    records = [EmbeddingRecord(f"p{i}", f"shop-{i % 10}", "upsert", 1, f"e{i}", tuple(v.tolist()), (), (), 1,
                               f"product {i}", "", DEFAULT_MODEL, when, when) for i, v in enumerate(data)]
    for n, shard in enumerate(writer.shards):
        shard.apply([r for r in records if shard_of(r.product_id, shards) == n])
        shard.compact(force=True)
        shard.close()


def drive(url: str, bodies: list[dict], rate: float, concurrency: int, seconds: float) -> dict:
    """Open loop: request i is sent at start + i/rate (or as soon as a thread is free)."""
    session = requests.Session()
    latencies, errors, server_ms = [], [], []
    lock = threading.Lock()
    total = int(rate * seconds)
    start = time.perf_counter() + 0.5

    def one(i: int):
        time.sleep(max(0.0, start + i / rate - time.perf_counter()))
        sent = time.perf_counter()
        try:
            response = session.post(url, json=bodies[i % len(bodies)], timeout=30)
            ok = response.status_code == 200
            took = response.json().get("took_ms") if ok else None
        except requests.RequestException:
            ok, took = False, None
        with lock:
            (latencies if ok else errors).append((time.perf_counter() - sent) * 1000)
            if took is not None:
                server_ms.append(took)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    elapsed = time.perf_counter() - start
    p50, p99 = percentiles(latencies, 50, 99)
    s50, s99 = percentiles(server_ms, 50, 99)
    return {"requests": total, "errors": len(errors), "achieved_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": p50, "p99_ms": p99, "server_p50_ms": s50, "server_p99_ms": s99}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="bench-search-"))
    port = free_port()
    server = None
    try:
        print(f"building an index of {args.vectors:,} vectors in {args.shards} shards ...", flush=True)
        build_index(directory, args.vectors, args.shards)
        server = subprocess.Popen([sys.executable, "-m", "search.server", "--index_dir", str(directory),
                                   "--port", str(port), "--device", "cpu"])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        for text in QUERIES:  # warm-up
            requests.post(f"{url}/v1/search", json={"text": text, "k": args.k}, timeout=60).raise_for_status()
        vectors = embedding_like(50, embedding_dim(DEFAULT_MODEL), seed=7)
        text = drive(f"{url}/v1/search", [{"text": t, "k": args.k} for t in QUERIES],
                     args.rate, args.concurrency, args.seconds)
        vector = drive(f"{url}/v1/search", [{"vector": v.tolist(), "k": args.k} for v in vectors],
                       args.rate, args.concurrency, args.seconds)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    load = f"{args.rate:g} requests/s open loop, {args.concurrency} client threads, {args.seconds:g}s, k={args.k}"
    print(f"load: {load}; index {args.vectors:,} x {embedding_dim(DEFAULT_MODEL)}-d, {args.shards} shards, "
          f"{DEFAULT_MODEL} on CPU")
    for name, row in (("text (embed + search)", text), ("vector (search only)", vector)):
        print(f"{name:>22}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['achieved_rps']} req/s, "
              f"{row['errors']} errors (server-side p50 {row['server_p50_ms']:.1f} ms)")
    result = {
        "what": "client-side latency of POST /v1/search with text queries (query embedding included)",
        "load": load, "index": {"vectors": args.vectors, "shards": args.shards, "model": DEFAULT_MODEL},
        "figure": {"p50_ms": text["p50_ms"], "p99_ms": text["p99_ms"]},
        "baseline": {"what": "vector queries (no embedding), same load", "p50_ms": vector["p50_ms"],
                     "p99_ms": vector["p99_ms"]},
        "ratio": round(text["p50_ms"] / max(vector["p50_ms"], 1e-3), 2),
        "target": "none set: reported (issue 6, item 6)",
        "holds": text["errors"] == 0 and vector["errors"] == 0,
        "text": text, "vector": vector,
    }
    write_result("search_latency", result)
    return result


if __name__ == "__main__":
    main()
