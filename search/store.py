"""The index store: FAISS segments + tombstones + compaction, built the way Lucene is (DESIGN §8).

- Product state lives in SQLite next to the segments: version, live doc id, shop, title,
  image URL. Last writer wins by `version`: an older or repeated version is a no-op, an
  upsert tombstones the product's old doc and adds a new one, a delete tombstones.
- A commit first writes a new immutable `flat` segment (fsynced), then one SQLite transaction
  updates the products, adds the segment to the manifest and bumps the generation. That
  transaction is the commit point: a crash before it leaves the previous state (the orphan
  files are removed on the next open), a crash after it leaves the new one.
- Compaction merges segments into one segment of the index's kind (search.segment: float HNSW,
  8-bit HNSW or IVF-PQ) without holding up commits; docs
  tombstoned meanwhile stay tombstoned, because liveness comes from the product table.
- Readers hold an immutable `_View` (segments + liveness arrays); writers swap in a new one,
  so a search never sees half a commit. Other processes pick up commits through `refresh()`, by
  applying each commit's change (kept in the `changes` table for the last few commits) with the
  same function the writer used (`_after`): in proportion to the commit, not the shard. A reader
  further behind than the log, or one that finds a segment merged away, loads the store anew.
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import faiss
import numpy as np

from schemas import EmbeddingRecord, format_timestamp, non_finite_number
from search import store_sql
from search.fields import Codes, Column, Field, FieldIndex, numbers, parse_filterable, typed
from search.filters import SHOP, Filter
from search.hybrid import BM25_WEIGHTS, FUSION_WINDOW, fts_query, fuse
from search.merge_policy import MergePolicy, SegmentState
from search.segment import Segment, SegmentCorrupted, SegmentInfo, SegmentParams, top_k

__all__ = ["ApplyResult", "CommitDelta", "Hit", "IndexMismatch", "IndexStore", "StoreCorrupted", "StoreSettings"]

_log = logging.getLogger(__name__)

MARKER = "committed"  # the commit marker's file name
SHOP_CACHE_SIZE = 64  # shops' per-generation positions or bitmaps kept
LEXICAL_IN_LIST = 20_000  # a keyword search's scope up to this many docs is passed to SQLite as a list
UNIT_TOLERANCE = 1e-3  # float32 vectors from any model land within 1e-6 of length 1


class StoreCorrupted(RuntimeError):
    """The store on disk is not what its commits made it: it must not be served as if it were."""


class IndexMismatch(ValueError):
    """A record of another model or dimension than the index: refused, never mixed in."""


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    # The index's segment kind and FAISS parameters: given when a store is created, then its own.
    segment: SegmentParams = SegmentParams()
    merge: MergePolicy = MergePolicy()
    # Threads a segment build may use; the rest stay free for commits and searches. 0: all cores.
    build_threads: int = max(1, (os.cpu_count() or 2) - 1)
    # Filters that leave fewer docs than this in a segment are searched exactly.
    exact_below: int = 10_000
    # What one step of a filtered graph search costs, in rows scored exactly: a scope (a shop, a
    # filter) is scored exactly when its rows cost less than the widened beam would. Measured 14.5
    # at 1M 8-bit vectors (bench.exact_switch: a beam of 4,000 in 12.3 ms, 50,000 rows in 10.7 ms)
    # and ~38 at 3M; the lower one, so that the graph is kept wherever it might still win.
    # 0: only `exact_below` decides.
    graph_step_cost: float = 15.0
    # The attributes a query may filter and facet on (search.fields): given when a store is created.
    filterable: tuple[Field, ...] = ()


@dataclasses.dataclass(frozen=True)
class Hit:
    product_id: str
    shop_id: str
    score: float
    version: int
    title: str
    image_url: str
    attributes: dict = dataclasses.field(default_factory=dict)
    embedded_at: str = ""
    generation: int = 0  # the generation of the shard it was served from


@dataclasses.dataclass
class ApplyResult:
    upserted: int = 0
    deleted: int = 0
    ignored: int = 0  # older or repeated versions
    refused: list[tuple[EmbeddingRecord, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class CommitDelta:
    """What one commit changed, enough for a replica to replay it (search.mirror)."""

    generation: int
    next_doc_id: int
    products: tuple[tuple, ...]  # store_sql.PRODUCT_COLUMNS + (description,)
    added: tuple[SegmentInfo, ...] = ()
    removed: tuple[str, ...] = ()


class CommitListener(Protocol):
    """Told of every segment file set before it is committed, and of every commit after it is."""

    def segment_written(self, directory: Path, info: SegmentInfo) -> None: ...

    def committed(self, delta: CommitDelta) -> None: ...


def _ones(count: int) -> np.ndarray:
    return np.packbits(np.ones(count, bool), bitorder="little")


def _unpack(bits: np.ndarray, count: int) -> np.ndarray:
    return np.unpackbits(bits, count=count, bitorder="little").view(bool)


def _positions(seg: Segment, docs: np.ndarray) -> np.ndarray:
    """The positions in the segment of those of the sorted doc ids `docs` it holds."""
    return seg.locate(docs)[1]


def _bitmap(seg: Segment, docs: np.ndarray) -> tuple[np.ndarray, int]:
    """(the packed bitmap of the sorted doc ids `docs` over the segment's positions, how many it holds)."""
    mask = np.zeros(seg.info.count, bool)
    found, positions = seg.locate(docs)
    mask[positions] = True
    return np.packbits(mask, bitorder="little"), int(found.sum())


@dataclasses.dataclass(frozen=True)
class _View:
    """Everything a search reads, swapped whole on every commit. Each segment carries its columns (the
    shop and every filterable field, search.fields) built once; a commit adds its segment's and
    changes liveness, so no commit step touches every document of the shard."""

    generation: int
    next_doc: int
    segments: tuple[Segment, ...]
    live: dict[str, np.ndarray]  # segment name → packed liveness bitmap over its positions (little bit order)
    live_count: dict[str, int]
    columns: dict[str, dict[str, Column]]  # segment name → field name (and "shop_id") → its column
    declared: tuple[Field, ...]  # the filterable fields
    codes: dict[str, Codes]  # keyword field (and "shop_id") → its codes, shared by the store's views

    @functools.cached_property
    def fields(self) -> dict[str, FieldIndex]:
        """Filterable attribute → its index over this view (search.fields)."""
        return {field.name: self._index(field) for field in self.declared}

    @functools.cached_property
    def shops(self) -> FieldIndex:
        return self._index(SHOP)

    def _index(self, field: Field) -> FieldIndex:
        return FieldIndex(field, tuple((seg, self.columns[seg.info.name][field.name], self.live[seg.info.name])
                                       for seg in self.segments), self.codes.get(field.name))

    def shop_docs(self, shop: str) -> np.ndarray:
        """A shop's live docs, sorted (in proportion to them)."""
        return self.shops.equal(shop)


class IndexStore:
    def __init__(self, directory: str | Path, *, model: str | None = None, dim: int | None = None,
                 settings: StoreSettings = StoreSettings(), read_only: bool = False,
                 listener: CommitListener | None = None):
        """Opens (or, given `model` and `dim`, creates) the store in `directory`.

        A `listener` (a replica on object storage) hears of each commit before `apply` returns."""
        self.directory = Path(directory)
        self.read_only = read_only
        self._listener = listener
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not (self.directory / "state.sqlite").exists():
            raise FileNotFoundError(f"no index at {self.directory}")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []  # every thread's, closed together by close()
        self._lock_file = None
        if not read_only:
            self._take_writer_lock()
        self._write_lock = threading.RLock()
        self._compacting = threading.Lock()
        self._compaction_thread: threading.Thread | None = None
        self._cache_lock = threading.Lock()
        self._shop_cache: dict[tuple, list] = {}  # (generation, shop, maker) → per segment; oldest first
        if not read_only:
            self._db().executescript(store_sql.SCHEMA)  # its own transaction: executescript commits
            with self._transaction() as db:
                store_sql.migrate(db)
        with self._transaction() as db:
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if not meta:
                if model is None or dim is None:
                    raise FileNotFoundError(f"{self.directory} holds no index; give model and dim to create one")
                if dim < 1:
                    raise ValueError(f"an index needs a vector dimension of at least 1, not {dim}")
                meta = {"model": model, "dim": str(dim), "generation": "0", "next_doc_id": "0",
                        "hnsw_m": str(settings.segment.m),
                        "hnsw_ef_construction": str(settings.segment.ef_construction),
                        "segment_kind": settings.segment.kind, "ivf_nprobe": str(settings.segment.nprobe),
                        "segment_sums": "crc32", "filterable": json.dumps([str(f) for f in settings.filterable])}
                db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
        self.model = meta["model"]
        self.dim = int(meta["dim"])
        if model is not None and model != self.model or dim is not None and dim != self.dim:
            raise IndexMismatch(f"{self.directory} indexes {self.model} ({self.dim}-d), not {model} ({dim}-d)")
        filterable = parse_filterable(json.loads(meta.get("filterable", "[]")))
        if settings.filterable and set(settings.filterable) != set(filterable):  # the same fields in any order
            raise IndexMismatch(f"{self.directory} filters on {','.join(map(str, filterable)) or 'no attributes'}, "
                                f"not {','.join(map(str, settings.filterable))}")
        # A store made before segment kinds is an hnsw one.
        self.settings = dataclasses.replace(settings, segment=dataclasses.replace(
            settings.segment, kind=meta.get("segment_kind", "hnsw"), m=int(meta["hnsw_m"]),
            ef_construction=int(meta["hnsw_ef_construction"]), nprobe=int(meta.get("ivf_nprobe", 32))),
            filterable=filterable)
        # Stores made before segments carried checksums keep opening; their new segments have them.
        self._require_sums = meta.get("segment_sums") == "crc32"
        self._broken: tuple[int, float, Exception] | None = None  # a generation that failed to load
        if not read_only:
            self._remove_orphans()
        self._view = self._load_view()

    def adopt_dimension(self, model: str, dim: int) -> None:
        """Gives a store recorded at 0 dimensions (made from a delete by an earlier version, so it holds
        tombstones and no vector) the model and dimension of its first upsert."""
        if self.read_only or dim < 1:
            raise ValueError("adopt_dimension needs a writable store and a dimension of at least 1")
        with self._write_lock, self._transaction() as db:
            if int(store_sql.meta(db, "dim")) != 0 or db.execute("SELECT 1 FROM segments LIMIT 1").fetchone():
                raise IndexMismatch(f"{self.directory} indexes {self.model} ({self.dim}-d): not a 0-d store")
            db.executemany("UPDATE meta SET value = ? WHERE key = ?", [(model, "model"), (str(dim), "dim")])
        self.model, self.dim = model, dim

    def _take_writer_lock(self) -> None:
        """One writer process per store: generations and views assume it. Readers are unlimited."""
        self._lock_file = open(self.directory / "writer.lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"another process is writing to {self.directory}") from None

    # SQLite -------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect("?mode=ro" if self.read_only else "")
            if not self.read_only:
                db.execute("PRAGMA journal_mode=WAL")
            try:
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.OperationalError:
                if not self.read_only:
                    raise
                # Read-only media (a copy on a read-only mount, without its -wal and -shm files): a
                # reader cannot make the -shm file WAL mode needs, so it reads the file as immutable.
                db.close()
                db = self._connect("?immutable=1")
                db.execute("PRAGMA synchronous=FULL")
            with self._cache_lock:
                self._connections.append(db)
            self._local.db = db
        return db

    def _connect(self, query: str) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.directory / 'state.sqlite'}{query}", uri=True, isolation_level=None,
                               timeout=60, check_same_thread=False)

    class _Tx:
        def __init__(self, db, immediate):
            self.db, self.immediate = db, immediate

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
            return self.db

        def __exit__(self, exc_type, *_):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _transaction(self, immediate: bool | None = None):
        return self._Tx(self._db(), not self.read_only if immediate is None else immediate)

    # Commit marker -------------------------------------------------------------------------
    # The generation of the last commit, also kept outside SQLite, written after each commit:
    # were the WAL lost (deleted, or not copied with the database), the database would quietly
    # fall back to an older generation; the marker, ahead of it, says so.
    def _marked_generation(self) -> int:
        try:
            return int((self.directory / MARKER).read_text())
        except (FileNotFoundError, ValueError):
            return 0  # a store from before the marker, or a replica (search.mirror keeps none)

    def _mark(self, generation: int) -> None:
        tmp = self.directory / f"{MARKER}.tmp"
        tmp.write_text(str(generation))
        os.replace(tmp, self.directory / MARKER)

    def _checkpoint_wal(self) -> None:
        """Copies the commit from the WAL into the database file, so it never lives in the WAL alone."""
        self._db().execute("PRAGMA wal_checkpoint(PASSIVE)")

    # Views --------------------------------------------------------------------------------
    def _load_view(self, reuse: dict[str, Segment] | None = None) -> _View:
        reuse = reuse or {}
        marked = self._marked_generation()  # read first: the writer marks only after committing
        with self._transaction(immediate=False) as db:
            generation = int(store_sql.meta(db, "generation"))
            if generation < marked:
                raise StoreCorrupted(f"{self.directory} is at generation {generation} but committed {marked}: "
                                     f"its database lost commits (was state.sqlite-wal deleted?); restore the "
                                     f"shard from a copy or rebuild it")
            next_doc = int(store_sql.meta(db, "next_doc_id"))
            infos = [SegmentInfo(*row) for row in db.execute("SELECT name, kind, count FROM segments ORDER BY name")]
            # Every live doc with its shop, streamed: millions of rows never sit in a list of tuples.
            codes = {SHOP.name: Codes()} | {f.name: Codes() for f in self.settings.filterable if f.type == "keyword"}
            shop_code = codes[SHOP.name].code
            docs, shops = array.array("q"), array.array("d")
            for doc, shop in db.execute("SELECT doc_id, shop_id FROM products WHERE doc_id IS NOT NULL"):
                docs.append(doc)
                shops.append(shop_code(shop))
            docs, shops = np.frombuffer(docs, np.int64), np.frombuffer(shops, np.float64)
            values = {SHOP.name: (docs, shops)} | {
                field.name: _field_values(db, field, codes.get(field.name)) for field in self.settings.filterable}
        segments = tuple(reuse.get(info.name) or Segment(self.directory, info, self._require_sums) for info in infos)
        live, live_count, columns = {}, {}, {}
        for seg in segments:
            live[seg.info.name], live_count[seg.info.name] = _bitmap(seg, docs)
            columns[seg.info.name] = {name: _column(seg, *pairs) for name, pairs in values.items()}
        return _View(generation, next_doc, segments, live, live_count, columns, self.settings.filterable, codes)

    def refresh(self, retry_secs: float = 5.0) -> bool:
        """Picks up commits made by another process; True if there was one. When the new generation
        cannot be loaded (a corrupt segment, lost commits) this raises and the view stays the last good
        one; the same generation is tried again only after `retry_secs`."""
        with self._transaction(immediate=False) as db:
            generation = int(store_sql.meta(db, "generation"))
        if generation == self._view.generation:
            return False
        if self._broken and self._broken[0] == generation and time.monotonic() - self._broken[1] < retry_secs:
            raise self._broken[2]
        try:
            self._view = self._applied_changes() or self._load_consistent_view()
        except Exception as e:
            self._broken = (generation, time.monotonic(), e)
            raise
        self._broken = None
        return True

    def _applied_changes(self) -> _View | None:
        """The view moved to the newest generation by applying each commit's change to it (as the writer
        did), in proportion to what the commits changed; None when that cannot be done (the log no
        longer reaches back to this view, or a segment it names is gone: merged away meanwhile), and
        the store is read anew."""
        view = self._view
        marked = self._marked_generation()
        with self._transaction(immediate=False) as db:
            newest = int(store_sql.meta(db, "generation"))
            changes = store_sql.changes_since(db, view.generation, newest)
        if changes is None or newest < marked or newest <= view.generation:  # behind its marker, or rewound
            return None
        try:
            for generation, change in enumerate(changes, view.generation + 1):
                if not set(change["segments_removed"]) <= {seg.info.name for seg in view.segments}:
                    return None
                added = {name: Segment(self.directory, SegmentInfo(name, kind, count), self._require_sums)
                         for name, kind, count in change["segments_added"]}
                view = self._after(view, change, generation, added)
        except SegmentCorrupted as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None  # added, then merged away and deleted before this reader got to it
            raise
        return view

    def _load_consistent_view(self) -> _View:
        for attempt in range(5):
            try:
                return self._load_view({s.info.name: s for s in self._view.segments})
            except SegmentCorrupted as e:
                # Compaction removed a segment between our manifest read and its load: read again.
                if not isinstance(e.__cause__, FileNotFoundError) or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    @property
    def generation(self) -> int:
        return self._view.generation

    def _remove_orphans(self) -> None:
        """Segment files of commits that never happened (a crash between write and commit)."""
        with self._transaction(immediate=False) as db:
            live = {name for (name,) in db.execute("SELECT name FROM segments")}
        for path in self.directory.glob("seg-*"):
            if path.name.split(".", 1)[0] not in live:
                path.unlink(missing_ok=True)

    # Writes -------------------------------------------------------------------------------
    def check(self, record: EmbeddingRecord) -> None:
        if record.model != self.model:
            raise IndexMismatch(f"record of model {record.model!r} for an index of {self.model!r}")
        if record.op == "upsert" and len(record.embedding) != self.dim:
            raise IndexMismatch(f"{len(record.embedding)}-d vector for a {self.dim}-d index")
        if record.op == "upsert":
            # Scores are inner products of unit vectors (DESIGN §4): anything else would rank wrongly.
            norm = float(np.linalg.norm(record.embedding.astype(np.float64)))
            if not np.isfinite(norm) or abs(norm - 1.0) > UNIT_TOLERANCE:
                raise IndexMismatch(f"the vector is not a finite unit vector (norm {norm:.6g}): normalise "
                                    f"it to length 1")
        if record.op not in ("upsert", "delete", "patch"):
            raise IndexMismatch(f"unknown op {record.op!r}")

    def apply(self, records: Sequence[EmbeddingRecord]) -> ApplyResult:
        """Applies a micro-batch in one commit; returns what it did. Refused records are reported."""
        if self.read_only:
            raise PermissionError("store opened read-only")
        result = ApplyResult()
        accepted = []
        for record in records:
            try:
                self.check(record)
            except IndexMismatch as e:
                result.refused.append((record, str(e)))
            else:
                accepted.append(record)
        with self._write_lock:
            view = self._view
            with self._transaction() as db:
                next_doc = int(store_sql.meta(db, "next_doc_id"))
                current = _current_states(db, {r.product_id for r in accepted})
                changed: dict[str, tuple] = {}
                vectors: dict[str, np.ndarray] = {}  # product → the vector of its new doc
                for record in accepted:
                    version = (changed.get(record.product_id) or current.get(record.product_id) or (-1,))[0]
                    if record.version <= version:
                        result.ignored += 1
                        continue
                    embedded_at = format_timestamp(record.embedded_at)
                    if record.op == "upsert":
                        changed[record.product_id] = (record.version, next_doc, record.shop_id, record.title,
                                                      record.image_url, _attributes_json(record), embedded_at,
                                                      record.description)
                        vectors[record.product_id] = record.embedding
                        next_doc += 1
                        result.upserted += 1
                    elif record.op == "patch":
                        # New attributes on the product's vector as it is: a new doc, nothing embedded.
                        state = changed.get(record.product_id) or current.get(record.product_id)
                        if state is None or state[1] is None:
                            result.refused.append((record, "an attribute patch of a product with no live vector "
                                                           "in this index: send an upsert"))
                            continue
                        if record.product_id not in vectors:
                            vectors[record.product_id] = self.vectors_of([state[1]], view)[0]
                        embedded, description = state[6], state[7]
                        changed[record.product_id] = (record.version, next_doc, state[2], state[3], state[4],
                                                      _attributes_json(record), embedded, description)
                        next_doc += 1
                        result.upserted += 1
                    else:
                        changed[record.product_id] = (record.version, None, record.shop_id, record.title, "", "{}",
                                                      embedded_at, "")
                        vectors.pop(record.product_id, None)
                        result.deleted += 1
                info = segment = None
                if vectors:
                    ids = np.array([changed[pid][1] for pid in vectors], np.int64)
                    info = Segment.write(self.directory, self._segment_name(), ids,
                                         np.stack(list(vectors.values())).astype(np.float32), "flat")
                    segment = Segment(self.directory, info, self._require_sums)  # verified before it is committed
                    if self._listener:
                        self._listener.segment_written(self.directory, info)
                change = store_sql.write_commit(db, generation=view.generation + 1,
                                                products=[(pid, *state) for pid, state in changed.items()],
                                                added=[(info.name, info.kind, info.count)] if info else (),
                                                next_doc_id=next_doc)
            self._committed(view.generation + 1)
            self._view = self._after(view, change, view.generation + 1, {info.name: segment} if info else {})
            if self._listener:
                self._listener.committed(CommitDelta(
                    self._view.generation, next_doc, tuple((pid, *state) for pid, state in changed.items()),
                    (info,) if info else ()))
        return result

    def _after(self, view: _View, change: dict, generation: int, added: dict[str, Segment]) -> _View:
        """The view after one commit's change (store_sql.write_commit): the one function that moves a view
        on, used by the writer's commits, its merges and every reader's refresh. Copy-on-write and in
        proportion to the change: the bitmaps of segments that lost docs are copied, a commit's own
        segment gets its columns from the change, a merged one from the columns of the segments it
        replaces (its docs are live as they are in those)."""
        dead = np.array(sorted(doc for doc, _ in change["dead"]), np.int64)
        removed = set(change["segments_removed"])
        live, live_count, columns = dict(view.live), dict(view.live_count), dict(view.columns)
        for seg in view.segments if len(dead) else ():
            _, positions = seg.locate(dead)
            if len(positions):
                bits = live[seg.info.name].copy()
                np.bitwise_and.at(bits, positions >> 3, ~(1 << (positions & 7)).astype(np.uint8))
                live[seg.info.name], live_count[seg.info.name] = bits, live_count[seg.info.name] - len(positions)
        merged_from = [seg for seg in view.segments if seg.info.name in removed]
        for name, _kind, count in change["segments_added"]:
            seg = added[name]
            if merged_from:
                # Docs that died while the merge was built are dead in the segments it replaced.
                old_ids = np.concatenate([old.ids for old in merged_from])
                order = np.argsort(old_ids, kind="stable")
                at = order[np.searchsorted(old_ids[order], seg.ids)]
                alive = np.concatenate([_unpack(live[old.info.name], old.info.count) for old in merged_from])[at]
                live[name], live_count[name] = np.packbits(alive, bitorder="little"), int(alive.sum())
                columns[name] = {
                    field: _column(seg, seg.ids, np.concatenate(
                        [view.columns[old.info.name][field].by_pos for old in merged_from])[at])
                    for field in view.columns[merged_from[0].info.name]}
            else:  # a commit's own segment: every doc in it is new and live
                live[name], live_count[name] = _ones(count), count
                docs = np.array([doc for doc, _shop, _values in change["added"]], np.int64)
                columns[name] = {SHOP.name: _column(seg, docs, numbers(SHOP, view.codes[SHOP.name], (
                    shop for _doc, shop, _values in change["added"])))} | {
                    field.name: _column(seg, docs, numbers(field, view.codes.get(field.name), (
                        typed(field, values.get(field.name)) for _doc, _shop, values in change["added"])))
                    for field in view.declared}
        for name in removed:
            live.pop(name, None)
            live_count.pop(name, None)
            columns.pop(name, None)
        next_doc = view.next_doc if change["next_doc"] is None else change["next_doc"]
        segments = tuple(seg for seg in view.segments if seg.info.name not in removed) + tuple(
            added[name] for name, _kind, _count in change["segments_added"])
        return _View(generation, next_doc, segments, live, live_count, columns, view.declared, view.codes)

    def _committed(self, generation: int) -> None:
        self._checkpoint_wal()
        self._mark(generation)

    def _segment_name(self) -> str:
        return f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"

    # Compaction ---------------------------------------------------------------------------
    def compaction_plan(self, view: _View | None = None) -> list[Segment]:
        """The segments the merge policy would merge now (search.merge_policy)."""
        view = view or self._view
        states = [SegmentState(seg.info.name, seg.info.kind, seg.info.count, view.live_count[seg.info.name])
                  for seg in view.segments]
        names = set(self.settings.merge.plan(states))
        return [seg for seg in view.segments if seg.info.name in names]

    def compact_in_background(self) -> None:
        """Starts a compaction on a thread of its own when the policy asks for one and none is running,
        so a commit never waits for a segment build."""
        with self._write_lock:
            if self._compaction_thread is not None or not self.compaction_plan():
                return

            def run():
                try:
                    self.compact()
                finally:
                    self._compaction_thread = None

            self._compaction_thread = threading.Thread(target=run, name=f"compact-{self.directory.name}",
                                                       daemon=True)
            self._compaction_thread.start()

    @property
    def compacting(self) -> bool:
        """Whether a background compaction runs now."""
        return self._compaction_thread is not None

    def wait_for_compaction(self) -> None:
        """Returns once no background compaction runs (compact_in_background)."""
        thread = self._compaction_thread
        if thread is not None:
            thread.join()

    def finish_compaction(self, progress=None, max_merges: int = 64) -> int:
        """Waits for a background compaction, then merges until the policy's plan is empty: a batch run
        ends with the index its merge policy promises, not with hundreds of flat segments, and never
        exits while a build runs on a thread. `progress(segments, vectors)` hears of each merge."""
        self.wait_for_compaction()
        merges = 0
        while merges < max_merges and (plan := self.compaction_plan()):
            if progress:
                progress(len(plan), sum(seg.info.count for seg in plan))
            if not self.compact():
                break
            merges += 1
        return merges

    def compact(self, force: bool = False) -> bool:
        """Merges what the plan (or, forced, everything) says into one segment of the index's kind
        (a small ivf_pq merge stays flat: SegmentParams.kind_for); True if it did."""
        if self.read_only:
            raise PermissionError("store opened read-only")
        with self._compacting:
            view = self._view
            plan = list(view.segments) if force else self.compaction_plan(view)
            if not plan or force and len(plan) == 1 and view.live_count[plan[0].info.name] == plan[0].info.count \
                    and plan[0].info.kind == self.settings.segment.kind_for(plan[0].info.count):
                return False
            ids = np.concatenate([seg.ids for seg in plan])
            vectors = np.concatenate([seg.vectors for seg in plan])
            keep = np.concatenate([_unpack(view.live[seg.info.name], seg.info.count) for seg in plan])
            info = None
            if keep.any():
                # omp_set_num_threads is per calling thread: only this build is limited.
                faiss.omp_set_num_threads(self.settings.build_threads or os.cpu_count() or 1)
                if not keep.all():
                    ids, vectors = ids[keep], vectors[keep]
                info = Segment.write(self.directory, self._segment_name(), ids, vectors,
                                     self.settings.segment.kind_for(len(ids)), self.settings.segment)
                if self._listener:
                    self._listener.segment_written(self.directory, info)
            merged = Segment(self.directory, info, self._require_sums) if info else None
            with self._write_lock:
                current = self._view
                names = {seg.info.name for seg in plan}
                with self._transaction() as db:
                    change = store_sql.write_commit(db, generation=current.generation + 1,
                                                    removed=[seg.info.name for seg in plan],
                                                    added=[(info.name, info.kind, info.count)] if info else ())
                self._committed(current.generation + 1)
                # Commits during the build may have tombstoned merged docs: _after takes liveness as of now.
                self._view = self._after(current, change, current.generation + 1,
                                         {merged.info.name: merged} if merged else {})
                if self._listener:
                    self._listener.committed(CommitDelta(self._view.generation, current.next_doc, (),
                                                         (info,) if info else (), tuple(names)))
            for seg in plan:
                for name in Segment.files(seg.info.name):
                    (self.directory / name).unlink(missing_ok=True)
            _log.info("compacted %d segments (%d docs) into %d live docs", len(plan), len(keep), int(keep.sum()))
            return True

    # Reads --------------------------------------------------------------------------------
    def search(self, query: np.ndarray | None, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
               exact: bool = False, filter: Filter | None = None, text: str | None = None, mode: str = "vector",
               lexical_weight: float = 1.0, lexical: list[tuple[float, int]] | None = None,
               window: int | None = None) -> list[Hit]:
        """Top-k live products: by inner product with `query` (mode vector; `k` and `ef_search` are
        independent, DESIGN §8), by BM25 on `text` (lexical), or both fused by rank (hybrid: each list's
        top `window`, default max(k, FUSION_WINDOW), fused; `lexical`: the keyword list,
        `lexical_ids(text, window, ...)`, when the caller made it)."""
        view = self._view
        if mode == "vector":
            scored = self.search_ids(query, k, ef_search, shop_id, exact, filter, view)
        elif mode == "lexical":
            scored = self.lexical_ids(text, k, shop_id, filter, view)
        else:
            window = window or max(k, FUSION_WINDOW)
            if lexical is None:
                lexical = self.lexical_ids(text, window, shop_id, filter, view)
            scored = fuse([self.search_ids(query, window, ef_search, shop_id, exact, filter, view), lexical],
                          (1.0, lexical_weight))[:k]
        return self.hits(_strictly_decreasing(scored), view.generation)

    def lexical_ids(self, text: str, k: int, shop_id: str | None = None, filter: Filter | None = None,
                    view: "_View | None" = None) -> list[tuple[float, int]]:
        """Top-k (BM25 score, doc id) for `text` among the scope's docs. A scope of a few thousand docs
        is handed to SQLite; a larger one filters a deepening list of the best matches."""
        match = fts_query(text or "")
        if match is None:
            return []
        view = view or self._view
        scope = self._scope(view, shop_id, filter)
        rank = f"bm25(lexical, {', '.join(map(str, BM25_WEIGHTS))})"
        sql = f"SELECT rowid, {rank} FROM lexical WHERE lexical MATCH ?"
        with self._transaction(immediate=False) as db:
            # Ties (equal BM25) in doc order: a deeper page's list begins with a shallower one's.
            if scope is None or len(scope[1]) <= LEXICAL_IN_LIST:
                inside = "" if scope is None else " AND rowid IN (SELECT value FROM json_each(?))"
                args = (match,) if scope is None else (match, json.dumps(scope[1].tolist()))
                rows = db.execute(f"{sql}{inside} ORDER BY {rank}, rowid LIMIT ?", (*args, k)).fetchall()
            else:
                limit = 4 * k
                while True:
                    rows = db.execute(f"{sql} ORDER BY {rank}, rowid LIMIT ?", (match, limit)).fetchall()
                    docs = np.array([doc for doc, _ in rows], np.int64)
                    inside = np.isin(docs, scope[1], assume_unique=True) if len(docs) else np.zeros(0, bool)
                    if inside.sum() >= k or len(rows) < limit:
                        rows = [row for row, keep in zip(rows, inside) if keep][:k]
                        break
                    limit *= 4
        # The lexical table is at the newest commit, the view may be one behind: a doc of the newer
        # commit is as live as the rest; one tombstoned since is dropped by `hits`.
        return [(-float(score), int(doc)) for doc, score in rows]  # FTS5's bm25 is lower-is-better

    def search_ids(self, query: np.ndarray, k: int = 10, ef_search: int = 128, shop_id: str | None = None,
                   exact: bool = False, filter: Filter | None = None, view: "_View | None" = None
                   ) -> list[tuple[float, int]]:
        """Top-k (score, doc id) among the live docs of `shop_id` that pass `filter` (each optional)."""
        if k < 1 or ef_search < 1:
            raise ValueError("k and ef_search must be at least 1")
        query = np.asarray(query, np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise IndexMismatch(f"{query.shape[0]}-d query for a {self.dim}-d index")
        view = view or self._view
        scope = self._scope(view, shop_id, filter)
        if scope is None:
            hits = [self._search_segment(seg, query, k, ef_search, exact, view.live[seg.info.name],
                                         view.live_count[seg.info.name]) for seg in view.segments]
        elif not len(scope[1]):
            return []
        elif exact or self._exact_is_cheaper(view, k, ef_search, scope):
            # A small scope is searched exactly over its own docs: cost in proportion to the scope.
            hits = [seg.search_positions(query, k, positions)
                    for seg, positions in zip(view.segments, self._per_scope(view, scope, _positions))]
        else:
            # A large one by each segment's index, filtered by the scope's bitmap (kept per generation).
            hits = [self._search_segment(seg, query, k, ef_search, False, bits, allowed)
                    for seg, (bits, allowed) in zip(view.segments, self._per_scope(view, scope, _bitmap))]
        if not hits:
            return []
        scores, docs = np.concatenate([h[0] for h in hits]), np.concatenate([h[1] for h in hits])
        best = top_k(scores, k)
        return [(float(scores[i]), int(docs[i])) for i in best]

    def _exact_is_cheaper(self, view: _View, k: int, ef_search: int, scope: tuple[tuple, np.ndarray]) -> bool:
        """Whether the scope's docs cost less scored exactly than searched as the graph path would: in
        each segment holding some, by its graph with the beam widened by that segment's own share, or
        exactly where it has no graph, holds too few of them, or is IVF (the same cost either way)."""
        if len(scope[1]) < self.settings.exact_below:
            return True
        graph = 0.0
        for seg, (_bits, allowed) in zip(view.segments, self._per_scope(view, scope, _bitmap)):
            if not allowed or seg.index is None or allowed < self.settings.exact_below or seg.info.kind == "ivf_pq":
                graph += allowed
            else:
                graph += self.settings.graph_step_cost * seg.filtered_ef(k, ef_search, allowed)
        return len(scope[1]) < graph

    def _search_segment(self, seg: Segment, query: np.ndarray, k: int, ef_search: int, exact: bool,
                        bits: np.ndarray, allowed: int) -> tuple[np.ndarray, np.ndarray]:
        """The segment's index, filtered by the bitmap as it is; exact search when the segment has no
        index, or when few docs pass (filtered approximate search loses recall then) or exact is asked."""
        if allowed == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if exact or seg.index is None or allowed < self.settings.exact_below:
            return seg.search_positions(query, k, np.flatnonzero(_unpack(bits, seg.info.count)))
        return seg.search_bitmap(query, k, ef_search, bits, allowed)

    def _scope(self, view: _View, shop_id: str | None, filter: Filter | None) -> tuple[tuple, np.ndarray] | None:
        """(a cache key, the sorted live docs) a query may return; None when it may return any. A shop's
        docs and a filter's are found once per generation (search.fields, search.filters) and kept."""
        if filter is None and shop_id is None:
            return None
        key = (shop_id, None if filter is None else filter.key)

        def evaluate():
            if filter is None:
                return view.shop_docs(shop_id)
            docs = filter.evaluate(view.fields, view.shop_docs)
            if shop_id is not None:
                docs = np.intersect1d(docs, view.shop_docs(shop_id), assume_unique=True)
            return docs
        return key, self._cached(view, key, "docs", evaluate)

    def _per_scope(self, view: _View, scope: tuple[tuple, np.ndarray], make) -> list:
        """A scope's docs per segment as `make` puts them (positions for exact search, a bitmap for
        filtered search), made once per generation and kept: a query then reads them as they are."""
        key, docs = scope
        return self._cached(view, key, make, lambda: [make(seg, docs) for seg in view.segments])

    def _cached(self, view: _View, key: tuple, kind, make):
        key = (view.generation, key, kind)
        with self._cache_lock:
            cached = self._shop_cache.get(key)
        if cached is None:
            cached = make()
            with self._cache_lock:
                self._shop_cache[key] = cached
                while len(self._shop_cache) > SHOP_CACHE_SIZE:
                    self._shop_cache.pop(next(iter(self._shop_cache)))
        return cached

    def facets(self, names: Iterable[str], shop_id: str | None = None, filter: Filter | None = None,
               buckets: dict[str, list[float]] | None = None) -> dict[str, dict]:
        """Per field, exact counts over the live docs of the scope: {"values": {value: count}}, or for a
        field given bucket edges {"buckets": [count per bucket]}. Costs in proportion to the scope."""
        view = self._view
        scope = self._scope(view, shop_id, filter)
        docs = None if scope is None else scope[1]
        out = {}
        for name in names:
            index = view.fields[name]
            edges = (buckets or {}).get(name)
            out[name] = {"buckets": index.histogram(docs, edges)} if edges else {"values": index.counts(docs)}
        return out

    def hits(self, scored: Iterable[tuple[float, int]], generation: int | None = None) -> list[Hit]:
        """The products of (score, doc) pairs, in their order. A doc may have been tombstoned since the
        search: it is dropped, never returned stale."""
        scored = list(scored)
        found = self.hits_by_doc(scored, generation)
        return [found[doc] for _, doc in scored if doc in found]

    def hits_by_doc(self, scored: Sequence[tuple[float, int]], generation: int | None = None) -> dict[int, Hit]:
        if not scored:
            return {}
        with self._transaction(immediate=False) as db:
            # One statement whatever the page size: sqlite3 keeps each distinct statement prepared (128 per
            # connection, a connection per thread), so `IN (?, ?, ...)` of every length grew memory with k.
            rows = {row[0]: row[1:] for row in db.execute(
                "SELECT doc_id, product_id, shop_id, version, title, image_url, attributes, embedded_at "
                "FROM products WHERE doc_id IN (SELECT value FROM json_each(?))",
                (json.dumps([doc for _, doc in scored]),))}
        generation = self._view.generation if generation is None else generation
        return {doc: Hit(row[0], row[1], score, row[2], row[3], row[4], _attributes(row[5]), row[6], generation)
                for score, doc in scored if (row := rows.get(doc)) is not None}

    def vectors_of(self, docs: Sequence[int], view: "_View | None" = None) -> np.ndarray:
        """The stored vectors of `docs` (rows of zeros for docs the view does not hold)."""
        view = view or self._view
        docs = np.asarray(docs, np.int64)
        out = np.zeros((len(docs), self.dim), np.float32)
        for seg in view.segments:
            found, positions = seg.locate(docs)
            if len(positions):
                out[found] = seg.vectors[positions]
        return out

    def product_vector(self, product_id: str) -> np.ndarray | None:
        """A live product's stored vector, or None when this store holds no live doc of it."""
        view = self._view
        with self._transaction(immediate=False) as db:
            row = db.execute("SELECT doc_id FROM products WHERE product_id = ?", (product_id,)).fetchone()
        if row is None or row[0] is None or row[0] >= view.next_doc:
            return None
        vector = self.vectors_of([row[0]], view)[0]
        return vector if vector.any() else None

    def live_products(self) -> dict[str, tuple[int, str]]:
        """product_id → (version, shop_id) of every product with a live vector."""
        with self._transaction(immediate=False) as db:
            return {pid: (version, shop) for pid, version, shop in
                    db.execute("SELECT product_id, version, shop_id FROM products WHERE doc_id IS NOT NULL")}

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids, vectors) of every live doc, for exact-search baselines and recall."""
        view = self._view
        ids, vectors = [], []
        for segment in view.segments:
            keep = _unpack(view.live[segment.info.name], segment.info.count)
            ids.append(segment.ids[keep])
            vectors.append(segment.vectors[keep])
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(ids), np.concatenate(vectors)

    def stats(self) -> dict:
        view = self._view
        return {
            "model": self.model,
            "dim": self.dim,
            "segment_kind": self.settings.segment.kind,
            "generation": view.generation,
            "live_docs": sum(view.live_count.values()),
            "segments": [{"name": s.info.name, "kind": s.info.kind, "count": s.info.count,
                          "live": view.live_count[s.info.name]} for s in view.segments],
        }

    def close(self) -> None:
        """Closes every thread's connection (a service that moved to another index keeps no handle of
        this one open) and releases the writer lock."""
        with self._cache_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None




def _strictly_decreasing(scored: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Equal scores (ties: BM25 of equal texts, rank-fusion sums, copies) nudged down a float step each,
    in the order given: the shards' lists then merge by score into one order that every page size
    agrees on (search.sharded pages by merging each shard's top offset + k)."""
    out, last = [], np.inf
    for score, doc in scored:
        score = float(np.nextafter(last, -np.inf)) if score >= last else score
        out.append((score, doc))
        last = score
    return out


