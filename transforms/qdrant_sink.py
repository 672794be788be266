"""`WriteToQdrant`: embedding records → points of a Qdrant collection, last writer wins in the engine
(docs/ARCHITECTURE.md §18).

The other sink of `pipelines.index` (`--sink qdrant`); the FAISS index (`UpdateIndex`) stays the default.
Each product is one point:

- its id is `point_id(product_id)`, a UUID5 of the product id (the same on every worker and every run);
  the payload carries `product_id`, `shop_id`, `version`, `deleted`, `title`, `description`,
  `image_url`, `attributes` (as sent), `model`, `event_id`, `embedded_at`; the vector is the named
  vector `dense` (`VECTOR_NAME`);
- an upsert writes the whole point, a patch sets `attributes` (and `version`, `event_id`) on the point's
  payload and keeps its vector, title and shop, a delete writes a tombstone: the same id with
  `deleted: true`, its version and no vector at all, so a later, older upsert still finds a newer
  version there and stays out. A tombstone has no vector, so no vector search can return it; queries
  filter `deleted != true` as well (`live_only`);
- every write is conditional, evaluated by the engine per point: a point is written only when the
  stored one is older (`stored_older_than`: the version split into two 32-bit halves, `version_hi` and
  `version_lo`, because Qdrant compares ranges as 64-bit floats, which cannot tell versions apart
  beyond 2^53), or when there is none. A patch's condition also asks for a live point. So the final
  state does not depend on arrival order or on how many workers write at once.

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

The local mode (`--qdrant_path DIR`: qdrant-client's embedded engine, a directory) runs the same client
API and applies the same conditional writes, but it is one process's: the directory is locked by the
client that opens it, so every DoFn of a process shares one client (`_Clients`), and calls into it are
serialised by a lock (the local engine is not thread-safe). It searches exactly and ignores payload
indexes, quantisation and HNSW settings (they are recorded in the collection's config, not used).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import random
import re
import threading
import time
import uuid
import warnings
from typing import Any, Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from schemas import DeadLetter, EmbeddingRecord, Stage, format_timestamp
from transforms.dead_letter import not_created
from search.fields import Field, parse_filterable
from search.index.writer import refusal
from search.store import StoreSettings

__all__ = ["API_KEY_ENV", "PRODUCT", "QdrantCollection", "QdrantTarget", "QdrantUnavailable",
           "VECTOR_NAME", "WriteToQdrant", "connected", "live_only", "point_id", "stored_older_than"]

_log = logging.getLogger(__name__)

VECTOR_NAME = "dense"  # the named vector of every point but tombstones (Beam's QdrantWriteConfig default key)
API_KEY_ENV = "QDRANT_API_KEY"
PRODUCT = "product-embeddings"  # the collection metadata's `product`: a collection this product made
# Point ids derive from it: changing it would orphan every point of every existing collection.
POINT_NAMESPACE = uuid.UUID("40e95024-0b96-5e6e-bfd5-9414b50c183f")
SECRET_PATTERN = r"^projects/[^/\s]+/secrets/[A-Za-z0-9_-]{1,255}(/versions/(latest|[1-9][0-9]*))?$"
COLLECTION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$"
_HALF = 1 << 32
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_REFUSED_STATUS = (400, 422)


def point_id(product_id: str) -> str:
    """The point of a product: a UUID5 of its id, the same on every worker and in every run."""
    return str(uuid.uuid5(POINT_NAMESPACE, product_id))


class QdrantUnavailable(RuntimeError):
    """The engine did not answer within the retries; the bundle fails and Beam retries it."""


class LayoutMismatch(ValueError):
    """A collection that is not one this product made, or made for other vectors."""


@dataclasses.dataclass(frozen=True)
class QdrantTarget:
    """Where the points go: a `collection` on a server (`url`, the API key from the Secret Manager secret
    `api_key_secret` or the environment variable QDRANT_API_KEY, read where the client is opened, never
    held here) or in a local directory (`path`, qdrant-client's local mode)."""

    collection: str
    url: str = ""
    path: str = ""
    api_key_secret: str = ""
    timeout_s: int = 10
    retries: int = 5

    def __post_init__(self):
        if bool(self.url) == bool(self.path):
            raise ValueError("a Qdrant target is a url or a path, exactly one")
        if not re.match(COLLECTION_PATTERN, self.collection):
            raise ValueError(f"collection name {self.collection!r}: letters, digits, _ . - (at most 255)")

    @property
    def where(self) -> str:
        return f"Qdrant collection {self.collection} at {self.url or self.path}"


def api_key(target: QdrantTarget) -> str | None:
    """The API key: the secret's value (its latest version unless it names one), else QDRANT_API_KEY, else
    none. Never logged; errors name the secret, not the value."""
    if target.path:
        return None
    if target.api_key_secret:
        from google.cloud import secretmanager

        name = target.api_key_secret if "/versions/" in target.api_key_secret else \
            f"{target.api_key_secret}/versions/latest"
        try:
            response = secretmanager.SecretManagerServiceClient().access_secret_version(
                name=name, timeout=target.timeout_s)
        except Exception as e:
            raise QdrantUnavailable(f"cannot read the Qdrant API key from secret {name}: "
                                    f"{type(e).__name__}: {getattr(e, 'message', e)}") from e
        return response.payload.data.decode("utf-8").strip()
    return os.environ.get(API_KEY_ENV) or None


def _open_client(target: QdrantTarget):
    from qdrant_client import QdrantClient

    if target.path:
        return QdrantClient(path=target.path)
    key = api_key(target)
    if key and target.url.startswith("http:"):
        _log.warning("%s: the API key goes over plain http (use https outside a private network)", target.url)
    with warnings.catch_warnings():  # said once above, in one line
        warnings.filterwarnings("ignore", message="Api key is used with an insecure connection")
        # As Beam's Qdrant writer opens it: no version handshake before the first request.
        return QdrantClient(url=target.url, api_key=key, timeout=target.timeout_s, check_compatibility=False)


class _Clients:
    """One client per target and process, shared by every DoFn of the process (and by a test or the
    summary in the same process): a local directory can be opened by one client only. The lock
    serialises calls into a local client; a server's client takes none."""

    _lock = threading.Lock()
    _open: dict[tuple, list] = {}  # key → [client, lock or None, users]

    @staticmethod
    def _key(target: QdrantTarget) -> tuple:
        return (os.path.abspath(target.path),) if target.path else (target.url, target.api_key_secret)

    @classmethod
    def acquire(cls, target: QdrantTarget):
        with cls._lock:
            key = cls._key(target)
            if key not in cls._open:
                cls._open[key] = [_open_client(target), threading.RLock() if target.path else None, 0]
            entry = cls._open[key]
            entry[2] += 1
            return entry[0], entry[1]

    @classmethod
    def release(cls, target: QdrantTarget) -> None:
        with cls._lock:
            key = cls._key(target)
            entry = cls._open.get(key)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] <= 0:
                del cls._open[key]
                entry[0].close()

    @classmethod
    def close_all(cls) -> None:
        with cls._lock:
            entries, cls._open = list(cls._open.values()), {}
        for client, _, _ in entries:
            with contextlib.suppress(Exception):
                client.close()


