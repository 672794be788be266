"""Shared by the index tests: records, and the last-writer-wins truth a store must equal."""

from __future__ import annotations

import datetime as dt

import numpy as np

from schemas import EmbeddingRecord
from search.sharded import ShardedIndex, shard_of

WHEN = dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc)
MODEL = "test-model"


def unit_vector(seed: int, dim: int) -> tuple[float, ...]:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def record(product_id: str, version: int, op: str = "upsert", dim: int = 8, shop_id: str = "shop-a",
           seed: int | None = None, model: str = MODEL) -> EmbeddingRecord:
    vector = unit_vector(hash((product_id, version)) % 2**32 if seed is None else seed, dim) if op == "upsert" else ()
    return EmbeddingRecord(product_id, shop_id, op, version, f"{product_id}@{version}", vector, (), (), 1,
                           f"title {product_id}", f"http://img/{product_id}.jpg", model, WHEN, WHEN)


def last_writer_wins(records) -> dict[str, EmbeddingRecord]:
    """product_id → the record that must be in force (the first one seen at the highest version)."""
    truth: dict[str, EmbeddingRecord] = {}
    for r in records:
        if r.product_id not in truth or r.version > truth[r.product_id].version:
            truth[r.product_id] = r
    return truth


def live_truth(records) -> dict[str, tuple[int, str]]:
    return {pid: (r.version, r.shop_id) for pid, r in last_writer_wins(records).items() if r.op == "upsert"}


def build_index(directory, model: str, dim: int, products: int = 40, seed: int = 0, shards: int = 2,
                prefix: str = "p") -> None:
    """An index of `products` random unit vectors of `model` in `shards` shards, one commit each."""
    ShardedIndex.ensure_layout(directory, shards, model, dim)
    records = [record(f"{prefix}{n}", 1, dim=dim, seed=seed * 1000 + n, model=model) for n in range(products)]
    for shard in range(shards):
        store = ShardedIndex.open_writer(directory, shard, model, dim)
        store.apply([r for r in records if shard_of(r.product_id, shards) == shard])
        store.close()
