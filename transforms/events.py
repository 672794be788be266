"""Product-change messages to `ProductEvent`s, with every rule of docs/ARCHITECTURE.md §3 checked.

`parse_event` is plain Python (the unit tests drive it directly); `ParseEvents` wraps it
for Beam and sends every message it refuses to the dead letter with stage `parse` (not
UTF-8, not JSON, not an object, too large) or `validate` (a field breaks a rule).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
from typing import Any, Iterable
from urllib.parse import urlsplit

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas import MAX_ID_CHARS, MAX_IMAGE_URLS, OPS, DeadLetter, ProductEvent, Stage, unrepresentable, valid_unicode

__all__ = ["InvalidEvent", "ParseEvents", "ids_in_text", "parse_event", "parse_outcome", "readable_id",
           "MAX_MESSAGE_BYTES"]

# Pub/Sub allows 10 MB; a product change is a few KB. Anything near the limit is a bug upstream.
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_INT64 = 2**63 - 1
# `attributes` are free-form (brand, price, ...): bounded so one event can't flood a row or a record.
MAX_ATTRIBUTES_BYTES = 64 * 1024
MAX_EVENT_NESTING = 10  # levels of objects and lists in a message; attributes get all but the top one


class InvalidEvent(ValueError):
    """A message that is not a valid product event; carries what could be read of it."""

    def __init__(self, stage: str, message: str, event_id: str = "", product_id: str = ""):
        super().__init__(message)
        self.stage = stage
        self.event_id = event_id
        self.product_id = product_id


def parse_event(raw: bytes | str) -> ProductEvent:
    """Decodes and validates one message; raises `InvalidEvent` naming the first broken rule.

    Nothing else escapes it: whatever it accepts, every serialiser downstream can write."""
    data = _decode(raw)
    event_id = data.get("event_id")
    product_id = data.get("product_id")
    ids = {"event_id": readable_id(event_id), "product_id": readable_id(product_id)}

    def fail(message: str) -> InvalidEvent:
        return InvalidEvent(Stage.VALIDATE, message, **ids)

    _check_structure(data, fail)
    _require_id(data, "event_id", fail)
    _require_id(data, "product_id", fail)
    op = data.get("op")
    if op not in OPS:
        raise fail(f"op must be one of {', '.join(OPS)}, got {op!r}")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise fail(f"version must be an integer, got {type(version).__name__}")
    if not 0 <= version <= MAX_INT64:
        raise fail(f"version must be between 0 and 2^63-1, got {version}")

    shop_id = _optional_str(data, "shop_id", fail, MAX_ID_CHARS)
    # Long text is never a reason to refuse a product: the message cap bounds it, and the model
    # reads a prefix of it (ProductEvent.text).
    title = _optional_str(data, "title", fail, MAX_MESSAGE_BYTES)
    description = _optional_str(data, "description", fail, MAX_MESSAGE_BYTES)
    image_urls = _image_urls(data.get("image_urls"), fail)
    attributes = data.get("attributes")
    if attributes is None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise fail(f"attributes must be an object, got {type(attributes).__name__}")
    size = len(json.dumps(attributes, ensure_ascii=False).encode("utf-8"))
    if size > MAX_ATTRIBUTES_BYTES:
        raise fail(f"attributes are {size} bytes as JSON, over the {MAX_ATTRIBUTES_BYTES}-byte limit")
    event_time = _event_time(data.get("event_time"), fail)

    if op == "upsert" and not (title.strip() or description.strip() or image_urls):
        raise fail("an upsert needs at least one of title, description, image_urls")
    if op == "patch":
        if title or description or image_urls:
            raise fail("a patch changes attributes only: a new title, description or image changes the vectors, "
                       "send an upsert")
        if not attributes:
            raise fail("a patch needs attributes")
    return ProductEvent(
        event_id=event_id,
        product_id=product_id,
        op=op,
        version=version,
        shop_id=shop_id,
        title=title,
        description=description,
        image_urls=image_urls,
        attributes=attributes,
        event_time=event_time,
    )


def _decode(raw: bytes | str) -> dict[str, Any]:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogatepass")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(Stage.PARSE, f"message is {len(raw)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit",
                           **ids_in_text(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidEvent(Stage.PARSE, f"message is not UTF-8: {e}") from e
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise InvalidEvent(Stage.PARSE, f"message is not JSON: {e}") from e
    except RecursionError as e:  # the decoder's own stack limit, about a thousand levels
        raise InvalidEvent(Stage.PARSE, f"message is nested over {MAX_EVENT_NESTING} levels deep",
                           **ids_in_text(raw)) from e
    if not isinstance(data, dict):
        raise InvalidEvent(Stage.PARSE, f"message must be a JSON object, got {type(data).__name__}")
    return data


_ID_IN_TEXT = {name: re.compile(rb'"%s"\s*:\s*("(?:[^"\\]|\\.){1,%d}")' % (name.encode(), MAX_ID_CHARS * 6))
               for name in ("event_id", "product_id")}


def ids_in_text(raw: bytes) -> dict[str, str]:
    """The ids of a message that cannot be parsed, where a plain search finds them (for its dead letter)."""
    ids = {}
    for name, pattern in _ID_IN_TEXT.items():
        match = pattern.search(raw)
        try:
            ids[name] = readable_id(json.loads(match.group(1))) if match else ""
        except ValueError:
            ids[name] = ""
    return ids


def readable_id(value: Any) -> str:
    """`value` if it is a string that can stand in a dead letter as an id, else ''."""
    if isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS and valid_unicode(value):
        return value
    return ""


def _check_structure(data: dict[str, Any], fail) -> None:
    """Every string can be written as UTF-8, every number is finite, and nothing nests deeper than
    MAX_EVENT_NESTING levels."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "message")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, str):
            if not valid_unicode(value):
                raise fail(f"{where} is not valid Unicode (it holds a lone surrogate)")
        elif unrepresentable(value):  # 1e400 reads as inf
            raise fail(f"{where} is not a finite number (NaN, or outside the float or 64-bit integer range)")
        elif isinstance(value, (dict, list)):
            if depth > MAX_EVENT_NESTING:
                raise fail(f"{where} is nested over {MAX_EVENT_NESTING} levels deep")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not valid_unicode(key):
                        raise fail(f"a key in {where} is not valid Unicode (it holds a lone surrogate)")
                    stack.append((item, depth + 1, key if depth == 1 else f"{where}.{key}"))
            else:
                stack.extend((item, depth + 1, f"{where}[{n}]") for n, item in enumerate(value))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _require_id(data: dict[str, Any], name: str, fail) -> None:
    value = data.get(name)
    if value is None:
        raise fail(f"{name} is required")
    if not isinstance(value, str):
        raise fail(f"{name} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_CHARS or not value.strip():
        raise fail(f"{name} must be 1-{MAX_ID_CHARS} characters and not blank")


def _optional_str(data: dict[str, Any], name: str, fail, max_chars: int) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise fail(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise fail(f"{name} is {len(value)} characters, over the {max_chars}-character limit")
    return value


def _image_urls(value: Any, fail) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise fail(f"image_urls must be a list of strings, got {type(value).__name__}")
    if len(value) > MAX_IMAGE_URLS:
        raise fail(f"image_urls has {len(value)} entries, at most {MAX_IMAGE_URLS} are allowed")
    for url in value:
        if not isinstance(url, str):
            raise fail(f"image_urls must be strings, got {type(url).__name__}")
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise fail(f"image URL {url[:200]!r} is not http or https")
        if not parts.hostname:
            raise fail(f"image URL {url[:200]!r} has no host")
    return tuple(value)


def _event_time(value: Any, fail) -> dt.datetime | None:
    """Optional RFC 3339 `event_time` (docs/ARCHITECTURE.md §3: when the merchant made the change)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise fail("event_time must be an RFC 3339 string")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise fail(f"event_time {value[:64]!r} is not RFC 3339") from e
    if parsed.tzinfo is None:
        raise fail("event_time needs a time zone")
    return parsed


def parse_outcome(raw: bytes | str) -> ProductEvent | DeadLetter:
    """One message's one outcome: its event, or its dead letter (stage `parse` or `validate`)."""
    try:
        return parse_event(raw)
    except InvalidEvent as e:
        return DeadLetter.of_payload(e.stage, type(e).__name__, str(e), raw, event_id=e.event_id,
                                     product_id=e.product_id)


class _ParseEventFn(beam.DoFn):
    def __init__(self):
        self._parsed = Metrics.counter("embed", "parse_ok")
        self._failed = {stage: Metrics.counter("embed", f"{stage}_failed") for stage in (Stage.PARSE, Stage.VALIDATE)}

    def process(self, raw: bytes | str, timestamp=beam.DoFn.TimestampParam) -> Iterable[Any]:
        event = parse_outcome(raw)
        if isinstance(event, DeadLetter):
            self._failed[event.stage].inc()
            yield beam.pvalue.TaggedOutput(ParseEvents.DEAD_LETTER, event)
            return
        if event.event_time is None:
            event = _stamp(event, timestamp)
        self._parsed.inc()
        yield event


def _stamp(event: ProductEvent, timestamp) -> ProductEvent:
    """Falls back to the element's timestamp (Pub/Sub publish time), else to now."""
    try:
        seconds = float(timestamp.micros) / 1e6
    except AttributeError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 4e9:
        when = dt.datetime.now(dt.timezone.utc)
    else:
        when = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    return dataclasses.replace(event, event_time=when)


class ParseEvents(beam.PTransform):
    """Raw messages (bytes) → `ProductEvent`s; refusals on the `dead_letter` output."""

    DEAD_LETTER = "dead_letter"

    def expand(self, messages):
        return messages | "Parse" >> beam.ParDo(_ParseEventFn()).with_outputs(self.DEAD_LETTER, main="events")
