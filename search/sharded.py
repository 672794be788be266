"""An index split into independent stores by a hash of product_id (docs/ARCHITECTURE.md §10).

`index.json` in the index directory records the shard count, model and dimension; shard n
lives in `shard-NNN/`; an index of tuned vectors keeps its head as `projection.pt`. A search asks every shard for k results (not efSearch) and merges.
The index directory may be on object storage (gs://...): each shard is then a local store
mirrored there (search.mirror), the writer's and every reader's in a local cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np

import storage
from search.mirror import CommitConflict, ShardPublisher, has_snapshot, local_generation, pull, restore
from search.filters import Filter
from search import hybrid
from search.store import ApplyResult, Hit, IndexMismatch, IndexStore, StoreSettings
from search.merge import merge_hits, sum_facets

__all__ = ["HEAD_FILE", "MAX_SHARDS", "ShardWriter", "ShardedIndex", "collapse_near_copies", "enough_open_files", "parse_shards", "shard_of", "writer_cache_dir"]

_log = logging.getLogger(__name__)
# 1,024 shards of ~1M products each is past any catalogue one index serves (resharding is a new index);
# each shard a service opens holds ~6 files, so more would also outgrow common open-file limits.
MAX_SHARDS = 1024
HEAD_FILE = "projection.pt"  # a tuned index keeps its head here, so a service can follow it to a new model
DUPLICATE_COSINE = 0.98  # similar products: a candidate this close to one already shown is a copy of it
SIMILAR_POOL = 4  # candidates per result wanted, before near-duplicates are collapsed
T = TypeVar("T")


def enough_open_files(num_shards: int) -> None:
    """Raises this process's soft limit on open files toward its hard limit when `num_shards` shards
    need more: each open shard holds ~6 (SQLite and its WAL, segment files, the lock), and the common
    default of 1,024 runs out at ~190 shards (a start-up traceback: too many open files)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8 * num_shards + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))


def shard_of(product_id: str, num_shards: int) -> int:
    """Stable across processes and runs (Python's hash() is salted per process)."""
    return zlib.crc32(product_id.encode("utf-8")) % num_shards


def collapse_near_copies(candidates: Iterable[tuple[T, np.ndarray]], product: np.ndarray, k: int,
                         duplicate_cosine: float = DUPLICATE_COSINE) -> list[tuple[T, np.ndarray]]:
    """(item, vector) candidates, best first → the first k whose cosine with the product and with every
    one kept before is below `duplicate_cosine`: a page of similar items is not ten copies of one."""
    kept, kept_vectors = [], [np.asarray(product, np.float32)]
    for item, vector in candidates:
        if len(kept) == k:
            break
        if max(float(v @ vector) for v in kept_vectors) < duplicate_cosine:
            kept.append((item, vector))
            kept_vectors.append(vector)
    return kept


def parse_shards(text: str, num_shards: int) -> list[int]:
    """`0-3,6` → [0, 1, 2, 3, 6]; ValueError naming what is wrong."""
    shards = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"--shards {text!r}: {part!r} is not a shard number or a range like 0-3") from None
        if low > high:
            raise ValueError(f"--shards {text!r}: {part!r} is a reversed range (write {high}-{low})")
        if not 0 <= low <= high < num_shards:
            raise ValueError(f"--shards {text!r}: the index has shards 0-{num_shards - 1}")
        shards.update(range(low, high + 1))
    return sorted(shards)


def writer_cache_dir(index_dir: str) -> Path:
    """Where a writer keeps the local stores of a remote index: stable, so a restart can reuse them."""
    key = hashlib.sha256(index_dir.rstrip("/").encode()).hexdigest()[:16]
    return Path(os.environ.get("INDEX_CACHE_DIR", Path(tempfile.gettempdir()) / "index-cache")) / key