# A local client left open at exit is closed by its __del__ while the interpreter shuts down, which fails noisily.
atexit.register(_Clients.close_all)


@contextlib.contextmanager
def connected(target: QdrantTarget) -> Iterator["QdrantCollection"]:
    """The target's collection through this process's shared client, for as long as the block runs."""
    client, lock = _Clients.acquire(target)
    try:
        yield QdrantCollection(target, client, lock)
    finally:
        _Clients.release(target)


def live_only():
    """The filter of every search and count: no tombstone (they have no vector either)."""
    from qdrant_client import models

    return models.Filter(must_not=[models.FieldCondition(key="deleted", match=models.MatchValue(value=True))])


def stored_older_than(version: int):
    """The filter a point matches when its stored version is lower than `version`: exact for every
    version (0..2^63-1), compared as two 32-bit halves, each exact as the 64-bit float Qdrant compares
    ranges in."""
    from qdrant_client import models

    high, low = divmod(version, _HALF)
    return models.Filter(should=[
        models.FieldCondition(key="version_hi", range=models.Range(lt=high)),
        models.Filter(must=[models.FieldCondition(key="version_hi", match=models.MatchValue(value=high)),
                            models.FieldCondition(key="version_lo", range=models.Range(lt=low))]),
    ])


def _version_fields(version: int) -> dict:
    high, low = divmod(version, _HALF)
    return {"version": version, "version_hi": high, "version_lo": low}


