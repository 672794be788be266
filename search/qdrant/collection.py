"""A Qdrant collection as this product keeps one: its points, its layout, the client that reaches it.

`pipelines.index --sink qdrant` writes it (transforms.qdrant_sink) and `search.server --backend qdrant`
queries it (search.qdrant.index); both go through this module, so the point model has one
definition (docs/ARCHITECTURE.md §18). Each product is one point:

- its id is `point_id(product_id)`, a UUID5 of the product id (the same on every worker and every run);
  the payload carries `product_id`, `shop_id`, `version`, `deleted`, `title`, `description`,
  `image_url`, `attributes` (as sent), `model`, `event_id`, `embedded_at`, and what search reads:
  `fields` (the declared attributes typed as the FAISS store types them) and `keywords` (the text BM25
  ranks); the vector is the named vector `dense` (`VECTOR_NAME`);
- an upsert writes the whole point, a patch sets `attributes`, `fields`, `keywords` (and `version`,
  `event_id`) and keeps the vector, title and shop, a delete writes a tombstone: the same id with
  `deleted: true`, its version and no vector at all, so a later, older upsert still finds a newer
  version there and stays out. A tombstone has no vector, so no vector search can return it; queries
  filter `deleted != true` as well (`live_only`);
- every write is conditional, evaluated by the engine per point: a point is written only when the
  stored one is older (`stored_older_than`: the version split into two 32-bit halves, `version_hi` and
  `version_lo`, because Qdrant compares ranges as 64-bit floats, which cannot tell versions apart
  beyond 2^53), or when there is none. A patch's condition also asks for a live point. So the final
  state does not depend on arrival order or on how many workers write at once.

The collection is made from the index layout (`QdrantCollection.ensure`) and says so in its metadata
(`product`, `model`, `segment_kind`, `filterable`, `projection`), which the server reads back.

The local mode (`--qdrant_path DIR`: qdrant-client's embedded engine, a directory) runs the same client
API and applies the same conditional writes, but it is one process's: the directory is locked by the
client that opens it, so every user in a process shares one client (`Clients`), and calls into it are
serialised by a lock (the local engine is not thread-safe). It searches exactly and ignores payload
indexes, quantisation and HNSW settings (they are recorded in the collection's config, not used).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import re
import threading
import uuid
import warnings
from typing import Any, Iterator, NamedTuple, Sequence

from schemas import EmbeddingRecord, format_timestamp
from search.fields import Field, parse_filterable, typed
from search.hybrid import BM25_WEIGHTS, fold
from search.index.settings import StoreSettings

__all__ = ["API_KEY_ENV", "Clients", "LayoutMismatch", "PRODUCT", "QdrantCollection", "QdrantTarget",
           "QdrantUnavailable", "Stored", "VECTOR_NAME", "connected", "live_only", "patch_payload", "point_id",
           "point_payload", "status_of", "stored_older_than", "tombstone_payload", "transient"]

_log = logging.getLogger(__name__)

VECTOR_NAME = "dense"  # the named vector of every point but tombstones (Beam's QdrantWriteConfig default key)
API_KEY_ENV = "QDRANT_API_KEY"
PRODUCT = "product-embeddings"  # the collection metadata's `product`: a collection this product made
# Point ids derive from it: changing it would orphan every point of every existing collection.
POINT_NAMESPACE = uuid.UUID("40e95024-0b96-5e6e-bfd5-9414b50c183f")
SECRET_PATTERN = r"^projects/[^/\s]+/secrets/[A-Za-z0-9_-]{1,255}(/versions/(latest|[1-9][0-9]*))?$"
COLLECTION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$"
_HALF = 1 << 32



def url_problem(url: str) -> str | None:
    """Why `url` cannot name a Qdrant server (never echoing a credential in it), or None."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        return f"{url!r} is not http(s)://HOST[:PORT] (a bad port)"
    if parts.username or parts.password:
        return (f"must not carry credentials: put the API key in a secret (--qdrant_api_key_secret) or "
                f"{API_KEY_ENV}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not http(s)://HOST[:PORT]"
    return None


def describe_failure(error: BaseException, target: "QdrantTarget") -> str:
    """One line for an engine that could not be reached or refused a request: what a command prints
    instead of the client's multi-line error (the API key never in it)."""
    if target.path and "already accessed" in str(error):
        return (f"--qdrant_path {target.path} is open in another process (qdrant-client's local mode allows one): "
                f"stop it, or use a Qdrant server (--qdrant_url)")
    status = status_of(error)
    if status in (401, 403):
        source = f"secret {target.api_key_secret}" if target.api_key_secret else \
            f"${API_KEY_ENV}" if os.environ.get(API_KEY_ENV) else f"no key given (--qdrant_api_key_secret or ${API_KEY_ENV})"
        return f"{target.url} refused the API key ({status}; {source})"
    if status is not None:
        content = getattr(error, "content", b"")
        text = content.decode("utf-8", "replace") if isinstance(content, bytes) else str(content)
        try:
            import json

            text = json.loads(text)["status"]["error"]
        except (ValueError, KeyError, TypeError):
            pass
        return f"{target.url or target.path} answered {status}: {' '.join(str(text).split())[:300]}"
    if isinstance(error, QdrantUnavailable):
        return str(error)
    reason = " ".join(str(error).split())[:300]
    return f"cannot reach {target.where} within {target.timeout_s} s: {type(error).__name__}: {reason}"


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
    shards: int = 0  # a new collection's shards (0: the engine's default, one per node)
    replication: int = 0  # a new collection's copies of each shard (0: the engine's default, 1)

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


def _loopback(url: str) -> bool:
    import ipaddress
    import urllib.parse

    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open_client(target: QdrantTarget):
    from qdrant_client import QdrantClient

    if target.path:
        return QdrantClient(path=target.path)
    key = api_key(target)
    if key and target.url.startswith("http:") and not _loopback(target.url):
        _log.warning("%s: the API key goes over plain http (use https outside a private network)", target.url)
    # qdrant-client talks through httpx, which logs every request at INFO: a line per search.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with warnings.catch_warnings():  # said once above, in one line
        warnings.filterwarnings("ignore", message="Api key is used with an insecure connection")
        # As Beam's Qdrant writer opens it: no version handshake before the first request.
        return QdrantClient(url=target.url, api_key=key, timeout=target.timeout_s, check_compatibility=False)


class Clients:
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
atexit.register(Clients.close_all)


@contextlib.contextmanager
def connected(target: QdrantTarget) -> Iterator["QdrantCollection"]:
    """The target's collection through this process's shared client, for as long as the block runs."""
    client, lock = Clients.acquire(target)
    try:
        yield QdrantCollection(target, client, lock)
    finally:
        Clients.release(target)


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


def searchable(attributes: dict, title: str, description: str, filterable: Sequence[Field]) -> dict[str, Any]:
    """What search reads besides the product: `fields`, the declared attributes typed as the FAISS store
    types them (search.fields.typed: NFC keywords, whole numbers for int fields; a value of another type
    is left out, neither filtered nor counted), and `keywords`, the text BM25 ranks. `keywords` holds
    the title three times, the description once and the declared keyword attributes twice: BM25F's
    field weights (search.hybrid.BM25_WEIGHTS) as one field, since a Qdrant text index scores one;
    diacritics folded away (search.hybrid.fold), as the FAISS store's FTS5 index folds them."""
    fields = {field.name: value for field in filterable if (value := typed(field, attributes.get(field.name))) is not None}
    words = [attributes[f.name] for f in filterable if f.type == "keyword" and isinstance(attributes.get(f.name), str)]
    title_weight, description_weight, attribute_weight = (int(w) for w in BM25_WEIGHTS)
    text = [*[title] * title_weight, *[description] * description_weight, *words * attribute_weight]
    return {"fields": fields, "keywords": fold(" ".join(t for t in text if t))}


def point_payload(record: EmbeddingRecord, filterable: Sequence[Field] = ()) -> dict[str, Any]:
    """A live product's payload (one definition: the sink writes it, search reads it)."""
    return {"product_id": record.product_id, "shop_id": record.shop_id, **_version_fields(record.version),
            "deleted": False, "event_id": record.event_id, "model": record.model, "title": record.title,
            "description": record.description, "image_url": record.image_url,
            "attributes": dict(record.attributes), "embedded_at": format_timestamp(record.embedded_at),
            **searchable(record.attributes, record.title, record.description, filterable)}


def tombstone_payload(record: EmbeddingRecord) -> dict[str, Any]:
    return {"product_id": record.product_id, "shop_id": record.shop_id, **_version_fields(record.version),
            "deleted": True, "event_id": record.event_id, "model": record.model,
            "embedded_at": format_timestamp(record.embedded_at)}


def patch_payload(record: EmbeddingRecord, stored: "Stored", filterable: Sequence[Field] = ()) -> dict[str, Any]:
    """What a patch sets: the attributes, what search reads of them and the version; the vector, title and
    shop stay (as in the FAISS store)."""
    return {**_version_fields(record.version), "event_id": record.event_id, "attributes": dict(record.attributes),
            **searchable(record.attributes, stored.title, stored.description, filterable)}


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
    the tombstone flag, the keywords' text index with BM25 scoring (the word tokenizer, lowercased: the
    one tokenization the local mode can score too), and each filterable field with its type."""
    from qdrant_client import models

    by_type = {"keyword": models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD),
               "float": models.FloatIndexParams(type=models.FloatIndexType.FLOAT),
               "int": models.IntegerIndexParams(type=models.IntegerIndexType.INTEGER),
               "bool": models.BoolIndexParams(type=models.BoolIndexType.BOOL)}
    return [("shop_id", models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)),
            ("deleted", models.BoolIndexParams(type=models.BoolIndexType.BOOL)),
            ("keywords", models.TextIndexParams(type=models.TextIndexType.TEXT, tokenizer=models.TokenizerType.WORD,
                                                lowercase=True, scoring=True)),
            *((f"fields.{field.name}", by_type[field.type]) for field in filterable)]



def status_of(error: BaseException) -> int | None:
    """The HTTP status of an engine's error, if it has one."""
    return getattr(error, "status_code", None)


