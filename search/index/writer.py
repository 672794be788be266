"""The store's one writer: last-writer-wins apply, patches, the commit and its marker, and merges.

- Product state lives in the catalog: version, live doc id, shop, title, image URL, attributes.
  Last writer wins by `version`: an older or repeated version is a no-op, an upsert tombstones the
  product's old doc and adds a new one, a patch adds a new doc of the same vector with new
  attributes, a delete tombstones.
- A commit first writes a new immutable `flat` segment (fsynced), then one SQLite transaction
  updates the products, adds the segment to the manifest, bumps the generation and keeps the
  commit's change. That transaction is the commit point: a crash before it leaves the previous state
  (the orphan files are removed on the next open), a crash after it the new one. The marker follows.
- Compaction merges segments into one segment of the index's kind (search.segment) on a thread of
  its own, without holding up commits; docs tombstoned meanwhile stay tombstoned, because the merge
  is applied as a change like any commit (Snapshot.after).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import IO, Protocol, Sequence

import faiss
import numpy as np

from schemas import EmbeddingRecord, format_timestamp
from search.index import catalog, files
from search.index.catalog import Catalog, ProductRow
from search.index.errors import IndexMismatch
from search.index.reader import Reader
from search.index.settings import StoreMeta
from search.index.snapshot import Snapshot, unpack
from search.merge_policy import SegmentState
from search.segment import Segment, SegmentInfo

__all__ = ["ApplyResult", "CommitDelta", "CommitListener", "UNIT_TOLERANCE", "Writer", "refusal"]

_log = logging.getLogger(__name__)

UNIT_TOLERANCE = 1e-3  # float32 vectors from any model land within 1e-6 of length 1


def refusal(record: EmbeddingRecord, model: str, dim: int, store: str = "index") -> str | None:
    """Why a store (`store`: "index", or "collection" for the Qdrant sink) of `model` and `dim` refuses
    `record`, or None: one check for every sink, so a record has the same outcome in each."""
    if record.model != model:
        return f"record of model {record.model!r} for {'an' if store[0] in 'aeiou' else 'a'} {store} of {model!r}"
    if record.op not in ("upsert", "delete", "patch"):
        return f"unknown op {record.op!r}"
    if record.op == "upsert":
        if len(record.embedding) != dim:
            return f"{len(record.embedding)}-d vector for a {dim}-d {store}"
        # Scores are inner products of unit vectors: anything else would rank wrongly.
        norm = float(np.linalg.norm(record.embedding.astype(np.float64)))
        if not np.isfinite(norm) or abs(norm - 1.0) > UNIT_TOLERANCE:
            return f"the vector is not a finite unit vector (norm {norm:.6g}): normalise it to length 1"
    return None


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
    products: tuple[tuple, ...]  # catalog.ProductRow
    added: tuple[SegmentInfo, ...] = ()
    removed: tuple[str, ...] = ()


class CommitListener(Protocol):
    """Told of every segment file set before it is committed, and of every commit after it is."""

    def segment_written(self, directory: Path, info: SegmentInfo) -> None: ...

    def committed(self, delta: CommitDelta) -> None: ...


class Writer:
    def __init__(self, catalog: Catalog, directory: Path, reader: Reader, meta: StoreMeta, lock: IO,
                 listener: CommitListener | None = None):
        """`lock`: the writer lock (files.lock_writer), held until close; the reader's snapshot is the one
        each commit moves on."""
        self.catalog = catalog
        self.directory = directory
        self.reader = reader
        self.meta = meta
        self._listener = listener
        self._lock_file = lock
        self._write_lock = threading.RLock()
        self._compacting = threading.Lock()
        self._compaction_thread: threading.Thread | None = None

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def adopt_dimension(self, model: str, dim: int) -> None:
        """Gives a store recorded at 0 dimensions (made from a delete by an earlier version, so it holds
        tombstones and no vector) the model and dimension of its first upsert."""
        if dim < 1:
            raise ValueError("adopt_dimension needs a dimension of at least 1")
        with self._write_lock, self.catalog.transaction() as db:
            if int(catalog.meta(db, "dim")) != 0 or db.execute("SELECT 1 FROM segments LIMIT 1").fetchone():
                raise IndexMismatch(f"{self.directory} indexes {self.meta.model} ({self.meta.dim}-d): "
                                    f"not a 0-d store")
            db.executemany("UPDATE meta SET value = ? WHERE key = ?", [(model, "model"), (str(dim), "dim")])
        self.meta.model, self.meta.dim = model, dim

    # Commits ------------------------------------------------------------------------------
    def check(self, record: EmbeddingRecord) -> None:
        why = refusal(record, self.meta.model, self.meta.dim)
        if why is not None:
            raise IndexMismatch(why)

    def apply(self, records: Sequence[EmbeddingRecord]) -> ApplyResult:
        """Applies a micro-batch in one commit; returns what it did. Refused records are reported."""
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
            view = self.reader.snapshot
            with self.catalog.transaction() as db:
                next_doc = int(catalog.meta(db, "next_doc_id"))
                current = catalog.current_states(db, {r.product_id for r in accepted})
                changed: dict[str, ProductRow] = {}
                vectors: dict[str, np.ndarray] = {}  # product → the vector of its new doc
                for record in accepted:
                    state = changed.get(record.product_id) or current.get(record.product_id)
                    if record.version <= (state.version if state else -1):
                        result.ignored += 1
                        continue
                    embedded_at = format_timestamp(record.embedded_at)
                    if record.op == "upsert":
                        changed[record.product_id] = ProductRow(
                            record.product_id, record.version, next_doc, record.shop_id, record.title,
                            record.image_url, catalog.attributes_json(record), embedded_at, record.description)
                        vectors[record.product_id] = record.embedding
                        next_doc += 1
                        result.upserted += 1
                    elif record.op == "patch":
                        # New attributes on the product's vector as it is: a new doc, nothing embedded.
                        if state is None or state.doc_id is None:
                            result.refused.append((record, "an attribute patch of a product with no live vector "
                                                           "in this index: send an upsert"))
                            continue
                        if record.product_id not in vectors:
                            vectors[record.product_id] = view.vectors_of([state.doc_id], self.meta.dim)[0]
                        changed[record.product_id] = state._replace(
                            version=record.version, doc_id=next_doc, attributes=catalog.attributes_json(record))
                        next_doc += 1
                        result.upserted += 1
                    else:
                        changed[record.product_id] = ProductRow(record.product_id, record.version, None,
                                                                record.shop_id, record.title, "", "{}",
                                                                embedded_at, "")
                        vectors.pop(record.product_id, None)
                        result.deleted += 1
                info = segment = None
                if vectors:
                    ids = np.array([changed[pid].doc_id for pid in vectors], np.int64)
                    info = Segment.write(self.directory, files.segment_name(), ids,
                                         np.stack(list(vectors.values())).astype(np.float32), "flat")
                    segment = Segment(self.directory, info, self.meta.require_sums)  # verified before committed
                    if self._listener:
                        self._listener.segment_written(self.directory, info)
                change = catalog.write_commit(db, generation=view.generation + 1, products=changed.values(),
                                              added=[(info.name, info.kind, info.count)] if info else (),
                                              next_doc_id=next_doc)
            self._committed(view, change, {info.name: segment} if info else {})
            if self._listener:
                self._listener.committed(CommitDelta(self.reader.snapshot.generation, next_doc,
                                                     tuple(changed.values()), (info,) if info else ()))
        return result

    def _committed(self, view: Snapshot, change: dict, added: dict[str, Segment]) -> None:
        """After the commit point: the WAL checkpointed, the marker written, the snapshot moved on."""
        generation = view.generation + 1
        try:
            self.catalog.checkpoint()
            files.mark(self.directory, generation)
            self.reader.snapshot = view.after(change, generation, added)
        except BaseException:
            # Committed, but the view did not move on: the next commit would reuse this generation
            # and its change. The view is read anew from the catalog, then the failure goes up.
            self.reader.snapshot = self.reader.load()
            raise

    # Compaction ---------------------------------------------------------------------------
    def compaction_plan(self, view: Snapshot | None = None) -> list[Segment]:
        """The segments the merge policy would merge now (search.merge_policy)."""
        view = view or self.reader.snapshot
        states = [SegmentState(seg.info.name, seg.info.kind, seg.info.count, view.live_count[seg.info.name])
                  for seg in view.segments]
        names = set(self.meta.settings.merge.plan(states))
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
        params = self.meta.settings.segment
        with self._compacting:
            view = self.reader.snapshot
            plan = list(view.segments) if force else self.compaction_plan(view)
            if not plan or force and len(plan) == 1 and view.live_count[plan[0].info.name] == plan[0].info.count \
                    and plan[0].info.kind == params.kind_for(plan[0].info.count):
                return False
            ids = np.concatenate([seg.ids for seg in plan])
            vectors = np.concatenate([seg.vectors for seg in plan])
            keep = np.concatenate([unpack(view.live[seg.info.name], seg.info.count) for seg in plan])
            info = None
            if keep.any():
                # omp_set_num_threads is per calling thread: only this build is limited.
                faiss.omp_set_num_threads(self.meta.settings.build_threads or os.cpu_count() or 1)
                if not keep.all():
                    ids, vectors = ids[keep], vectors[keep]
                info = Segment.write(self.directory, files.segment_name(), ids, vectors,
                                     params.kind_for(len(ids)), params)
                if self._listener:
                    self._listener.segment_written(self.directory, info)
            merged = Segment(self.directory, info, self.meta.require_sums) if info else None
            with self._write_lock:
                current = self.reader.snapshot
                with self.catalog.transaction() as db:
                    change = catalog.write_commit(db, generation=current.generation + 1,
                                                  removed=[seg.info.name for seg in plan],
                                                  added=[(info.name, info.kind, info.count)] if info else ())
                # Commits during the build may have tombstoned merged docs: applied as of now.
                self._committed(current, change, {merged.info.name: merged} if merged else {})
                if self._listener:
                    self._listener.committed(CommitDelta(self.reader.snapshot.generation, current.next_doc, (),
                                                         (info,) if info else (),
                                                         tuple(seg.info.name for seg in plan)))
            for seg in plan:
                files.remove_segment(self.directory, seg.info.name)
            _log.info("compacted %d segments (%d docs) into %d live docs", len(plan), len(keep), int(keep.sum()))
            return True
