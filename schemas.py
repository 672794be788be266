"""The product's three contracts: the event in, the embedding record out, the dead letter.

One definition each (docs/ARCHITECTURE.md §3–5), imported by the parser, the model path, the sinks and
the index, so that a field is added or renamed in exactly one place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import typing
from typing import Any, Mapping

import numpy as np
import orjson

__all__ = [
    "bigquery_schema",
    "DeadLetter",
    "EmbeddingRecord",
    "ProductEvent",
    "ProductState",
    "Stage",
    "MAX_IMAGE_URLS",
    "MAX_MODEL_TEXT_CHARS",
    "MAX_PAYLOAD_CHARS",
    "OPS",
    "format_timestamp",
    "non_finite_number",
    "unrepresentable",
    "valid_unicode",
    "vector",
]

# An upsert (re)embeds a product; a delete removes it; a patch changes only its attributes: the
# index keeps its vectors, so nothing is downloaded or embedded again (docs/ARCHITECTURE.md §3).
OPS = ("upsert", "delete", "patch")
MAX_IMAGE_URLS = 8
MAX_ID_CHARS = 256
# Dead letters keep the original message, truncated so that one poison message can't
# blow up a BigQuery row or a Pub/Sub message.
MAX_PAYLOAD_CHARS = 64 * 1024
# The most of a product's text (title and description) the model reads: well past what its
# tokenizer keeps (MiniLM's 256 word pieces, CLIP's 77 tokens), so a 1 MB description costs
# nothing and still embeds; the record's `text_chars` says how much was read.
MAX_MODEL_TEXT_CHARS = 10_000


class Stage:
    """Where a message failed; the `stage` field of a dead letter."""

    PARSE = "parse"
    VALIDATE = "validate"
    DOWNLOAD = "download"
    DECODE = "decode"
    INFERENCE = "inference"
    SINK = "sink"

    ALL = (PARSE, VALIDATE, DOWNLOAD, DECODE, INFERENCE, SINK)


def valid_unicode(text: str) -> bool:
    """JSON accepts lone surrogates (`"\ud800"`); no UTF-8 writer, and no engine, does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unrepresentable(item: Any) -> bool:
    """A number no store or reader downstream can hold: a float that is not finite, an integer beyond 64 bits."""
    if isinstance(item, float):
        return not np.isfinite(item)
    return isinstance(item, int) and not isinstance(item, bool) and not -2**63 <= item < 2**64


def non_finite_number(value: Any, where: str = "attributes") -> str | None:
    """The path of the first number in `value` that no store or reader downstream can hold
    (`attributes.price`), or None: a float that is not finite, or an integer beyond 64 bits.

    JSON readers take `1e400` as inf and many take `NaN`; SQLite's JSON functions take neither, so one
    such value stored with a product would break every query of its shard on a filterable field; a
    400-digit integer overflows every float conversion."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if unrepresentable(item):
            return path
        if isinstance(item, Mapping):
            stack.extend((v, f"{path}.{k}") for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{path}[{n}]") for n, v in enumerate(item))
    return None


def _require_finite(attributes: Mapping[str, Any]) -> None:
    path = non_finite_number(attributes)
    if path is not None:
        raise ValueError(f"{path} is not a finite number (NaN, or outside the float or 64-bit integer range)")


def format_timestamp(value: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds, the form BigQuery and JSON consumers both read."""
    return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class ProductEvent:
    """A validated product change (docs/ARCHITECTURE.md §3). Built only by `transforms.events.parse_event`."""

    event_id: str
    product_id: str
    op: str
    version: int
    shop_id: str = ""
    title: str = ""
    description: str = ""
    image_urls: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    event_time: dt.datetime | None = None

    @property
    def is_delete(self) -> bool:
        return self.op == "delete"

    @property
    def needs_vectors(self) -> bool:
        """Only an upsert is embedded: a delete and an attribute patch carry no new content."""
        return self.op == "upsert"

    @property
    def text(self) -> str:
        """What the text tower reads: title and description, as a shopper would see them, up to
        MAX_MODEL_TEXT_CHARS characters."""
        return "\n".join(part for part in (self.title, self.description) if part)[:MAX_MODEL_TEXT_CHARS]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_urls"] = list(self.image_urls)
        out["attributes"] = dict(self.attributes)
        out["event_time"] = format_timestamp(self.event_time) if self.event_time else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)