class ShardedIndex:
    def __init__(self, index_dir: str | Path, shards: list[IndexStore], num_shards: int,
                 mirrors: list[tuple[str, Path]] | None = None, shard_ids: list[int] | None = None):
        """`mirrors`: for a remote index opened to read, each shard's (remote dir, local replica).
        `shard_ids`: which of the index's shards `shards` are (default: all of them, in order)."""
        self.index_dir = index_dir if storage.is_remote(index_dir) else Path(index_dir)
        self.shards = shards
        self.num_shards = num_shards
        self.shard_ids = shard_ids if shard_ids is not None else list(range(num_shards))
        self.model = shards[0].model
        self.dim = shards[0].dim
        self._mirrors = mirrors
        # shard → why its newest generation could not be loaded (it serves its last good one)
        self.reload_errors: dict[int, str] = {}
        self.failed_reloads = 0
        self._last_failure: dict[int, Exception] = {}
        self._pull_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, min(num_shards, 8)), thread_name_prefix="shard-search")

    @staticmethod
    def layout(index_dir: str | Path) -> dict | None:
        path = f"{str(index_dir).rstrip('/')}/index.json"
        return json.loads(storage.read_bytes(path)) if storage.exists(path) else None

    @classmethod
    def ensure_layout(cls, index_dir: str | Path, num_shards: int, model: str, dim: int,
                      settings: StoreSettings = StoreSettings()) -> dict:
        """Writes `index.json` if there is none (exactly one of racing writers creates it); refuses a
        layout that disagrees (the segment kind included); makes every shard (new ones with
        `settings`), so readers can open them all from the start."""
        if dim < 1:
            raise ValueError(f"an index needs a vector dimension of at least 1, not {dim} (it comes from an "
                             f"upsert's vector or --model)")
        enough_open_files(num_shards)
        wanted = {"num_shards": num_shards, "model": model, "dim": dim, "segment_kind": settings.segment.kind,
                  "filterable": [str(field) for field in settings.filterable]}
        if not storage.is_remote(index_dir):
            Path(index_dir).mkdir(parents=True, exist_ok=True)
        try:
            storage.create_only(f"{str(index_dir).rstrip('/')}/index.json", json.dumps(wanted).encode())
        except storage.AlreadyExists:
            pass
        current = cls.layout(index_dir)
        if current["dim"] == 0:  # made from a delete by an earlier version: it holds no vector, only tombstones
            current = cls._repair_dimension(index_dir, current, model, dim, settings)
        # index.json from before segment kinds and filters: their defaults; the filters in any order.
        have = {"segment_kind": "hnsw", "filterable": [], **current}
        if {**have, "filterable": sorted(have["filterable"])} != {**wanted, "filterable": sorted(wanted["filterable"])}:
            raise IndexMismatch(f"{index_dir} holds {current}, not {wanted}")
        for n in range(num_shards):
            if storage.is_remote(index_dir):
                remote = cls.shard_path(index_dir, n)
                if not has_snapshot(remote):
                    with tempfile.TemporaryDirectory() as tmp:
                        IndexStore(Path(tmp), model=model, dim=dim, settings=settings).close()
                        ShardPublisher(remote, Path(tmp)).snapshot(0)
            elif not (cls.shard_dir(index_dir, n) / "state.sqlite").exists():
                IndexStore(cls.shard_dir(index_dir, n), model=model, dim=dim, settings=settings).close()
        return current

    @classmethod
    def _repair_dimension(cls, index_dir: str | Path, current: dict, model: str, dim: int,
                          settings: StoreSettings) -> dict:
        """An index.json at 0 dimensions (versions before 2026-12 took the dimension of a new index from
        its first record, a delete included) takes the first upsert's, keeping the tombstones; its
        shards, which hold no vector, take it too (IndexStore.adopt_dimension)."""
        if storage.is_remote(index_dir):
            raise IndexMismatch(f"{index_dir} records 0 dimensions (made from a delete by an earlier version); "
                                f"it holds no vectors: remove its index.json and shard-* objects and run again")
        repaired = {**current, "model": model, "dim": dim}
        for n in range(current["num_shards"]):
            if (cls.shard_dir(index_dir, n) / "state.sqlite").exists():
                store = IndexStore(cls.shard_dir(index_dir, n), settings=settings)
                try:
                    store.adopt_dimension(model, dim)
                finally:
                    store.close()
        storage.write_bytes(f"{str(index_dir).rstrip('/')}/index.json", json.dumps(repaired).encode())
        _log.warning("%s recorded 0 dimensions; repaired to %s (%d-d), its tombstones kept", index_dir, model, dim)
        return repaired

    @staticmethod
    def shard_dir(index_dir: str | Path, shard: int) -> Path:
        return Path(index_dir) / f"shard-{shard:03d}"

    @staticmethod
    def shard_path(index_dir: str | Path, shard: int) -> str:
        """The shard's directory as a string, local or remote."""
        return f"{str(index_dir).rstrip('/')}/shard-{shard:03d}"

    @classmethod
    def open_writer(cls, index_dir: str | Path, shard: int, model: str, dim: int,
                    settings: StoreSettings = StoreSettings(), cache_dir: Path | None = None,
                    snapshot_every: int = 500) -> IndexStore:
        """The one writer of a shard: the store itself, or for a remote index a local store that ships
        every commit there (restored from there first unless the local copy is at the same commit)."""
        if not storage.is_remote(index_dir):
            return IndexStore(cls.shard_dir(index_dir, shard), model=model, dim=dim, settings=settings)
        remote = cls.shard_path(index_dir, shard)
        local = (cache_dir or writer_cache_dir(str(index_dir))) / f"shard-{shard:03d}"
        replica = ShardPublisher(remote, local, snapshot_every)
        if local_generation(local) != replica.remote.latest():
            restore(remote, local)
        return IndexStore(local, model=model, dim=dim, settings=settings, listener=replica)

    @classmethod
    def open(cls, index_dir: str | Path, read_only: bool = True, settings: StoreSettings = StoreSettings(),
             cache_dir: Path | None = None, shards: str | None = None) -> "ShardedIndex":
        """A remote index is read from replicas under `cache_dir` (default: a new temporary directory),
        kept current by `refresh()`; writers go through `open_writer`. `shards` (`0-3,6`): only those
        of the index's shards, for a replica that serves part of it behind `search.router`."""
        layout = cls.layout(index_dir)
        if layout is None:
            raise FileNotFoundError(f"no index at {index_dir} (no index.json)")
        ids = parse_shards(shards, layout["num_shards"]) if shards is not None else list(range(layout["num_shards"]))
        enough_open_files(len(ids))
        if storage.is_remote(index_dir):
            if not read_only:
                raise ValueError("open a remote index's shards for writing with ShardedIndex.open_writer")
            cache = Path(cache_dir or tempfile.mkdtemp(prefix="index-replica-"))
            mirrors = [(cls.shard_path(index_dir, n), cache / f"shard-{n:03d}") for n in ids]
            for remote, local in mirrors:
                restore(remote, local)
            stores = [IndexStore(local, read_only=True, settings=settings) for _, local in mirrors]
            return cls(index_dir, stores, layout["num_shards"], mirrors, ids)
        stores = [
            IndexStore(cls.shard_dir(index_dir, n), model=None if read_only else layout["model"],
                       dim=None if read_only else layout["dim"], settings=settings, read_only=read_only)
            for n in ids
        ]
        return cls(index_dir, stores, layout["num_shards"], shard_ids=ids)

    def refresh(self) -> bool:
        if self._mirrors:
            with self._pull_lock:
                for remote, local in self._mirrors:
                    try:
                        pull(remote, local)
                    except Exception as e:  # the object store is unreachable or pruned mid-read: serve on
                        _log.warning("could not pull %s (still serving generation %d): %s",
                                     remote, self.shards[0].generation, e)
        changed = False
        for n, shard in zip(self.shard_ids, self.shards):
            try:
                changed |= shard.refresh()
            except Exception as e:  # whatever broke the new generation, the last good one serves on
                if self._last_failure.get(n) is not e:  # the store re-raises a cached failure: count once
                    self.failed_reloads += 1
                    self._last_failure[n] = e
                    _log.error("shard %d: cannot load its newest generation, still serving generation %d: %s",
                               n, shard.generation, e)
                self.reload_errors[n] = f"{type(e).__name__}: {e}"
            else:
                self.reload_errors.pop(n, None)
                self._last_failure.pop(n, None)
        return changed

    def search(self, query: np.ndarray | Callable[[], np.ndarray] | None, k: int = 10, ef_search: int = 128,
               shop_id: str | None = None, exact: bool = False, filter: Filter | None = None, text: str | None = None,
               mode: str = "vector", lexical_weight: float = 1.0, offset: int = 0,
               fusion_window: int | None = None) -> list[Hit]:
        """Results offset..offset+k: every shard is asked for its top offset+k (IndexStore.search), so a
        deep page is the same as that page of one big search. Hybrid lists are fused per shard and
        merged by fused score, each list fused to the depth `fusion_window` (default max(FUSION_WINDOW, k):
        not the offset, so every page of one page size comes from one fused list). `query` may be a
        function that makes the vector (the query model): a hybrid search then matches the keywords on
        the shards' threads while it runs."""
        wanted = offset + k
        window = hybrid.fusion_window(k, fusion_window)
        lexical = [None] * len(self.shards)
        if mode == "hybrid" and callable(query):
            pending = [self._pool.submit(shard.lexical_ids, text, window, shop_id, filter) for shard in self.shards]
            query = query()
            lexical = [future.result() for future in pending]
        elif callable(query):
            query = query()
        per_shard = self._pool.map(lambda shard, words: shard.search(query, wanted, ef_search, shop_id, exact, filter,
                                                                     text, mode, lexical_weight, words, window),
                                   self.shards, lexical)
        return merge_hits(per_shard, offset, k)

    def facets(self, names: list[str], shop_id: str | None = None, filter: Filter | None = None,
               buckets: dict[str, list[float]] | None = None) -> dict[str, dict]:
        """Exact counts summed over the shards (IndexStore.facets, search.merge)."""
        return sum_facets(self._pool.map(lambda shard: shard.facets(names, shop_id, filter, buckets), self.shards))

    def product_vector(self, product_id: str) -> np.ndarray | None:
        """The product's stored vector, from its shard when this service serves it."""
        shard = shard_of(product_id, self.num_shards)
        if shard not in self.shard_ids:
            return None
        return self.shards[self.shard_ids.index(shard)].product_vector(product_id)

    def similar(self, vector: np.ndarray, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
                filter: Filter | None = None, exclude: str = "", duplicate_cosine: float = DUPLICATE_COSINE,
                with_vectors: bool = False) -> list[Hit] | list[tuple[Hit, np.ndarray]]:
        """Products like `vector` (a product's own, see `product_vector`), without the product `exclude`
        and with near-duplicates collapsed: a candidate whose cosine with the product or with a result
        already kept is at least `duplicate_cosine` is skipped, so a page is not ten copies of one item.
        `with_vectors`: (hit, its vector) pairs, for a router that collapses across replicas."""
        wanted = SIMILAR_POOL * k + 1

        def shard_candidates(shard: IndexStore):
            scored = shard.search_ids(vector, wanted, ef_search, shop_id, False, filter)
            hits = shard.hits_by_doc(scored)
            vectors = shard.vectors_of([doc for _, doc in scored])
            return [(hits[doc], row) for (_, doc), row in zip(scored, vectors) if doc in hits]

        candidates = [c for part in self._pool.map(shard_candidates, self.shards) for c in part
                      if c[0].product_id != exclude]
        candidates.sort(key=lambda c: (-c[0].score, c[0].product_id))
        kept = collapse_near_copies(candidates, vector, k, duplicate_cosine)
        return kept if with_vectors else [hit for hit, _ in kept]

    @property
    def filterable(self):
        return self.shards[0].settings.filterable

    def close(self) -> None:
        """Stops the search threads and closes the shards (a service that moved on to another index)."""
        self._pool.shutdown(wait=False)
        for shard in self.shards:
            shard.close()

    def live_products(self) -> dict[str, tuple[int, str]]:
        """product_id → (version, shop_id) of every live product of the shards served."""
        return {pid: state for shard in self.shards for pid, state in shard.live_products().items()}

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [shard.live_vectors() for shard in self.shards]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def stats(self) -> dict:
        shards = [shard.stats() for shard in self.shards]
        return {"model": self.model, "dim": self.dim, "num_shards": self.num_shards, "served_shards": self.shard_ids,
                "segment_kind": self.shards[0].settings.segment.kind,
                "live_docs": sum(s["live_docs"] for s in shards),
                "generation": sum(s["generation"] for s in shards), "shards": shards}