def point_payload(record: EmbeddingRecord) -> dict[str, Any]:
    """A live product's payload (one definition: the sink writes it, search reads it)."""
    return {"product_id": record.product_id, "shop_id": record.shop_id, **_version_fields(record.version),
            "deleted": False, "event_id": record.event_id, "model": record.model, "title": record.title,
            "description": record.description, "image_url": record.image_url,
            "attributes": dict(record.attributes), "embedded_at": format_timestamp(record.embedded_at)}


def tombstone_payload(record: EmbeddingRecord) -> dict[str, Any]:
    return {"product_id": record.product_id, "shop_id": record.shop_id, **_version_fields(record.version),
            "deleted": True, "event_id": record.event_id, "model": record.model,
            "embedded_at": format_timestamp(record.embedded_at)}


def patch_payload(record: EmbeddingRecord) -> dict[str, Any]:
    """What a patch sets: the attributes and the version; the vector, title and shop stay (as in the FAISS store)."""
    return {**_version_fields(record.version), "event_id": record.event_id, "attributes": dict(record.attributes)}


def _vector_params(dim: int, settings: StoreSettings):
    """The named vector's parameters from the index layout: cosine, HNSW m and ef_construct, int8 scalar
    quantisation for hnsw_sq8, product quantisation (x16, ~0.06x the memory) for ivf_pq (Qdrant has no
    IVF: it is an HNSW graph over PQ codes, re-scored with the float vectors)."""
    from qdrant_client import models

    segment = settings.segment
    quantization = None
    if segment.kind == "hnsw_sq8":
        quantization = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99))
    elif segment.kind == "ivf_pq":
        quantization = models.ProductQuantization(product=models.ProductQuantizationConfig(
            compression=models.CompressionRatio.X16))
    return models.VectorParams(size=dim, distance=models.Distance.COSINE, quantization_config=quantization,
                               hnsw_config=models.HnswConfigDiff(m=segment.m, ef_construct=segment.ef_construction))


def _payload_indexes(filterable: Sequence[Field]) -> list[tuple[str, Any]]:
    """Shops as tenants (Qdrant co-locates a tenant's points and plans shop-scoped searches per tenant),
    the tombstone flag, a full-text index on the title, and each filterable attribute with its type."""
    from qdrant_client import models

    by_type = {"keyword": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
               "float": models.FloatIndexParams(type=models.FloatIndexType.FLOAT),
               "int": models.IntegerIndexParams(type=models.IntegerIndexType.INTEGER),
               "bool": models.BoolIndexParams(type=models.BoolIndexType.BOOL)}
    return [("shop_id", models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)),
            ("deleted", models.BoolIndexParams(type=models.BoolIndexType.BOOL)),
            ("title", models.TextIndexParams(type=models.TextIndexType.TEXT, tokenizer=models.TokenizerType.WORD,
                                             lowercase=True)),
            *((f"attributes.{field.name}", by_type[field.type]) for field in filterable)]


def _status(error: BaseException) -> int | None:
    return getattr(error, "status_code", None)