def _attributes_json(record: EmbeddingRecord) -> str:
    # allow_nan=False: records refuse non-finite numbers (schemas), and SQLite's JSON could not read them.
    return json.dumps(dict(record.attributes), ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def _attributes(text: str) -> dict:
    """A product row's attributes. Rows written before non-finite numbers were refused may hold
    `Infinity` or `NaN`: read as null, so a hit can always be sent as JSON."""
    values = json.loads(text) if text else {}
    return values if non_finite_number(values) is None else _finite(values)


def _finite(value):
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _field_values(db, field: Field, codes: Codes | None) -> tuple[np.ndarray, np.ndarray]:
    """(docs, numbers) of the live products holding a value of the field (SQLite's JSON functions pick
    the value; the rare row SQLite cannot read, an old one holding `Infinity`, is read by Python)."""
    path = '$."' + field.name + '"'
    docs, values = [], []
    for doc, kind, value in db.execute(
            "SELECT doc_id, json_type(attributes, ?), json_extract(attributes, ?) FROM products "
            "WHERE doc_id IS NOT NULL AND json_valid(attributes) "
            "AND json_type(attributes, ?) IN ('true', 'false', 'integer', 'real', 'text')",
            (path, path, path)):
        value = typed(field, kind == "true" if kind in ("true", "false") else value)
        if value is not None:
            docs.append(doc)
            values.append(value)
    for doc, text in db.execute("SELECT doc_id, attributes FROM products "
                                "WHERE doc_id IS NOT NULL AND NOT json_valid(attributes)"):
        try:
            value = typed(field, json.loads(text).get(field.name))
        except (ValueError, AttributeError):
            continue  # not an object at all: the product has no value for the field
        if value is not None:
            docs.append(doc)
            values.append(value)
    return np.array(docs, np.int64), numbers(field, codes, values)


def _column(seg: Segment, docs: np.ndarray, values: np.ndarray) -> Column:
    """A segment's column from (docs, numbers) of any docs: those it holds are its values."""
    found, positions = seg.locate(docs)
    return Column.at(seg.info.count, positions, values[found])


def _current_states(db, product_ids: set[str]) -> dict[str, tuple]:
    """product → (version, doc_id, shop_id, title, image_url, attributes, embedded_at, description), as
    a commit's `changed` holds them (the description from the keyword index, which alone keeps it)."""
    states = {}
    ids = list(product_ids)
    for start in range(0, len(ids), 500):
        chunk = json.dumps(ids[start:start + 500], ensure_ascii=False)  # one statement shape (see hits_by_doc)
        for row in db.execute("SELECT p.product_id, p.version, p.doc_id, p.shop_id, p.title, p.image_url, "
                              "p.attributes, p.embedded_at, coalesce(l.description, '') FROM products p "
                              "LEFT JOIN lexical l ON l.rowid = p.doc_id "
                              "WHERE p.product_id IN (SELECT value FROM json_each(?))", (chunk,)):
            states[row[0]] = row[1:]
    return states