class ShardWriter:
    """The writer of one shard as the index pipeline holds it, fenced for a remote index.

    Two workers can hold one shard for a while (Dataflow moving a key, a zombie bundle). Exactly one
    of them creates each generation's commit object (`storage.create_only`); the other gets
    `CommitConflict`, drops its local copy (it has diverged), restores the shard as the winner left
    it and applies its batch again on top. Last writer wins by version, so the batch lands once,
    whoever wins. A local index needs none of this: its store's file lock admits one writer."""

    def __init__(self, index_dir: str | Path, shard: int, model: str, dim: int,
                 settings: StoreSettings = StoreSettings(), cache_dir: Path | None = None, attempts: int = 5):
        self._open = lambda: ShardedIndex.open_writer(index_dir, shard, model, dim, settings, cache_dir)
        self.shard = shard
        self.attempts = attempts
        self.conflicts = 0
        self.store = self._open()

    def apply(self, records) -> ApplyResult:
        for attempt in range(self.attempts):
            try:
                return self.store.apply(records)
            except CommitConflict as e:
                self.conflicts += 1
                if attempt == self.attempts - 1:
                    raise
                _log.warning("shard %d: %s; restoring it and applying the batch again", self.shard, e)
                self._restore()
        raise AssertionError("unreachable")

    def _restore(self) -> None:
        local = self.store.directory
        self.store.close()
        shutil.rmtree(local, ignore_errors=True)
        self.store = self._open()  # restores from the remote: the local copy is gone
