"""`UpdateIndex`: embedding records → micro-batches per shard → commits to the index store.

Records are routed to their shard (a hash of product_id), then batched one of two ways:

- per bundle (local runners): a shard's records of a bundle are one commit, or several of at most
  `batch_size`. It needs no timers, so a commit follows its records as closely as the runner
  delivers them (a timer-driven `GroupIntoBatches` waits on the DirectRunner's 30-second Pub/Sub
  pull).
- stateful (`stateful=True`, what a Dataflow launch uses): records keyed by shard go through
  `GroupIntoBatches` (at most `batch_size`, held at most `max_delay_secs`), so each shard's batches
  are committed on the worker that owns the key, and Dataflow acks the Pub/Sub messages only once
  that step has checkpointed them: a worker lost mid-batch loses nothing. Two workers can still
  hold a shard briefly; `ShardWriter` fences their commits.

Records the store refuses (another model, another dimension) become dead letters with stage `sink`.
Compaction runs on a background thread when the store's plan asks for it, so commits never wait
for an HNSW build. A failed commit raises: Beam retries the bundle, and replaying it is harmless
(last writer wins by version).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import typing
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared
from apache_beam.utils.windowed_value import WindowedValue

from schemas import DeadLetter, EmbeddingRecord, Stage
from transforms.dead_letter import not_created
from search.sharded import ShardedIndex, ShardWriter, shard_of
from search.store import IndexMismatch, StoreSettings

__all__ = ["UpdateIndex", "parse_record"]

_log = logging.getLogger(__name__)


class _ShardWriters:
    """The `ShardWriter` of each shard: one per process (Beam's `Shared`), used by the DoFn's threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._writers: dict[str, tuple[ShardWriter, threading.Lock]] = {}

    def get(self, index_dir: str, shard: int, model: str, dim: int, settings: StoreSettings,
            cache_dir: str | None) -> tuple[ShardWriter, threading.Lock]:
        key = ShardedIndex.shard_path(index_dir, shard)
        with self._lock:
            if key not in self._writers:
                writer = ShardWriter(index_dir, shard, model, dim, settings, Path(cache_dir) if cache_dir else None)
                self._writers[key] = (writer, threading.Lock())
            return self._writers[key]

    def all(self) -> list[tuple[ShardWriter, threading.Lock]]:
        with self._lock:
            return list(self._writers.values())


class _CommitFn(beam.DoFn):
    def __init__(self, index_dir: str, model: str | None, dim: int, num_shards: int, batch_size: int,
                 settings: StoreSettings, background_compaction: bool, cache_dir: str | None,
                 finish_compactions: bool = False):
        self._index_dir = index_dir
        self._finish_compactions = finish_compactions
        self._cache_dir = cache_dir
        self._model = model
        self._dim = dim
        self._num_shards = num_shards
        self._batch_size = batch_size
        self._settings = settings
        self._background_compaction = background_compaction
        self._shared_writers = Shared()  # every copy of this DoFn in a process uses the same writers
        self._counters = {name: Metrics.counter("index", name) for name in ("upserted", "deleted", "ignored", "refused")}
        self._commit_ms = Metrics.distribution("index", "commit_ms")
        self._batch_sizes = Metrics.distribution("index", "batch_size")

    def setup(self):
        self._writers = self._shared_writers.acquire(_ShardWriters, tag=self._index_dir)
        self._layout: tuple[str, int] | None = None
        if self._model is not None and self._dim:
            self._layout = self._settle_layout(self._model, self._dim)

    def _settle_layout(self, model: str, dim: int) -> tuple[str, int]:
        """The index's (model, dim): as configured, or as the first record proposes when the index is
        new; when another worker's first record got there first, the index's (then this record is refused)."""
        try:
            ShardedIndex.ensure_layout(self._index_dir, self._num_shards, model, dim, self._settings)
        except IndexMismatch:
            layout = ShardedIndex.layout(self._index_dir)
            if self._model is not None or layout is None or layout["num_shards"] != self._num_shards:
                raise
            model, dim = layout["model"], layout["dim"]
        return model, dim

    def teardown(self):
        """A batch job ends with its shards merged as the policy plans (a progress line per merge); a
        streaming one waits for the build under way. Either way no build is left running on a thread
        when the process exits (a FAISS build cut off at exit aborts the process)."""
        for writer, lock in self._writers.all() if hasattr(self, "_writers") else ():
            store = writer.store
            if not self._finish_compactions:
                store.wait_for_compaction()
                continue
            started = time.perf_counter()
            if store.compacting:
                _log.info("shard %d: waiting for the merge under way before the job ends", writer.shard)

            def progress(segments, vectors, shard=writer.shard):
                _log.info("shard %d: merging %d segments (%d vectors) before the job ends", shard, segments, vectors)
            with lock:
                merges = store.finish_compaction(progress)
            if merges:
                _log.info("shard %d: %d merge(s) in %.1f s; %d segments left", writer.shard, merges,
                          time.perf_counter() - started, len(store.stats()["segments"]))

    def start_bundle(self):
        self._pending: dict[int, list[EmbeddingRecord]] = {}
        self._where = None

    def process(self, record: EmbeddingRecord, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        self._where = WindowedValue(None, timestamp, (window,))
        shard = shard_of(record.product_id, self._num_shards)
        self._pending.setdefault(shard, []).append(record)
        if len(self._pending[shard]) >= self._batch_size:
            yield from self._commit(shard, self._pending.pop(shard))

    def finish_bundle(self):
        for shard in sorted(self._pending):
            for output in self._commit(shard, self._pending[shard]):
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield beam.pvalue.TaggedOutput(output.tag, self._where.with_value(output.value))
                else:
                    yield self._where.with_value(output)
        self._pending = {}

    def _layout_from(self, records: list[EmbeddingRecord]) -> tuple[str, int] | None:
        """The index's (model, dim) once known. A new index takes them from an upsert (this batch's, or
        any other this bundle holds), never from a delete or a patch, which carry no vector: an index
        fixed at 0 dimensions would refuse every upsert after it. None: nothing says them yet."""
        if self._layout is None:
            pending = [r for batch in getattr(self, "_pending", {}).values() for r in batch]
            upsert = next((r for r in itertools.chain(records, pending) if r.op == "upsert" and r.embedding.size),
                          None)
            if upsert is not None:
                self._layout = self._settle_layout(upsert.model, int(upsert.embedding.size))
            elif (layout := ShardedIndex.layout(self._index_dir)) and layout["dim"] and \
                    layout["num_shards"] == self._num_shards:
                self._layout = layout["model"], layout["dim"]  # made meanwhile by another worker
        return self._layout

    def _commit(self, shard: int, records: list[EmbeddingRecord]):
        if self._layout_from(records) is None:  # never a 0-d index
            for dead in not_created(records, "index"):
                self._counters["refused"].inc()
                yield beam.pvalue.TaggedOutput(UpdateIndex.DEAD_LETTER, dead)
            return
        model, dim = self._layout
        writer, lock = self._writers.get(self._index_dir, shard, model, dim, self._settings, self._cache_dir)
        started = time.perf_counter()
        with lock:
            result = writer.apply(records)
            store = writer.store
            generation = store.generation
        took = (time.perf_counter() - started) * 1000
        self._commit_ms.update(int(took))
        self._batch_sizes.update(len(records))
        for name in ("upserted", "deleted", "ignored"):
            self._counters[name].inc(getattr(result, name))
        self._counters["refused"].inc(len(result.refused))
        if self._background_compaction:
            store.compact_in_background()
        else:
            store.compact()
        for record, reason in result.refused:
            yield beam.pvalue.TaggedOutput(UpdateIndex.DEAD_LETTER,
                                           DeadLetter.of_record(Stage.SINK, "IndexMismatch", reason, record))
        # One commit: what it did, and when it became searchable.
        yield dict(shard=shard, generation=generation, records=len(records), upserted=result.upserted,
                   deleted=result.deleted, ignored=result.ignored, refused=len(result.refused),
                   commit_ms=round(took, 2), committed_at=time.time())


class _CommitBatchFn(_CommitFn):
    """Commits the batches `GroupIntoBatches` made per shard: (shard, records) → one commit each."""

    def start_bundle(self):
        pass

    def process(self, batch):
        shard, records = batch
        yield from self._commit(shard, list(records))

    def finish_bundle(self):
        pass


class UpdateIndex(beam.PTransform):
    """`EmbeddingRecord`s → commits (dicts of what each did) and dead letters of refused records."""

    DEAD_LETTER = "dead_letter"

    def __init__(self, index_dir: str, model: str | None, dim: int, num_shards: int = 1, batch_size: int = 1000,
                 settings: StoreSettings = StoreSettings(), background_compaction: bool = True,
                 cache_dir: str | None = None, stateful: bool = False, max_delay_secs: float = 1.0,
                 finish_compactions: bool = False):
        """`index_dir` local or remote (gs://); for a remote one, `cache_dir` holds the local stores.
        `model` None: the index's model, or for a new index the first upsert's (and its dimension).
        `stateful`: batch per shard with `GroupIntoBatches` (see the module docstring).
        `finish_compactions`: a batch job merges what its policy plans before it ends (DoFn teardown)."""
        super().__init__()
        args = (index_dir, model, dim, num_shards, batch_size, settings, background_compaction, cache_dir,
                finish_compactions)
        self._fn = _CommitBatchFn(*args) if stateful else _CommitFn(*args)
        self._stateful = stateful
        self._num_shards = num_shards
        self._batch_size = batch_size
        self._max_delay_secs = max_delay_secs

    def expand(self, records):
        if self._stateful:
            records = (records
                       | "KeyByShard" >> beam.Map(lambda r, n: (shard_of(r.product_id, n), r), self._num_shards)
                       .with_output_types(typing.Tuple[int, typing.Any])  # an int key: a deterministic coder
                       | "BatchPerShard" >> beam.GroupIntoBatches(
                           self._batch_size, max_buffering_duration_secs=self._max_delay_secs))
        return records | "Commit" >> beam.ParDo(self._fn).with_outputs(self.DEAD_LETTER, main="commits")


def parse_record(raw: bytes | str) -> EmbeddingRecord:
    """A record from the embeddings topic or a JSON-lines file."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("an embedding record must be a JSON object")
    return EmbeddingRecord.from_dict(data)
