"""The index store: FAISS segments, tombstones and merges, built the way Lucene is; a thin facade.

The parts live where Lucene keeps them apart:
- `search.index.files`: every name on disk, the writer lock and the commit marker;
- `search.index.catalog`: the SQLite catalog (products, manifest, keyword index, change log) and
  every statement;
- `search.index.snapshot`: the point-in-time view a search reads, and `Snapshot.after(change)`, the
  one function that makes the next view (writer commits, merges and every reader's refresh);
- `search.index.reader` and `search.index.writer`: refresh by applying changes; apply, commit, merge;
- `search.query.scope`, `.planner`, `.searcher`: a shop and a filter as doc sets, the plan per
  segment, and the search that runs it.
`IndexStore` opens (or creates) a store and puts them together: the server, the sharded index, the
mirror and the pipelines use it, never the parts. docs/ARCHITECTURE.md tells the contracts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from schemas import EmbeddingRecord
from search.filters import Filter
from search.index import catalog, files
from search.index.catalog import Catalog
from search.index.errors import IndexLocked, IndexMismatch, StoreCorrupted, StoreError
from search.index.reader import Reader
from search.index.settings import StoreSettings, initial_meta, read_meta
from search.index.snapshot import Snapshot
from search.index.writer import ApplyResult, CommitDelta, CommitListener, Writer
from search.query.searcher import Hit, Searcher
from search.segment import Segment

__all__ = ["ApplyResult", "CommitDelta", "CommitListener", "Hit", "IndexLocked", "IndexMismatch", "IndexStore",
           "MARKER", "StoreCorrupted", "StoreError", "StoreSettings"]

MARKER = files.MARKER


class IndexStore:
    def __init__(self, directory: str | Path, *, model: str | None = None, dim: int | None = None,
                 settings: StoreSettings = StoreSettings(), read_only: bool = False,
                 listener: CommitListener | None = None):
        """Opens (or, given `model` and `dim`, creates) the store in `directory`; read-only, a reader
        of a store another process writes. A `listener` (a replica on object storage) hears of each
        commit before `apply` returns."""
        self.directory = Path(directory)
        self.read_only = read_only
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not (self.directory / files.STATE).exists():
            raise FileNotFoundError(f"no index at {self.directory}")
        self._catalog = Catalog(self.directory, read_only)
        # The lock before anything is written: a second writer leaves the store as it found it.
        lock = None if read_only else files.lock_writer(self.directory)
        try:
            if not read_only:
                self._catalog.create()
            with self._catalog.transaction() as db:
                meta = dict(db.execute("SELECT key, value FROM meta"))
                if not meta:
                    if model is None or dim is None:
                        raise FileNotFoundError(f"{self.directory} holds no index; give model and dim to create one")
                    meta = initial_meta(model, dim, settings)
                    db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            self.meta = read_meta(meta, str(self.directory), model, dim, settings)
            if not read_only:
                with self._catalog.transaction(immediate=False) as db:
                    files.remove_orphans(self.directory, {name for name, _kind, _count in catalog.segment_rows(db)})
            self._reader = Reader(self._catalog, self.directory, self.meta.settings.filterable,
                                  self.meta.require_sums)
        except BaseException:
            if lock is not None:
                lock.close()
            self._catalog.close()
            raise
        self._writer = None if read_only else Writer(self._catalog, self.directory, self._reader, self.meta, lock,
                                                     listener)
        self._searcher = Searcher(self._catalog, self._reader, self.meta)

    # What the store is --------------------------------------------------------------------
    @property
    def model(self) -> str:
        return self.meta.model

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def settings(self) -> StoreSettings:
        return self.meta.settings

    @property
    def generation(self) -> int:
        return self._reader.snapshot.generation

    @property
    def _view(self) -> Snapshot:
        return self._reader.snapshot

    def stats(self) -> dict:
        view = self._reader.snapshot
        return {
            "model": self.model,
            "dim": self.dim,
            "segment_kind": self.settings.segment.kind,
            "generation": view.generation,
            "live_docs": view.live_docs,
            "segments": [{"name": s.info.name, "kind": s.info.kind, "count": s.info.count,
                          "live": view.live_count[s.info.name]} for s in view.segments],
        }

    # Reading ------------------------------------------------------------------------------
    def refresh(self, retry_secs: float = 5.0) -> bool:
        """Picks up commits made by another process (search.index.reader); True if there was one. A
        writer's view is always its newest commit (one writer per store): nothing to pick up."""
        if self._writer is not None:
            return False
        return self._reader.refresh(retry_secs)

    def search(self, query: np.ndarray | None, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
               exact: bool = False, filter: Filter | None = None, text: str | None = None, mode: str = "vector",
               lexical_weight: float = 1.0, lexical: list[tuple[float, int]] | None = None,
               window: int | None = None) -> list[Hit]:
        """Top-k live products by vector, keywords or both (search.query.searcher)."""
        return self._searcher.search(query, k, ef_search, shop_id, exact, filter, text, mode, lexical_weight,
                                     lexical, window)

    def search_ids(self, query: np.ndarray, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
                   exact: bool = False, filter: Filter | None = None) -> list[tuple[float, int]]:
        return self._searcher.search_ids(query, k, ef_search, shop_id, exact, filter)

    def lexical_ids(self, text: str, k: int, shop_id: str | None = None,
                    filter: Filter | None = None) -> list[tuple[float, int]]:
        return self._searcher.lexical_ids(text, k, shop_id, filter)

    def facets(self, names: Iterable[str], shop_id: str | None = None, filter: Filter | None = None,
               buckets: dict[str, list[float]] | None = None) -> dict[str, dict]:
        return self._searcher.facets(names, shop_id, filter, buckets)

    def hits(self, scored: Iterable[tuple[float, int]], generation: int | None = None) -> list[Hit]:
        return self._searcher.hits(scored, generation)

    def hits_by_doc(self, scored: Sequence[tuple[float, int]], generation: int | None = None) -> dict[int, Hit]:
        return self._searcher.hits_by_doc(scored, generation)

    def product_vector(self, product_id: str) -> np.ndarray | None:
        return self._searcher.product_vector(product_id)

    def vectors_of(self, docs: Sequence[int]) -> np.ndarray:
        return self._reader.snapshot.vectors_of(docs, self.dim)

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self._reader.snapshot.live_vectors(self.dim)

    def live_products(self) -> dict[str, tuple[int, str]]:
        """product_id → (version, shop_id) of every product with a live vector."""
        with self._catalog.transaction(immediate=False) as db:
            return catalog.live_products(db)

    # Writing (search.index.writer) ------------------------------------------------------------
    def _writing(self) -> Writer:
        if self._writer is None:
            raise PermissionError("store opened read-only")
        return self._writer

    def check(self, record: EmbeddingRecord) -> None:
        self._writing().check(record)

    def apply(self, records: Sequence[EmbeddingRecord]) -> ApplyResult:
        """Applies a micro-batch in one commit; returns what it did. Refused records are reported."""
        return self._writing().apply(records)

    def adopt_dimension(self, model: str, dim: int) -> None:
        if self._writer is None:
            raise ValueError("adopt_dimension needs a writable store and a dimension of at least 1")
        self._writer.adopt_dimension(model, dim)

    def compaction_plan(self) -> list[Segment]:
        return self._writing().compaction_plan()

    def compact(self, force: bool = False) -> bool:
        return self._writing().compact(force)

    def compact_in_background(self) -> None:
        self._writing().compact_in_background()

    def finish_compaction(self, progress=None, max_merges: int = 64) -> int:
        return self._writing().finish_compaction(progress, max_merges)

    def wait_for_compaction(self) -> None:
        if self._writer is not None:
            self._writer.wait_for_compaction()

    @property
    def compacting(self) -> bool:
        return self._writer is not None and self._writer.compacting

    def close(self) -> None:
        """Closes every thread's connection (a service that moved to another index keeps no handle of
        this one open) and releases the writer lock."""
        self._catalog.close()
        if self._writer is not None:
            self._writer.close()
