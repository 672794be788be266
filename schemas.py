"""The product's three contracts: the event in, the embedding record out, the dead letter.

One definition each (DESIGN §3–5), imported by the parser, the model path, the sinks and
the index, so that a field is added or renamed in exactly one place.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import typing
from typing import Any, Mapping

import orjson

__all__ = [
    "bigquery_schema",
    "DeadLetter",
    "EmbeddingRecord",
    "ProductEvent",
    "Stage",
    "MAX_IMAGE_URLS",
    "MAX_PAYLOAD_CHARS",
    "OPS",
    "format_timestamp",
]

OPS = ("upsert", "delete")
MAX_IMAGE_URLS = 8
MAX_ID_CHARS = 256
# Dead letters keep the original message, truncated so that one poison message can't
# blow up a BigQuery row or a Pub/Sub message.
MAX_PAYLOAD_CHARS = 64 * 1024


class Stage:
    """Where a message failed; the `stage` field of a dead letter."""

    PARSE = "parse"
    VALIDATE = "validate"
    DOWNLOAD = "download"
    DECODE = "decode"
    INFERENCE = "inference"
    SINK = "sink"

    ALL = (PARSE, VALIDATE, DOWNLOAD, DECODE, INFERENCE, SINK)


def format_timestamp(value: dt.datetime) -> str:
    """RFC 3339 in UTC with milliseconds, the form BigQuery and JSON consumers both read."""
    return value.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class ProductEvent:
    """A validated product change (DESIGN §3). Built only by `transforms.events.parse_event`."""

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
    def text(self) -> str:
        """What the text tower reads: title and description, as a shopper would see them."""
        return "\n".join(part for part in (self.title, self.description) if part)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_urls"] = list(self.image_urls)
        out["attributes"] = dict(self.attributes)
        out["event_time"] = format_timestamp(self.event_time) if self.event_time else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)


_VECTORS = ("embedding", "image_embedding", "text_embedding")


@dataclasses.dataclass(frozen=True)
class EmbeddingRecord:
    """One product's vectors and what downstream needs to show it (DESIGN §4)."""

    product_id: str
    shop_id: str
    op: str
    version: int
    event_id: str
    embedding: tuple[float, ...]
    image_embedding: tuple[float, ...]
    text_embedding: tuple[float, ...]
    image_count: int
    title: str
    image_url: str
    model: str
    event_time: dt.datetime
    embedded_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies thousands of floats per record.
        out = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in _VECTORS:
            out[name] = list(out[name])
        out["event_time"] = format_timestamp(self.event_time)
        out["embedded_at"] = format_timestamp(self.embedded_at)
        return out

    def to_json(self) -> str:
        """JSON via orjson (float formatting is most of the cost); non-finite vectors are refused."""
        for name in _VECTORS:
            if not math.isfinite(math.fsum(getattr(self, name))):
                raise ValueError(f"{name} holds a non-finite value")
        return orjson.dumps(self.to_dict()).decode("utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EmbeddingRecord":
        values = dict(data)
        for name in ("embedding", "image_embedding", "text_embedding"):
            values[name] = tuple(float(x) for x in values.get(name) or ())
        for name in ("event_time", "embedded_at"):
            values[name] = dt.datetime.fromisoformat(str(values[name]).replace("Z", "+00:00"))
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """A message, or one image of it, that could not be embedded, and why (DESIGN §5).

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
        if len(self.payload) > MAX_PAYLOAD_CHARS:
            object.__setattr__(self, "payload", self.payload[:MAX_PAYLOAD_CHARS])
        if len(self.error) > 2000:
            object.__setattr__(self, "error", self.error[:2000])

    @property
    def is_event_level(self) -> bool:
        """True when this dead letter is the event's one outcome (no record was written)."""
        return not self.image_url

    @classmethod
    def from_exception(
        cls,
        stage: str,
        error: BaseException,
        payload: str | bytes,
        event: ProductEvent | None = None,
        image_url: str = "",
    ) -> "DeadLetter":
        if isinstance(payload, bytes):
            # Not UTF-8 is itself a reason to dead-letter; keep every byte visible.
            payload = payload.decode("utf-8", errors="backslashreplace")
        return cls(
            stage=stage,
            error_type=type(error).__name__,
            error=str(error) or repr(error),
            payload=payload,
            event_id=event.event_id if event else "",
            product_id=event.product_id if event else "",
            image_url=image_url,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failed_at"] = format_timestamp(self.failed_at)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


_BIGQUERY_TYPES = {str: "STRING", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", dt.datetime: "TIMESTAMP"}


def bigquery_schema(cls: type) -> dict[str, list[dict[str, str]]]:
    """The BigQuery table schema of a contract, derived from its fields (one definition).

    `tuple[float, ...]` becomes a REPEATED FLOAT column, `datetime` a TIMESTAMP; optional
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
        if origin is tuple:
            hint, mode = typing.get_args(hint)[0], "REPEATED"
        elif origin is not None and issubclass(origin, Mapping):
            fields.append({"name": name, "type": "JSON", "mode": "NULLABLE"})
            continue
        fields.append({"name": name, "type": _BIGQUERY_TYPES[hint], "mode": mode})
    return {"fields": fields}