_VECTORS = ("embedding", "image_embedding", "text_embedding")


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingRecord:
    """One product's vectors and what downstream needs to show it (docs/ARCHITECTURE.md §4).

    The vectors are float32 arrays, as the model made them: a record crosses stage boundaries
    pickled and leaves as JSON, and thousands of Python floats cost ten times as much either way.
    """

    product_id: str
    shop_id: str
    op: str
    version: int
    event_id: str
    embedding: np.ndarray
    image_embedding: np.ndarray
    text_embedding: np.ndarray
    image_count: int
    title: str
    image_url: str
    model: str
    event_time: dt.datetime
    embedded_at: dt.datetime
    # Characters of title and description the model read (at most MAX_MODEL_TEXT_CHARS).
    text_chars: int = 0
    # What a storefront filters, facets and matches keywords on (docs/ARCHITECTURE.md §4): the event's description
    # (up to MAX_MODEL_TEXT_CHARS) and attributes as sent (brand, category, price, ...).
    description: str = ""
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _VECTORS:
            value = getattr(self, name)
            if not (isinstance(value, np.ndarray) and value.dtype == np.float32 and value.ndim == 1):
                object.__setattr__(self, name, vector(value))
        _require_finite(self.attributes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EmbeddingRecord):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name)) if f.name in _VECTORS
            else getattr(self, f.name) == getattr(other, f.name)
            for f in dataclasses.fields(self)
        )

    __hash__ = None  # arrays are mutable

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, as BigQuery rows want them: the numbers `to_json` writes (NaN as None)."""
        return orjson.loads(self._encode())

    def to_json(self) -> str:
        """JSON via orjson, float32 values in their shortest exact form; non-finite vectors are refused."""
        for name in _VECTORS:
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"{name} holds a non-finite value")
        return self._encode().decode("utf-8")

    def _encode(self) -> bytes:
        # Shallow on purpose: dataclasses.asdict deep-copies.
        out = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        out["attributes"] = dict(self.attributes)
        out["event_time"] = format_timestamp(self.event_time)
        out["embedded_at"] = format_timestamp(self.embedded_at)
        return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EmbeddingRecord":
        values = dict(data)
        for name in _VECTORS:
            values[name] = values.get(name) or ()  # __post_init__ makes them float32 arrays
        for name in ("event_time", "embedded_at"):
            values[name] = dt.datetime.fromisoformat(str(values[name]).replace("Z", "+00:00"))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class ProductState:
    """What a merchant last said of a product (docs/ARCHITECTURE.md §6): the source a new model re-embeds from.

    One row per accepted event, model-independent: an upsert's whole content, a patch's attributes,
    a delete's tombstone. `transforms.product_state.latest_state` folds a product's rows into its
    current state (the BigQuery view does the same in SQL); records keep neither every image URL
    nor the whole description, so they cannot be the source.
    """

    product_id: str
    shop_id: str
    op: str
    version: int
    event_id: str
    title: str
    description: str
    image_urls: tuple[str, ...]
    attributes: Mapping[str, Any]
    event_time: dt.datetime | None
    recorded_at: dt.datetime

    @classmethod
    def of_event(cls, event: ProductEvent) -> "ProductState":
        return cls(product_id=event.product_id, shop_id=event.shop_id, op=event.op, version=event.version,
                   event_id=event.event_id, title=event.title, description=event.description,
                   image_urls=tuple(event.image_urls), attributes=dict(event.attributes),
                   event_time=event.event_time, recorded_at=utc_now())

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_urls"] = list(self.image_urls)
        out["attributes"] = dict(self.attributes)
        out["event_time"] = format_timestamp(self.event_time) if self.event_time else None
        out["recorded_at"] = format_timestamp(self.recorded_at)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    def event_json(self) -> str:
        """The state as an event message (`transforms.events.parse_event` checks it again)."""
        out = self.to_dict()
        del out["recorded_at"]
        return json.dumps(out, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProductState":
        """A row as JSON lines or BigQuery give it back (a JSON column may come as text, timestamps as text
        or datetimes)."""
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls)}
        attributes = values["attributes"]
        values["attributes"] = json.loads(attributes) if isinstance(attributes, str) else dict(attributes or {})
        if not isinstance(values["attributes"], dict):
            raise ValueError(f"attributes must be an object, got {type(values['attributes']).__name__}")
        _require_finite(values["attributes"])
        if not isinstance(values["image_urls"] or [], (list, tuple)):
            raise ValueError(f"image_urls must be a list, got {type(values['image_urls']).__name__}")
        values["image_urls"] = tuple(values["image_urls"] or ())
        if type(values["version"]) is not int:  # noqa: E721 (a bool or a float is no version)
            raise ValueError(f"version must be an integer, got {values['version']!r}")
        for name in ("title", "description", "shop_id"):
            values[name] = values[name] or ""
        for name in ("event_time", "recorded_at"):
            value = values[name]
            if isinstance(value, str):
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if isinstance(value, dt.datetime) and value.tzinfo is None:
                value = value.replace(tzinfo=dt.timezone.utc)  # BigQuery TIMESTAMPs are UTC
            values[name] = value
        if not isinstance(values["recorded_at"], dt.datetime):
            raise ValueError("recorded_at is missing")
        if values["event_time"] is not None and not isinstance(values["event_time"], dt.datetime):
            raise ValueError(f"event_time must be a timestamp, got {values['event_time']!r}")
        return cls(**values)


def vector(values) -> np.ndarray:
    """A record's vector: a contiguous 1-d float32 array of its own (no view into a batch)."""
    return np.array(values, dtype=np.float32).reshape(-1)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message, or one image of it, that could not be embedded, and why (docs/ARCHITECTURE.md §5).

    `image_url` is empty when the whole event failed; it names the image when one image of
    a product failed and the product was still embedded from the rest.
    """

    stage: str
    error_type: str
    error: str
    payload: str
    event_id: str = ""
    product_id: str = ""
    image_url: str = ""
    failed_at: dt.datetime = dataclasses.field(default_factory=utc_now)

    def __post_init__(self) -> None:
        if self.stage not in Stage.ALL:
            raise ValueError(f"unknown dead-letter stage {self.stage!r}")
        # The last resort must always be writable: a lone surrogate (JSON allows `"\ud800"`) is
        # kept as its escape, never left to fail a UTF-8 writer.
        for field in ("error_type", "error", "payload", "event_id", "product_id", "image_url"):
            value = getattr(self, field)
            if not value.isascii():
                object.__setattr__(self, field, value.encode("utf-8", "backslashreplace").decode("utf-8"))
        if len(self.payload) > MAX_PAYLOAD_CHARS:
            object.__setattr__(self, "payload", self.payload[:MAX_PAYLOAD_CHARS])
        if len(self.error) > 2000:
            object.__setattr__(self, "error", self.error[:2000])

    @property
    def is_event_level(self) -> bool:
        """True when this dead letter is the event's one outcome (no record was written)."""
        return not self.image_url

    # Every dead letter is built by one of these three: what failed decides which.
    @classmethod
    def of_event(cls, stage: str, error_type: str, error: str, event: ProductEvent,
                 image_url: str = "") -> "DeadLetter":
        """An event (or, with `image_url`, one of its images) that failed after it was parsed."""
        return cls(stage=stage, error_type=error_type, error=error, payload=event.to_json(),
                   event_id=event.event_id, product_id=event.product_id, image_url=image_url)

    @classmethod
    def of_record(cls, stage: str, error_type: str, error: str, record: EmbeddingRecord) -> "DeadLetter":
        """A record a sink or the index refused; the payload is the record."""
        return cls(stage=stage, error_type=error_type, error=error, payload=json.dumps(record.to_dict()),
                   event_id=record.event_id, product_id=record.product_id)

    @classmethod
    def of_payload(cls, stage: str, error_type: str, error: str, payload: str | bytes, event_id: str = "",
                   product_id: str = "") -> "DeadLetter":
        """A message (or row) that never became an event or record, with the ids that could be read."""
        if isinstance(payload, bytes):
            # Not UTF-8 is itself a reason to dead-letter; keep every byte visible.
            payload = payload.decode("utf-8", errors="backslashreplace")
        return cls(stage=stage, error_type=error_type, error=error, payload=payload, event_id=event_id,
                   product_id=product_id)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failed_at"] = format_timestamp(self.failed_at)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


_BIGQUERY_TYPES = {str: "STRING", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", dt.datetime: "TIMESTAMP"}


def bigquery_schema(cls: type) -> dict[str, list[dict[str, str]]]:
    """The BigQuery table schema of a contract, derived from its fields (one definition).

    `tuple[X, ...]` becomes a REPEATED column, a vector (`np.ndarray`) a REPEATED FLOAT one,
    `datetime` a TIMESTAMP; optional
    (`X | None`) and mapping fields are NULLABLE, everything else REQUIRED.
    """
    fields = []
    for name, hint in typing.get_type_hints(cls).items():
        mode = "REQUIRED"
        args = typing.get_args(hint)
        if type(None) in args:
            hint = next(arg for arg in args if arg is not type(None))
            mode = "NULLABLE"
        origin = typing.get_origin(hint)
        if hint is np.ndarray:
            hint, mode = float, "REPEATED"
        elif origin is tuple:
            hint, mode = typing.get_args(hint)[0], "REPEATED"
        elif origin is not None and issubclass(origin, Mapping):
            fields.append({"name": name, "type": "JSON", "mode": "NULLABLE"})
            continue
        fields.append({"name": name, "type": _BIGQUERY_TYPES[hint], "mode": mode})
    return {"fields": fields}