def _transient(error: BaseException) -> bool:
    """Worth retrying: the engine unreachable, slow, overloaded or failing for now."""
    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(error, (ResponseHandlingException, ResourceExhaustedResponse, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, UnexpectedResponse):
        return error.status_code in _TRANSIENT_STATUS
    code = getattr(error, "code", None)  # a gRPC error
    return callable(code) and getattr(code(), "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


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


class QdrantCollection:
    """A collection through a shared client (`connected`): its layout, made when missing, and reads."""

    def __init__(self, target: QdrantTarget, client, lock: threading.RLock | None):
        self.target = target
        self.client = client
        self._lock = lock

    @contextlib.contextmanager
    def locked(self):
        if self._lock is None:
            yield
        else:
            with self._lock:
                yield

    def layout(self) -> dict | None:
        """`model`, `dim`, `segment_kind`, `filterable` (as index.json has them), `indexed` (the payload
        fields the engine has indexes for), or None when there is no such collection. LayoutMismatch for a
        collection another tool made."""
        name = self.target.collection
        with self.locked():
            if not self.client.collection_exists(name):
                return None
            info = self.client.get_collection(name)
        vectors = info.config.params.vectors
        metadata = info.config.metadata or {}
        if not isinstance(vectors, dict) or VECTOR_NAME not in vectors or metadata.get("product") != PRODUCT:
            raise LayoutMismatch(f"{self.target.where} was not made by pipelines.index (no {VECTOR_NAME!r} vector "
                                 f"and layout metadata): write to a new collection")
        if vectors[VECTOR_NAME].distance.value.lower() != "cosine":
            raise LayoutMismatch(f"{self.target.where} scores by {vectors[VECTOR_NAME].distance.value}, not cosine")
        return {"model": metadata.get("model"), "dim": vectors[VECTOR_NAME].size,
                "segment_kind": metadata.get("segment_kind", "hnsw"), "filterable": metadata.get("filterable", []),
                "projection": metadata.get("projection", ""), "indexed": set(info.payload_schema or {})}

    def ensure(self, model: str, dim: int, settings: StoreSettings, projection: str = "") -> tuple[str, int]:
        """The collection's (model, dim): made from the layout when missing (another worker may make it at
        the same moment: then theirs), with every payload index it lacks."""
        with self.locked():
            layout = self.layout()
            if layout is None:
                metadata = {"product": PRODUCT, "model": model, "projection": projection,
                            "segment_kind": settings.segment.kind,
                            "filterable": [str(field) for field in settings.filterable]}
                try:
                    self.client.create_collection(self.target.collection,
                                                  vectors_config={VECTOR_NAME: _vector_params(dim, settings)},
                                                  metadata=metadata)
                    _log.info("made %s (%s, %d-d, %s)", self.target.where, model, dim, settings.segment.kind)
                except Exception as e:  # made meanwhile by another worker: a 409 from a server
                    if _status(e) != 409 and "already exists" not in str(e):
                        raise
                layout = self.layout()
            missing = [(field, schema) for field, schema in _payload_indexes(parse_filterable(layout["filterable"]))
                       if field not in layout["indexed"]]
            with warnings.catch_warnings():  # the local mode's "payload indexes have no effect" (said in the docs)
                warnings.filterwarnings("ignore", message="Payload indexes have no effect", category=UserWarning)
                for field, schema in missing:
                    self.client.create_payload_index(self.target.collection, field, field_schema=schema, wait=True)
        return layout["model"], layout["dim"]

    def stored(self, records: Sequence[EmbeddingRecord]) -> dict[str, tuple[int, bool]]:
        """product_id → (stored version, deleted) of the products of `records` that have a point."""
        ids = list(dict.fromkeys(point_id(r.product_id) for r in records))
        with self.locked():
            points = self.client.retrieve(self.target.collection, ids, with_payload=["product_id", "version", "deleted"],
                                          with_vectors=False)
        return {p.payload["product_id"]: (int(p.payload["version"]), bool(p.payload.get("deleted")))
                for p in points if p.payload and "version" in p.payload}

    def points(self, live: bool = True, with_vectors: bool = False) -> list:
        """Every point (live ones only, by default), through scroll pages."""
        out, offset = [], None
        scroll_filter = live_only() if live else None
        while True:
            with self.locked():
                page, offset = self.client.scroll(self.target.collection, scroll_filter=scroll_filter, limit=1000,
                                                  offset=offset, with_payload=True,
                                                  with_vectors=[VECTOR_NAME] if with_vectors else False)
            out += page
            if offset is None:
                return out

    def live_products(self) -> dict[str, tuple[int, str]]:
        """product_id → (version, shop_id) of every live product, as `IndexStore.live_products` gives them."""
        return {p.payload["product_id"]: (p.payload["version"], p.payload["shop_id"]) for p in self.points()}

    def count_live(self) -> int:
        with self.locked():
            return self.client.count(self.target.collection, count_filter=live_only(), exact=True).count


@dataclasses.dataclass
class _Plan:
    """What a batch will do: each record's outcome and reason, and the engine operations, each with the
    records it writes."""

    outcomes: list[list]  # [record, outcome, reason]; outcome: upserted, deleted, ignored, refused
    operations: list[tuple[list[int], Any]]  # (indexes into outcomes, operation)


def plan(records: Sequence[EmbeddingRecord], stored: dict[str, tuple[int, bool]], model: str, dim: int) -> _Plan:
    """The batch against the stored versions, in arrival order, as the FAISS store applies a batch
    (search.index.writer): an older or repeated version is ignored; a patch needs a live product. The
    operations go in version order: the records of one product that survive are in rising version
    order already, so this keeps each product's order and groups the writes of one version (a backfill's
    version 1) into one conditional upsert."""
    outcomes: list[list] = []
    state = dict(stored)
    writes: list[tuple[int, int, str]] = []  # (version, outcome index, kind)
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
        state[record.product_id] = (record.version, record.op == "delete")
        outcomes.append([record, "deleted" if record.op == "delete" else "upserted", ""])
        writes.append((record.version, len(outcomes) - 1, "patch" if record.op == "patch" else "point"))
    operations: list[tuple[list[int], Any]] = []
    group: list[int] = []
    writes.sort(key=lambda write: write[0])
    for n, (version, index, kind) in enumerate(writes):
        if kind == "patch":
            operations.append(([index], _operation([outcomes[index][0]])))
            continue
        group.append(index)
        following = writes[n + 1] if n + 1 < len(writes) else None
        if following is None or following[0] != version or following[2] != "point":
            operations.append((group, _operation([outcomes[i][0] for i in group])))
            group = []
    return _Plan(outcomes, operations)


def _operation(records: Sequence[EmbeddingRecord]):
    """The conditional write of `records`, all of one version: a patch (one record) sets its payload on a
    live point; upserts and deletes (tombstones, no vector) are one conditional upsert."""
    from qdrant_client import models

    version = records[0].version
    if records[0].op == "patch":
        (record,) = records
        return models.SetPayloadOperation(set_payload=models.SetPayload(
            payload=patch_payload(record),
            filter=models.Filter(must=[models.HasIdCondition(has_id=[point_id(record.product_id)]),
                                       stored_older_than(version)],
                                 must_not=live_only().must_not)))
    points = [models.PointStruct(id=point_id(r.product_id), vector={}, payload=tombstone_payload(r))
              if r.op == "delete" else
              models.PointStruct(id=point_id(r.product_id), vector={VECTOR_NAME: r.embedding.tolist()},
                                 payload=point_payload(r))
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
        client, lock = _Clients.acquire(self._target)
        self._collection = QdrantCollection(self._target, client, lock)
        self._layout: tuple[str, int] | None = None
        if self._model is not None and self._dim:
            self._layout = self._call(lambda: self._collection.ensure(self._model, self._dim, self._settings,
                                                                      self._projection), "make the collection")
            if self._layout[0] != self._model:
                raise LayoutMismatch(f"{self._target.where} holds {self._layout[0]} vectors, not {self._model}")
        else:
            layout = self._call(self._collection.layout, "read the collection")
            if layout is not None:
                self._layout = layout["model"], layout["dim"]

    def teardown(self):
        if getattr(self, "_collection", None) is not None:
            self._collection = None
            _Clients.release(self._target)

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
                if not _transient(e):
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

    def _layout_from(self, records: list[EmbeddingRecord]) -> tuple[str, int] | None:
        """As UpdateIndex's: a new collection takes (model, dim) from an upsert (this batch's, or any the
        bundle holds), never from a delete or a patch."""
        if self._layout is None:
            upsert = next((r for r in [*records, *getattr(self, "_pending", [])]
                           if r.op == "upsert" and r.embedding.size), None)
            if upsert is not None:
                self._layout = self._call(lambda: self._collection.ensure(
                    upsert.model, int(upsert.embedding.size), self._settings, self._projection), "make the collection")
            else:
                layout = self._call(self._collection.layout, "read the collection")
                self._layout = (layout["model"], layout["dim"]) if layout else None
        return self._layout

    def _write(self, records: list[EmbeddingRecord]):
        if self._layout_from(records) is None:
            for dead in not_created(records, "collection"):
                self._counters["refused"].inc()
                yield beam.pvalue.TaggedOutput(WriteToQdrant.DEAD_LETTER, dead)
            return
        model, dim = self._layout
        started = time.perf_counter()
        with self._collection.locked():  # the local mode: read and write as one step, so the counts are exact
            stored = self._call(lambda: self._collection.stored(records), "read the stored versions")
            batch = plan(records, stored, model, dim)
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
                single = _operation([batch.outcomes[index][0]])
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
