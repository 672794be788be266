"""Hostile inputs of a few hundred bytes, from outside: each ends as one dead letter, never a dead job.

The killers that were seen: an image 100000x1 pixels (resizing it would ask for ~26 GB),
`attributes` nested 2,000 deep (the JSON decoder's RecursionError), a lone surrogate in a string
(parsing accepts it, every UTF-8 writer refuses it). Then a fuzz test: arbitrary JSON values,
nesting and Unicode thrown at the parser and at every serialiser of what it produces.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from schemas import MAX_MODEL_TEXT_CHARS, DeadLetter, ProductEvent, bigquery_schema
from tests.conftest import TINY_CLIP, image_bytes
from localstack.image_server import Route
from transforms.events import InvalidEvent, parse_event, parse_outcome
from transforms.pubsub import dead_letter_message, record_message
from transforms.records import vectorless_record

ROOT = Path(__file__).resolve().parents[1]


def sliver_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def event(n: int, **fields) -> dict:
    return {"event_id": f"e{n}", "product_id": f"p{n}", "op": "upsert", "version": 1, **fields}


def read_jsonl(directory: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(directory.glob("*")) for line in path.read_text().splitlines()]


def test_the_killer_events_become_dead_letters_and_the_good_ones_records(tmp_path, image_server):
    image_server.routes["/wide.png"] = Route(body=sliver_png(100_000, 1), headers={"Content-Type": "image/png"})
    image_server.routes["/tall.png"] = Route(body=sliver_png(1, 100_000), headers={"Content-Type": "image/png"})
    image_server.routes["/ok.jpg"] = Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"})
    nested = '{"a":' * 2000 + "1" + "}" * 2000
    lines = [
        json.dumps(event(1, title="linen shirt", image_urls=[image_server.url("ok.jpg")])),
        json.dumps(event(2, image_urls=[image_server.url("wide.png")])),                      # killer 1
        json.dumps(event(3, image_urls=[image_server.url("tall.png")])),                      # killer 1'
        json.dumps(event(4, title="wool coat"))[:-1] + ', "attributes": ' + nested + "}",     # killer 2
        json.dumps(event(5, title="bad \ud800")),                                             # killer 3
        json.dumps(event(6, title="long", description="word " * 40_000)),                     # 200,000 chars
        json.dumps(event(7, title="wool coat", image_urls=[image_server.url("wide.png")])),  # text survives
    ]
    assert all(len(line.encode()) < 20_000 for line in lines[1:5])
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.embed", "--input_file", str(tmp_path / "events.jsonl"),
         "--output_dir", str(tmp_path / "out"), "--model", TINY_CLIP, "--allow_private_hosts"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]

    records = {r["event_id"]: r for r in read_jsonl(tmp_path / "out" / "embeddings")}
    letters = read_jsonl(tmp_path / "out" / "dead_letter")
    event_letters = {d["event_id"]: d for d in letters if not d["image_url"]}
    assert set(records) == {"e1", "e6", "e7"}
    assert records["e6"]["text_chars"] == MAX_MODEL_TEXT_CHARS  # truncated for the model, not dropped
    assert records["e1"]["text_chars"] == len("linen shirt")
    assert {k: (d["stage"], d["product_id"]) for k, d in event_letters.items()} == {
        "e2": ("decode", "p2"), "e3": ("decode", "p3"), "e4": ("parse", "p4"), "e5": ("validate", "p5")}
    assert "aspect ratio" in event_letters["e2"]["error"] and "lone surrogate" in event_letters["e5"]["error"]
    # Each failed image is reported too (docs/ARCHITECTURE.md §5); e7 was still embedded from its text.
    assert sorted((d["event_id"], d["stage"]) for d in letters if d["image_url"]) == [
        ("e2", "decode"), ("e3", "decode"), ("e7", "decode")]
    assert "3 records, 4 dead letters (decode=2, parse=1, validate=1); plus 3 failed-image reports" in result.stdout


# Arbitrary JSON: every kind of value, Unicode including lone surrogates, nesting to any depth.
_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12) | st.sampled_from(
    ["\ud800", "a\udfffb", "", " ", "\u0000", "\U0001f600"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_TEXT, children, max_size=3),
    max_leaves=25,
)
_FIELDS = ("event_id", "product_id", "op", "version", "shop_id", "title", "description", "image_urls",
           "attributes", "event_time")
_PLAUSIBLE = {"event_id": st.just("e1") | _TEXT, "product_id": st.just("p1") | _TEXT,
              "op": st.sampled_from(["upsert", "delete"]) | _JSON, "version": st.integers(-5, 2**64) | _JSON,
              "title": _TEXT | _JSON, "image_urls": st.lists(st.just("http://127.0.0.1/a.jpg") | _TEXT, max_size=3)}


@st.composite
def messages(draw) -> bytes:
    fields = {name: draw(_PLAUSIBLE.get(name, _JSON)) for name in draw(st.sets(st.sampled_from(_FIELDS)))}
    body = json.dumps(fields) if draw(st.booleans()) else json.dumps(draw(_JSON))
    depth = draw(st.sampled_from([0, 0, 0, 12, 2000]))
    if depth:
        body = body[:-1] + ', "attributes": ' + "[" * depth + "]" * depth + "}" if body.endswith("}") else \
            "[" * depth + body + "]" * depth
    return body.encode("utf-8", "surrogatepass") if draw(st.booleans()) else body.encode()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_the_parser_and_every_serialiser_give_one_outcome_per_message(raw):
    """No exception escapes, and whatever comes out can be written as a record, a dead letter,
    a BigQuery row and a Pub/Sub message."""
    output = parse_outcome(raw)
    if isinstance(output, DeadLetter):
        json.dumps(output.to_dict(), ensure_ascii=False).encode("utf-8")
        output.to_json().encode("utf-8")
        dead_letter_message(output)
        assert set(output.to_dict()) == {f["name"] for f in bigquery_schema(DeadLetter)["fields"]}
    else:
        assert isinstance(output, ProductEvent)
        output.to_json().encode("utf-8")
        record = vectorless_record(output, TINY_CLIP)
        record.to_json().encode("utf-8")
        record_message(record)
        json.dumps(record.to_dict(), ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("raw, stage, ids", [
    (b'{"event_id": "e1", "product_id": "p1", "op": "upsert", "version": 1, "title": "bad \\ud800"}',
     "validate", ("e1", "p1")),
    (b'{"event_id": "e\\ud800", "product_id": "p1", "op": "upsert", "version": 1, "title": "t"}',
     "validate", ("", "p1")),
    (b'{"event_id": "e1", "product_id": "p1", "attributes": ' + b"[" * 2000 + b"]" * 2000 + b"}", "parse",
     ("e1", "p1")),
    (b'{"event_id": "e1", "product_id": "p1", "op": "upsert", "version": 1, "title": "t", "attributes": '
     + b'{"a": ' * 11 + b"1" + b"}" * 11 + b"}", "validate", ("e1", "p1")),
    (b'{"event_id": "e1", "product_id": "p1", "op": "upsert", "version": 1, "title": "t", "attributes": {"a": "'
     + b"x" * 70_000 + b'"}}', "validate", ("e1", "p1")),
    (b'{"event_id": "big-1", "product_id": "p9", "description": "' + b"x" * 1_100_000 + b'"}', "parse",
     ("big-1", "p9")),
])
def test_refusals_keep_the_ids_they_could_read(raw, stage, ids):
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    assert (info.value.stage, (info.value.event_id, info.value.product_id)) == (stage, ids)
