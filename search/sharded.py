"""An index split into independent stores by a hash of product_id (DESIGN §10).

`index.json` in the index directory records the shard count, model and dimension; shard n
lives in `shard-NNN/`. A search asks every shard for k results (not efSearch) and merges.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from search.store import Hit, IndexMismatch, IndexStore, StoreSettings

__all__ = ["ShardedIndex", "shard_of"]


def shard_of(product_id: str, num_shards: int) -> int:
    """Stable across processes and runs (Python's hash() is salted per process)."""
    return zlib.crc32(product_id.encode("utf-8")) % num_shards


class ShardedIndex:
    def __init__(self, index_dir: str | Path, shards: list[IndexStore], num_shards: int):
        self.index_dir = Path(index_dir)
        self.shards = shards
        self.num_shards = num_shards
        self.model = shards[0].model
        self.dim = shards[0].dim
        self._pool = ThreadPoolExecutor(max(1, min(num_shards, 8)), thread_name_prefix="shard-search")

    @staticmethod
    def layout(index_dir: str | Path) -> dict | None:
        path = Path(index_dir) / "index.json"
        return json.loads(path.read_text()) if path.exists() else None

    @classmethod
    def ensure_layout(cls, index_dir: str | Path, num_shards: int, model: str, dim: int) -> dict:
        """Writes `index.json` if there is none; refuses a layout that disagrees."""
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        wanted = {"num_shards": num_shards, "model": model, "dim": dim}
        current = cls.layout(index_dir)
        if current is None:
            tmp = index_dir / f"index.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(wanted))
            try:
                os.link(tmp, index_dir / "index.json")  # fails if another writer got there first
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            current = cls.layout(index_dir)
        if current != wanted:
            raise IndexMismatch(f"{index_dir} holds {current}, not {wanted}")
        for n in range(num_shards):  # every shard exists from the start, so readers can open them all
            if not (cls.shard_dir(index_dir, n) / "state.sqlite").exists():
                IndexStore(cls.shard_dir(index_dir, n), model=model, dim=dim).close()
        return current

    @staticmethod
    def shard_dir(index_dir: str | Path, shard: int) -> Path:
        return Path(index_dir) / f"shard-{shard:03d}"

    @classmethod
    def open(cls, index_dir: str | Path, read_only: bool = True,
             settings: StoreSettings = StoreSettings()) -> "ShardedIndex":
        layout = cls.layout(index_dir)
        if layout is None:
            raise FileNotFoundError(f"no index at {index_dir} (no index.json)")
        shards = [
            IndexStore(cls.shard_dir(index_dir, n), model=None if read_only else layout["model"],
                       dim=None if read_only else layout["dim"], settings=settings, read_only=read_only)
            for n in range(layout["num_shards"])
        ]
        return cls(index_dir, shards, layout["num_shards"])

    def refresh(self) -> bool:
        return any([shard.refresh() for shard in self.shards])

    def search(self, query: np.ndarray, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
               exact: bool = False) -> list[Hit]:
        per_shard = self._pool.map(lambda shard: shard.search(query, k, ef_search, shop_id, exact), self.shards)
        hits = [hit for shard_hits in per_shard for hit in shard_hits]
        return sorted(hits, key=lambda hit: -hit.score)[:k]

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [shard.live_vectors() for shard in self.shards]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def stats(self) -> dict:
        shards = [shard.stats() for shard in self.shards]
        return {"model": self.model, "dim": self.dim, "num_shards": self.num_shards,
                "live_docs": sum(s["live_docs"] for s in shards),
                "generation": sum(s["generation"] for s in shards), "shards": shards}
