import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.events import MAX_MESSAGE_BYTES, InvalidEvent, ParseEvents, parse_event

GOOD = {
    "event_id": "e-1",
    "product_id": "p-1",
    "op": "upsert",
    "version": 5,
    "shop_id": "shop-a",
    "title": "Linen shirt",
    "description": "White",
    "image_urls": ["https://cdn.example.com/a.jpg", "http://cdn.example.com/b.png"],
    "attributes": {"brand": "Kestrel", "price": 49.5},
}


def message(**changes) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def refused(raw) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    return info.value


def test_a_good_event_parses_into_a_typed_product_event():
    event = parse_event(message())
    assert event.event_id == "e-1" and event.product_id == "p-1" and event.version == 5
    assert event.image_urls == ("https://cdn.example.com/a.jpg", "http://cdn.example.com/b.png")
    assert event.attributes == {"brand": "Kestrel", "price": 49.5}
    assert event.shop_id == "shop-a" and not event.is_delete


def test_a_delete_needs_only_ids_op_and_version():
    event = parse_event(json.dumps({"event_id": "e", "product_id": "p", "op": "delete", "version": 0}))
    assert event.is_delete and event.title == "" and event.image_urls == ()


def test_a_patch_carries_attributes_only_and_skips_the_model():
    event = parse_event(json.dumps({"event_id": "e", "product_id": "p", "op": "patch", "version": 3,
                                    "attributes": {"price": 9.5, "in_stock": False}}))
    assert event.op == "patch" and not event.needs_vectors and event.attributes == {"price": 9.5, "in_stock": False}


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"version": NaN}', "not JSON"),
        (b"x" * (MAX_MESSAGE_BYTES + 1), "limit"),
    ],
)
def test_unreadable_messages_fail_at_parse(raw, reason):
    error = refused(raw)
    assert error.stage == "parse" and reason in str(error)


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"event_id": ...}, "event_id is required"),
        ({"event_id": 7}, "event_id must be a string"),
        ({"event_id": ""}, "event_id must be 1-256"),
        ({"product_id": ...}, "product_id is required"),
        ({"product_id": "p" * 257}, "product_id must be 1-256"),
        ({"product_id": "   "}, "not blank"),
        ({"op": "rename"}, "op must be one of"),
        ({"op": ...}, "op must be one of"),
        ({"version": "5"}, "version must be an integer"),
        ({"version": 5.0}, "version must be an integer"),
        ({"version": True}, "version must be an integer"),
        ({"version": -1}, "between 0"),
        ({"version": 2**63}, "between 0"),
        ({"version": ...}, "version must be an integer"),
        ({"shop_id": 3}, "shop_id must be a string"),
        ({"title": ["a"]}, "title must be a string"),
        ({"image_urls": "https://x/a.jpg"}, "list of strings"),
        ({"image_urls": [f"https://x/{i}.jpg" for i in range(9)]}, "at most 8"),
        ({"image_urls": [3]}, "must be strings"),
        ({"image_urls": ["ftp://x/a.jpg"]}, "not http or https"),
        ({"image_urls": ["file:///etc/passwd"]}, "not http or https"),
        ({"image_urls": ["https:///a.jpg"]}, "has no host"),
        ({"attributes": ["brand"]}, "attributes must be an object"),
        ({"event_time": "yesterday"}, "not RFC 3339"),
        ({"event_time": "2026-11-21T10:00:00"}, "time zone"),
        ({"title": ..., "description": ..., "image_urls": ...}, "at least one of"),
        ({"title": "  ", "description": ..., "image_urls": []}, "at least one of"),
        ({"op": "patch", "attributes": {"price": 3}}, "a patch changes attributes only"),  # the title is kept
        ({"op": "patch", "title": ..., "description": ..., "image_urls": ..., "attributes": {}}, "needs attributes"),
    ],
)
def test_each_rule_is_checked_at_validate(changes, reason):
    error = refused(message(**changes))
    assert error.stage == "validate"
    assert reason in str(error)


def test_validation_errors_keep_the_ids_they_could_read():
    error = refused(message(op="rename"))
    assert (error.event_id, error.product_id) == ("e-1", "p-1")


def test_exactly_eight_images_and_an_explicit_event_time_are_fine():
    event = parse_event(message(image_urls=[f"https://x/{i}.jpg" for i in range(8)],
                                event_time="2026-11-21T10:00:00Z"))
    assert len(event.image_urls) == 8 and event.event_time.isoformat() == "2026-11-21T10:00:00+00:00"


def test_parse_events_splits_good_from_dead_letters():
    with TestPipeline(runner="FnApiRunner") as p:
        parsed = p | beam.Create([message(), b"nope", message(op="x")]) | ParseEvents()
        assert_that(parsed.events | "Ids" >> beam.Map(lambda e: e.event_id), equal_to(["e-1"]), label="good")
        stages = parsed[ParseEvents.DEAD_LETTER] | beam.Map(lambda d: (d.stage, d.event_id))
        assert_that(stages, equal_to([("parse", ""), ("validate", "e-1")]), label="dead")


def test_events_without_event_time_get_one():
    with TestPipeline(runner="FnApiRunner") as p:
        parsed = p | beam.Create([message()]) | ParseEvents()
        assert_that(parsed.events | beam.Map(lambda e: e.event_time is not None), equal_to([True]))
