import datetime as dt
import json

import pytest

from schemas import MAX_PAYLOAD_CHARS, DeadLetter, EmbeddingRecord, ProductEvent, Stage, format_timestamp

WHEN = dt.datetime(2026, 11, 21, 12, 0, 0, 123000, tzinfo=dt.timezone.utc)


def record(**overrides) -> EmbeddingRecord:
    fields = dict(product_id="p", shop_id="s", op="upsert", version=3, event_id="e", embedding=(0.6, 0.8),
                  image_embedding=(1.0, 0.0), text_embedding=(0.0, 1.0), image_count=1, title="t",
                  image_url="http://x/a.jpg", model="m", event_time=WHEN, embedded_at=WHEN)
    fields.update(overrides)
    return EmbeddingRecord(**fields)


def test_timestamps_are_rfc3339_utc_with_milliseconds():
    assert format_timestamp(WHEN) == "2026-11-21T12:00:00.123Z"
    plus_two = dt.datetime(2026, 11, 21, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert format_timestamp(plus_two) == "2026-11-21T12:00:00.000Z"


def test_record_round_trips_through_json():
    original = record()
    again = EmbeddingRecord.from_dict(json.loads(original.to_json()))
    assert again == original


def test_record_refuses_non_finite_vectors():
    with pytest.raises(ValueError):
        record(embedding=(float("nan"), 1.0)).to_json()


def test_event_text_joins_title_and_description():
    event = ProductEvent("e", "p", "upsert", 1, title="Red shirt", description="Cotton")
    assert event.text == "Red shirt\nCotton"
    assert ProductEvent("e", "p", "upsert", 1, description="Only").text == "Only"


def test_dead_letter_truncates_payload_and_names_the_stage():
    letter = DeadLetter.of_payload(Stage.PARSE, "ValueError", "bad", "x" * (MAX_PAYLOAD_CHARS + 10))
    assert len(letter.payload) == MAX_PAYLOAD_CHARS
    data = json.loads(letter.to_json())
    assert data["stage"] == "parse" and data["error_type"] == "ValueError" and data["error"] == "bad"
    assert data["failed_at"].endswith("Z")
    assert letter.is_event_level


def test_dead_letter_keeps_undecodable_bytes_visible():
    letter = DeadLetter.of_payload(Stage.PARSE, "ValueError", "x", b"ok \xff")
    assert letter.payload == "ok \\xff"


def test_dead_letter_refuses_unknown_stage():
    with pytest.raises(ValueError):
        DeadLetter(stage="elsewhere", error_type="E", error="e", payload="")