_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


def transient(error: BaseException) -> bool:
    """The engine unreachable, slow, overloaded or failing for now: the sink retries it, the server
    answers 503."""
    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(error, (ResponseHandlingException, ResourceExhaustedResponse, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, UnexpectedResponse):
        return error.status_code in _TRANSIENT_STATUS
    code = getattr(error, "code", None)  # a gRPC error
    return callable(code) and getattr(code(), "name", "") in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


def _written_with(layout: dict) -> tuple[str, int, tuple[Field, ...]]:
    """What a layout says a write needs: (model, dim, the declared fields)."""
    return layout["model"], layout["dim"], parse_filterable(layout["filterable"])


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

    def current(self) -> tuple[str, int, tuple[Field, ...]] | None:
        """The collection's (model, dim, filterable fields), as `ensure` answers them, or None when there is
        no such collection yet."""
        layout = self.layout()
        return None if layout is None else _written_with(layout)

    def ensure(self, model: str, dim: int, settings: StoreSettings, projection: str = ""
               ) -> tuple[str, int, tuple[Field, ...]]:
        """The collection's (model, dim, filterable fields): made from the layout when missing (another worker may make it at
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
                                                  metadata=metadata, shard_number=self.target.shards or None,
                                                  replication_factor=self.target.replication or None)
                    _log.info("made %s (%s, %d-d, %s)", self.target.where, model, dim, settings.segment.kind)
                except Exception as e:  # made meanwhile by another worker: a 409 from a server
                    if status_of(e) != 409 and "already exists" not in str(e):
                        raise
                layout = self.layout()
            fields = _written_with(layout)[2]
            missing = [(field, schema) for field, schema in _payload_indexes(fields) if field not in layout["indexed"]]
            with warnings.catch_warnings():  # the local mode's "payload indexes have no effect" (said in the docs)
                warnings.filterwarnings("ignore", message="Payload indexes have no effect", category=UserWarning)
                for field, schema in missing:
                    self.client.create_payload_index(self.target.collection, field, field_schema=schema, wait=True)
        return _written_with(layout)

    def stored(self, records: Sequence[EmbeddingRecord]) -> dict[str, Stored]:
        """product_id → what is stored of the products of `records` that have a point."""
        ids = list(dict.fromkeys(point_id(r.product_id) for r in records))
        with self.locked():
            points = self.client.retrieve(self.target.collection, ids, with_vectors=False,
                                          with_payload=["product_id", "version", "deleted", "title", "description"])
        return {p.payload["product_id"]: Stored(int(p.payload["version"]), bool(p.payload.get("deleted")),
                                                p.payload.get("title", ""), p.payload.get("description", ""))
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


class Stored(NamedTuple):
    """A product's point as a batch finds it: its version, whether it is a tombstone, and the texts a
    patch keeps (its keywords are made anew from them and the new attributes)."""

    version: int
    deleted: bool
    title: str = ""
    description: str = ""


