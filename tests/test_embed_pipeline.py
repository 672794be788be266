"""The whole embed pipeline on the DirectRunner: good products, every bad input, the accounting invariant."""

from __future__ import annotations

import dataclasses
import io
import json

import apache_beam as beam
import numpy as np
import pytest
from PIL import Image
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from localstack.image_server import Route
from model_handlers.handler import ProductEmbeddingHandler
from pipelines import embed
from tests.conftest import TINY_CLIP, image_bytes
from tests.support.embed_helpers import config, event, read_jsonl, run_files
from transforms.embedding import EmbedProducts
from transforms.events import ParseEvents
from transforms.progress import read_outcomes

def solid_png(width: int, height: int) -> bytes:
    """16 megapixels in a few KB: what a decompression bomb looks like on the wire."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def catalogue(image_server):
    """Good and bad image URLs on the recording server, keyed by what they are."""
    server = image_server
    server.routes.update({
        "/a.jpg": Route(body=image_bytes("JPEG", seed=1), headers={"Content-Type": "image/jpeg"}),
        "/b.png": Route(body=image_bytes("PNG", seed=2), headers={"Content-Type": "image/png"}),
        "/c.webp": Route(body=image_bytes("WEBP", seed=3), headers={"Content-Type": "image/webp"}),
        "/404.jpg": Route(status=404),
        "/500.jpg": Route(status=500),
        "/slow.jpg": Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"}, delay=2.0),
        "/page.html": Route(body=b"<html></html>", headers={"Content-Type": "text/html"}),
        "/liar.jpg": Route(body=b"GIF89a but not really", headers={"Content-Type": "image/jpeg"}),
        "/truncated.jpg": Route(body=image_bytes("JPEG", seed=4)[:700], headers={"Content-Type": "image/jpeg"}),
        "/huge.jpg": Route(body=b"\xff" * 2_100_000, headers={"Content-Type": "image/jpeg"}),
        "/bomb.png": Route(body=solid_png(4000, 4000), headers={"Content-Type": "image/png"}),
    })
    return server


def messages(server) -> dict[str, bytes]:
    """One message per case; the key says which outcome it must end in."""
    url = server.url
    return {
        "ok:two-images": event(1, title="Linen shirt", image_urls=[url("a.jpg"), url("b.png")]),
        "ok:text-only": event(2, title="Wool coat", description="Warm"),
        "ok:webp": event(3, image_urls=[url("c.webp")]),
        "ok:one-of-two-failed": event(4, title="Boots", image_urls=[url("404.jpg"), url("a.jpg")]),
        "ok:images-failed-text-left": event(5, title="Scarf", image_urls=[url("500.jpg")]),
        "ok:delete": json.dumps({"event_id": "e6", "product_id": "p6", "op": "delete", "version": 9}).encode(),
        "ok:patch": json.dumps({"event_id": "e22", "product_id": "p1", "op": "patch", "version": 2,
                                "attributes": {"price": 19.5, "in_stock": False}}).encode(),
        "validate:patch-with-a-title": json.dumps({"event_id": "e23", "product_id": "p1", "op": "patch",
                                                   "version": 3, "title": "new", "attributes": {"a": 1}}).encode(),
        "parse:not-json": b"{oops",
        "parse:not-utf8": b"\xff\xfe\xfd",
        "validate:missing-fields": json.dumps({"event_id": "e8"}).encode(),
        "validate:mistyped": event(9, version="nine", title="x"),
        "validate:unknown-op": event(10, op="merge", title="x"),
        "validate:too-many-urls": event(11, image_urls=[url(f"{i}.jpg") for i in range(9)]),
        "validate:bad-scheme": event(12, image_urls=["ftp://example.com/a.jpg"]),
        "download:refused-host": event(13, image_urls=["http://169.254.169.254/latest/meta-data/"]),
        "download:404": event(14, image_urls=[url("404.jpg")]),
        "download:500": event(15, image_urls=[url("500.jpg")]),
        "download:slow": event(16, image_urls=[url("slow.jpg")]),
        "download:not-an-image": event(17, image_urls=[url("page.html")]),
        "download:oversize": event(18, image_urls=[url("huge.jpg")]),
        "decode:garbage": event(19, image_urls=[url("liar.jpg")]),
        "decode:truncated": event(20, image_urls=[url("truncated.jpg")]),
        "decode:bomb": event(21, image_urls=[url("bomb.png")]),
    }


def test_every_input_line_ends_in_exactly_one_outcome(tmp_path, catalogue):
    cases = messages(catalogue)
    records, letters = run_files(tmp_path, list(cases.values()), config(tmp_path))

    event_letters = [d for d in letters if not d["image_url"]]
    expected_ok = {json.loads(m)["event_id"] for k, m in cases.items() if k.startswith("ok:")}
    assert sorted(r["event_id"] for r in records) == sorted(expected_ok)
    assert len(records) + len(event_letters) == len(cases)

    # Each bad message has one event-level dead letter, at the stage its key names.
    by_id = {d["event_id"]: d for d in event_letters if d["event_id"]}
    for key, message in cases.items():
        stage = key.split(":")[0]
        if stage == "ok":
            continue
        if stage == "parse":
            matches = [d for d in event_letters if d["payload"] == message.decode("utf-8", "backslashreplace")]
            assert len(matches) == 1 and matches[0]["stage"] == "parse", key
            continue
        event_id = json.loads(message).get("event_id")
        assert by_id[event_id]["stage"] == stage, (key, by_id[event_id])
        assert by_id[event_id]["error"] and by_id[event_id]["error_type"]
        assert json.loads(by_id[event_id]["payload"])["event_id"] == event_id

    # Image failures of products that were still embedded are reported too.
    image_letters = {(d["event_id"], d["stage"]) for d in letters if d["image_url"]}
    assert ("e4", "download") in image_letters and ("e5", "download") in image_letters
    # The refused host was never contacted, and the slow one was given up on.
    assert all("169.254" not in path for path in catalogue.requests)


def test_records_carry_unit_vectors_of_the_declared_dimension_and_the_model_id(tmp_path, catalogue, tiny_clip):
    cases = messages(catalogue)
    good = [m for k, m in cases.items() if k.startswith("ok:")]
    records, _ = run_files(tmp_path, good, config(tmp_path))
    by_id = {r["event_id"]: r for r in records}
    for record in records:
        assert record["model"] == TINY_CLIP
        if record["op"] in ("delete", "patch"):  # no vectors, nothing downloaded or embedded
            assert record["embedding"] == [] and record["image_count"] == 0
            continue
        assert len(record["embedding"]) == tiny_clip.embedding_dim
        assert np.isclose(np.linalg.norm(record["embedding"]), 1.0, atol=1e-5)
    assert by_id["e1"]["image_count"] == 2 and len(by_id["e1"]["text_embedding"]) == 64
    assert by_id["e2"]["image_count"] == 0 and by_id["e2"]["image_embedding"] == []
    assert by_id["e4"]["image_count"] == 1 and by_id["e4"]["image_url"].endswith("/a.jpg")
    assert by_id["e5"]["image_count"] == 0 and by_id["e5"]["title"] == "Scarf"
    assert by_id["e1"]["shop_id"] == "s1" and by_id["e1"]["version"] == 1
    assert by_id["e22"]["op"] == "patch" and by_id["e22"]["attributes"] == {"price": 19.5, "in_stock": False}


def test_the_same_event_gives_the_same_vector(tmp_path, catalogue):
    message = messages(catalogue)["ok:two-images"]
    records, _ = run_files(tmp_path, [message, message], config(tmp_path))
    assert len(records) == 2
    np.testing.assert_allclose(records[0]["embedding"], records[1]["embedding"], atol=1e-6)


class ExplodingHandler(ProductEmbeddingHandler):
    """A real handler that fails the batches holding a product titled 'explode', and returns
    NaN vectors for one titled 'nan' (what a broken model does): stages inference and sink."""

    def run_inference(self, batch, model, inference_args=None):
        if any("explode" in request.text for request in batch):
            raise RuntimeError("CUDA error: device-side assert triggered")
        results = list(super().run_inference(batch, model, inference_args))
        for i, (request, result) in enumerate(zip(batch, results)):
            if "nan" in request.text:
                broken = dataclasses.replace(result.inference, embedding=np.full_like(result.inference.embedding, np.nan))
                results[i] = result._replace(inference=broken)
        return results


def test_inference_and_sink_failures_become_dead_letters(tmp_path):
    job = config(tmp_path)
    job = dataclasses.replace(job, model=dataclasses.replace(job.model, max_batch_size=1))
    lines = [event(1, title="fine"), event(2, title="explode"), event(3, title="nan")]
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(lines))
    with TestPipeline(runner="FnApiRunner") as p:
        parsed = p | beam.Create(lines) | ParseEvents()
        records, letters = parsed.events | EmbedProducts(job.model, job.images, ExplodingHandler(job.model))
        from transforms.sinks import WriteJsonLines

        sink_letters = records | WriteJsonLines(str(tmp_path / "out" / "part"))
        all_letters = (letters, sink_letters) | beam.Flatten()
        assert_that(all_letters | beam.Map(lambda d: (d.event_id, d.stage, d.error_type)),
                    equal_to([("e2", "inference", "RuntimeError"), ("e3", "sink", "ValueError")]))
    written = read_jsonl(str(tmp_path / "out" / "part*"))
    assert [r["event_id"] for r in written] == ["e1"]


def test_the_cli_runs_the_batch_pipeline(tmp_path, catalogue):
    cases = messages(catalogue)
    (tmp_path / "events.jsonl").write_bytes(cases["ok:two-images"] + b"\n" + cases["parse:not-json"] + b"\n")
    result = embed.run([
        "--input_file", str(tmp_path / "*.jsonl"),
        "--output_dir", str(tmp_path / "out"),
        "--model", TINY_CLIP,
        "--allow_private_hosts",
        "--max_batch_size", "4",
        "--runner", "DirectRunner",
    ])
    assert [r["event_id"] for r in read_jsonl(str(tmp_path / "out/embeddings/*.jsonl"))] == ["e1"]
    assert [d["stage"] for d in read_jsonl(str(tmp_path / "out/dead_letter/*.jsonl"))] == ["parse"]
    # Counters per stage and outcome, distributions for download time and batch size.
    from apache_beam.metrics.metric import MetricsFilter

    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace("embed"))["counters"]}
    assert (counters["parse_ok"], counters["parse_failed"], counters["images_ok"], counters["records_ok"]) == (1, 1, 2, 1)
    assert read_outcomes(result) == {"records": 1, "dead_letters_parse": 1}
    distributions = {d.key.metric.name: d.committed
                     for d in result.metrics().query(MetricsFilter().with_namespace("embed"))["distributions"]}
    assert distributions["download_ms"].count == 2 and distributions["batch_size"].sum == 1
    assert distributions["batch_images"].sum == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_dir", "x"], "--input_file is required"),
        (["--input_file", "x"], "--output_dir is required"),
        (["--input_file", "x", "--output_dir", "y", "--min_batch_size", "9", "--max_batch_size", "2"], "min_batch_size"),
        (["--input_file", "x", "--output_dir", "y", "--model", "torch:resnet"], "model spec"),
        (["--input_file", "x", "--output_dir", "y", "--max_concurrent_downloads", "0"], "max_concurrent_downloads"),
    ],
)
def test_bad_options_fail_at_launch(argv, message):
    with pytest.raises(SystemExit, match=message):
        embed.run(argv)
