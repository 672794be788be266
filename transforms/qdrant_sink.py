"""`WriteToQdrant`: embedding records → points of a Qdrant collection, last writer wins in the engine
(docs/ARCHITECTURE.md §18; the point model, its conditions and the client: search.qdrant.collection).

The other sink of `pipelines.index` (`--sink qdrant`); the FAISS index (`UpdateIndex`) stays the default.

A bundle's records are written in batches of at most `batch_size`: the batch's stored versions are
read (one `retrieve`) to say what each record will do (the counts, and a patch of a product with no
live point, refused as the FAISS store refuses it), then one `batch_update_points` request carries
the batch's conditional writes in version order. The counts are exact when one worker writes a
product at a time; when two race on one product, the engine's condition decides the state and the
counts may credit both.

Outcomes land where the FAISS sink's do: counters `upserted`, `deleted`, `ignored`, `refused`
(namespace `index`), a `sink` dead letter for each record refused (another model, another dimension,
a vector that is not a finite unit vector, a patch without a live point, anything the engine answers
400 to), one commit dict per batch. A transient failure (connection refused or reset, a timeout,
429, 5xx) is retried `retries` times with exponential backoff and jitter; then the bundle fails and
Beam retries it, replaying what it already wrote harmlessly (the conditions make every write
idempotent). Nothing is lost while the engine is down: a batch job fails, a streaming one keeps
retrying and Pub/Sub keeps the messages.

Why a DoFn of our own and not Beam's `VectorDatabaseWriteTransform(QdrantWriteConfig(...))`
(apache_beam.ml.rag.ingestion.qdrant): its writer sends each batch as a plain `upsert`, with no
`update_filter`, so an older record replayed after a newer one overwrites it; it needs a vector for
every point (no tombstone) and writes whole points (no attribute patch that keeps the vector); it
outputs nothing (no counts, no dead letters: one bad point fails the batch, and a streaming job
retries it for ever); and importing it imports `apache_beam.ml`, which imports torch (~1.7 s and
~500 MB per worker process here) into a job that runs no model. What it does well is kept: the same
client settings (`check_compatibility=False`), the named dense vector `dense` (its default key), and
its backoff on 429 (`retry_after_s`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Any, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from schemas import DeadLetter, EmbeddingRecord, Stage
from search.fields import Field
from search.index.writer import refusal
from search.qdrant.collection import (VECTOR_NAME, Clients, LayoutMismatch, QdrantCollection, QdrantTarget,
                                      QdrantUnavailable, Stored, live_only, patch_payload, point_id, point_payload,
                                      stored_older_than, tombstone_payload, transient)
from search.store import StoreSettings
from transforms.dead_letter import not_created

__all__ = ["WriteToQdrant", "plan"]

_log = logging.getLogger(__name__)
_REFUSED_STATUS = (400, 422)


def _refused_by_engine(error: BaseException, local: bool) -> str | None:
    """The engine's reason when it refuses the request itself (a server's 400/422; the local mode raises
    ValueError for the same), None for anything else (a missing collection is not a record's fault)."""
    from qdrant_client.http.exceptions import UnexpectedResponse

    if isinstance(error, UnexpectedResponse) and error.status_code in _REFUSED_STATUS:
        content = error.content.decode("utf-8", "replace") if isinstance(error.content, bytes) else str(error.content)
        return f"{error.status_code} {error.reason_phrase}: {content[:500]}"
    if local and isinstance(error, ValueError) and "not found" not in str(error):
        return str(error)[:500]
    return None


@dataclasses.dataclass
class _Plan:
    """What a batch will do: each record's outcome and reason, and the engine operations, each with the
    records it writes."""

    outcomes: list[list]  # [record, outcome, reason]; outcome: upserted, deleted, ignored, refused
    operations: list[tuple[list[int], Any]]  # (indexes into outcomes, operation)
    singles: dict[int, Any]  # index into outcomes → that record's write alone


def plan(records: Sequence[EmbeddingRecord], stored: dict[str, Stored], model: str, dim: int,
         filterable: Sequence[Field] = ()) -> _Plan:
    """The batch against the stored versions, in arrival order, as the FAISS store applies a batch
    (search.index.writer): an older or repeated version is ignored; a patch needs a live product. The
    operations go in version order: the records of one product that survive are in rising version
    order already, so this keeps each product's order and groups the writes of one version (a backfill's
    version 1) into one conditional upsert."""
    outcomes: list[list] = []
    state = dict(stored)
    writes: list[tuple[int, int, str]] = []  # (version, outcome index, kind)
    singles: dict[int, Any] = {}
    for record in records:
        # The FAISS store's checks: the engine would take a non-unit vector (cosine normalises it), but
        # scores are inner products of unit vectors everywhere else, so a record has one outcome in both.
        reason = refusal(record, model, dim, "collection")
        if reason is not None:
            outcomes.append([record, "refused", reason])
            continue
        current = state.get(record.product_id)
        if current is not None and record.version <= current[0]:
            outcomes.append([record, "ignored", ""])
            continue
        if record.op == "patch" and (current is None or current[1]):
            outcomes.append([record, "refused", "an attribute patch of a product with no live vector in this "
                                                "collection: send an upsert"])
            continue
        if record.op == "patch":
            state[record.product_id] = current._replace(version=record.version)
        else:
            state[record.product_id] = Stored(record.version, record.op == "delete", record.title, record.description)
        outcomes.append([record, "deleted" if record.op == "delete" else "upserted", ""])
        singles[len(outcomes) - 1] = _operation([record], filterable, current)
        writes.append((record.version, len(outcomes) - 1, "patch" if record.op == "patch" else "point"))
    operations: list[tuple[list[int], Any]] = []
    group: list[int] = []
    writes.sort(key=lambda write: write[0])
    for n, (version, index, kind) in enumerate(writes):
        if kind == "patch":
            operations.append(([index], singles[index]))
            continue
        group.append(index)
        following = writes[n + 1] if n + 1 < len(writes) else None
        if following is None or following[0] != version or following[2] != "point":
            operations.append((group, _operation([outcomes[i][0] for i in group], filterable)))
            group = []
    return _Plan(outcomes, operations, singles)


def _operation(records: Sequence[EmbeddingRecord], filterable: Sequence[Field], stored: Stored | None = None):
    """The conditional write of `records`, all of one version: a patch (one record, of the `stored` live
    point) sets its payload on that point; upserts and deletes (tombstones, no vector) are one
    conditional upsert."""
    from qdrant_client import models

    version = records[0].version
    if records[0].op == "patch":
        (record,) = records
        return models.SetPayloadOperation(set_payload=models.SetPayload(
            payload=patch_payload(record, stored, filterable),
            filter=models.Filter(must=[models.HasIdCondition(has_id=[point_id(record.product_id)]),
                                       stored_older_than(version)],
                                 must_not=live_only().must_not)))
    points = [models.PointStruct(id=point_id(r.product_id), vector={}, payload=tombstone_payload(r))
              if r.op == "delete" else
              models.PointStruct(id=point_id(r.product_id), vector={VECTOR_NAME: r.embedding.tolist()},
                                 payload=point_payload(r, filterable))
              for r in records]
    return models.UpsertOperation(upsert=models.PointsList(points=points, update_filter=stored_older_than(version)))


class _ConditionalWriteFn(beam.DoFn):
    """Records → conditional writes per batch (see the module docstring for why not Beam's Qdrant writer)."""

    OUTCOMES = ("upserted", "deleted", "ignored", "refused")

    def __init__(self, target: QdrantTarget, model: str | None, dim: int, settings: StoreSettings,
                 batch_size: int = 1000, projection: str = "", backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self._target = target
        self._model = model
        self._dim = dim
        self._settings = settings
        self._batch_size = batch_size
        self._projection = projection
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._counters = {name: Metrics.counter("index", name) for name in (*self.OUTCOMES, "retries")}
        self._commit_ms = Metrics.distribution("index", "commit_ms")
        self._batch_sizes = Metrics.distribution("index", "batch_size")

    def setup(self):
        client, lock = Clients.acquire(self._target)
        self._collection = QdrantCollection(self._target, client, lock)
        self._layout: tuple[str, int, tuple[Field, ...]] | None = None
        if self._model is not None and self._dim:
            self._layout = self._call(lambda: self._collection.ensure(self._model, self._dim, self._settings,
                                                                      self._projection), "make the collection")
            if self._layout[0] != self._model:
                raise LayoutMismatch(f"{self._target.where} holds {self._layout[0]} vectors, not {self._model}")
        else:
            self._layout = self._call(self._collection.current, "read the collection")

    def teardown(self):
        if getattr(self, "_collection", None) is not None:
            self._collection = None
            Clients.release(self._target)

    def start_bundle(self):
        self._pending: list[EmbeddingRecord] = []
        self._where = None

    def process(self, record: EmbeddingRecord, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self._where = WindowedValue(None, timestamp, (window,))
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            batch, self._pending = self._pending, []
            yield from self._write(batch)

    def finish_bundle(self):
        batch, self._pending = self._pending, []
        for output in self._write(batch) if batch else ():
            if isinstance(output, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(output.tag, self._where.with_value(output.value))
            else:
                yield self._where.with_value(output)

    def _call(self, call, what: str):
        """`call()`, retried with exponential backoff and jitter while the failure is transient, at most
        `retries` times; then QdrantUnavailable (the bundle fails, Beam retries it)."""
        attempt = 0
        while True:
            try:
                return call()
            except Exception as e:
                if not transient(e):
                    raise
                if attempt >= self._target.retries:
                    raise QdrantUnavailable(f"{self._target.where}: could not {what} in {attempt + 1} attempts: "
                                            f"{type(e).__name__}: {e}") from e
                delay = getattr(e, "retry_after_s", None) or \
                    min(self._max_backoff_s, self._backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
                self._counters["retries"].inc()
                _log.warning("%s: could not %s (%s: %s); retrying in %.1f s", self._target.where, what,
                             type(e).__name__, e, delay)
                time.sleep(delay)
                attempt += 1

    def _layout_from(self, records: list[EmbeddingRecord]) -> tuple[str, int, tuple[Field, ...]] | None:
        """As UpdateIndex's: a new collection takes (model, dim) from an upsert (this batch's, or any the
        bundle holds), never from a delete or a patch."""
        if self._layout is None:
            upsert = next((r for r in [*records, *getattr(self, "_pending", [])]
                           if r.op == "upsert" and r.embedding.size), None)
            if upsert is not None:
                self._layout = self._call(lambda: self._collection.ensure(
                    upsert.model, int(upsert.embedding.size), self._settings, self._projection), "make the collection")
            else:
                self._layout = self._call(self._collection.current, "read the collection")
        return self._layout

    def _write(self, records: list[EmbeddingRecord]):
        if self._layout_from(records) is None:
            for dead in not_created(records, "collection"):
                self._counters["refused"].inc()
                yield beam.pvalue.TaggedOutput(WriteToQdrant.DEAD_LETTER, dead)
            return
        model, dim, filterable = self._layout
        started = time.perf_counter()
        with self._collection.locked():  # the local mode: read and write as one step, so the counts are exact
            stored = self._call(lambda: self._collection.stored(records), "read the stored versions")
            batch = plan(records, stored, model, dim, filterable)
            if batch.operations:
                self._apply(batch)
        took = (time.perf_counter() - started) * 1000
        self._commit_ms.update(int(took))
        self._batch_sizes.update(len(records))
        counts = {name: 0 for name in self.OUTCOMES}
        for record, outcome, reason in batch.outcomes:
            counts[outcome] += 1
            if outcome == "refused":
                error_type = "EngineRefused" if reason.startswith("engine: ") else "IndexMismatch"
                yield beam.pvalue.TaggedOutput(WriteToQdrant.DEAD_LETTER,
                                               DeadLetter.of_record(Stage.SINK, error_type, reason, record))
        for name, n in counts.items():
            self._counters[name].inc(n)
        yield dict(collection=self._target.collection, records=len(records), **counts, commit_ms=round(took, 2),
                   committed_at=time.time())

    def _apply(self, batch: _Plan) -> None:
        """One request for the batch; when the engine refuses it, each record's write on its own, so one bad
        point is a dead letter and the rest land."""
        local = bool(self._target.path)
        collection = self._collection

        def send(operations):
            with collection.locked():
                collection.client.batch_update_points(self._target.collection, operations,
                                                      ordering=_write_ordering(), wait=True)
        try:
            self._call(lambda: send([operation for _, operation in batch.operations]), "write a batch")
            return
        except Exception as e:
            if _refused_by_engine(e, local) is None:
                raise
            _log.warning("%s refused a batch (%s); writing its records one at a time", self._target.where, e)
        for indexes, _ in batch.operations:
            for index in indexes:
                single = batch.singles[index]
                try:
                    self._call(lambda: send([single]), "write a record")
                except Exception as e:
                    reason = _refused_by_engine(e, local)
                    if reason is None:
                        raise
                    batch.outcomes[index][1:] = ["refused", f"engine: {reason}"]


def _write_ordering():
    """Writes of one point go through its shard's leader, so replicas apply them in one order (a patch
    and the upsert it follows included); `strong` would refuse writes while a leader is re-elected."""
    from qdrant_client import models

    return models.WriteOrdering.MEDIUM


class WriteToQdrant(beam.PTransform):
    """`EmbeddingRecord`s → commits (a dict of what each batch did) and dead letters, as `UpdateIndex`."""

    DEAD_LETTER = "dead_letter"

    def __init__(self, target: QdrantTarget, model: str | None, dim: int, settings: StoreSettings = StoreSettings(),
                 batch_size: int = 1000, projection: str = "", backoff_s: float = 0.5):
        """`model` None: the collection's, or for a new collection the first upsert's (and its dimension)."""
        super().__init__()
        self._fn = _ConditionalWriteFn(target, model, dim, settings, batch_size, projection, backoff_s)

    def expand(self, records):
        return records | "Write" >> beam.ParDo(self._fn).with_outputs(self.DEAD_LETTER, main="commits")

