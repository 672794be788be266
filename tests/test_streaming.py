"""The streaming pipeline on the real local stand-ins: Pub/Sub emulator in and out, bqemulator."""

from __future__ import annotations

import json
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from google.api_core.exceptions import NotFound
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery, pubsub_v1

from localstack.image_server import Route
from localstack.streaming import StreamingJob
from model_handlers.config import ModelConfig
from pipelines import embed
from pipelines.options import EmbedJobConfig
from schemas import EmbeddingRecord, bigquery_schema
from tests.conftest import TINY_CLIP, image_bytes
from media.download import FetchConfig
from transforms.images import ImageOptions

pytestmark = pytest.mark.emulator


def pull_all(subscription: str, expected: int, timeout_s: float) -> list:
    """Pulls (and acks) until `expected` messages arrived or time is up."""
    received = []
    deadline = time.monotonic() + timeout_s
    with pubsub_v1.SubscriberClient() as subscriber:
        while len(received) < expected and time.monotonic() < deadline:
            response = subscriber.pull(subscription=subscription, max_messages=100, timeout=5)
            if response.received_messages:
                subscriber.acknowledge(subscription=subscription,
                                       ack_ids=[m.ack_id for m in response.received_messages])
                received.extend(m.message for m in response.received_messages)
    return received


def table_rows(client, table: str, expected: int, timeout_s: float) -> list:
    """The table's rows once `expected` have arrived (or what is there at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rows = list(client.query(f"SELECT * FROM `{table}`").result())
        except NotFound:  # the sink creates the table with its first rows
            rows = []
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def make_topics(ps, unique_name):
    """Topics of its own for a test: events in, records and dead letters out, one subscription each."""
    names = {kind: unique_name(kind) for kind in ("events", "records", "dead")}
    for name in names.values():
        ps.create_topic(name)
    subscriptions = [ps.create_subscription(names[kind], unique_name(f"{kind}-sub"))
                     for kind in ("events", "records", "dead")]
    return (names, *subscriptions)


def bad_messages(image_url) -> list[bytes]:
    kinds = [
        b"not json at all",
        b"\xff\xfe\xfa",
        b'{"event_id": "x"}',
        json.dumps({"event_id": "b-op", "product_id": "p", "op": "nope", "version": 1}).encode(),
        json.dumps({"event_id": "b-url", "product_id": "p", "op": "upsert", "version": 1,
                    "image_urls": [image_url("missing.jpg")]}).encode(),
    ]
    # Over the 1 MB event limit. (The DirectRunner's pull fails on responses over gRPC's 4 MB
    # default, so a burst of near-10 MB messages is a Dataflow-only test; see docs/ARCHITECTURE.md §14.)
    huge = [b'{"title": "' + b"x" * 1_100_000 + b'"}'] * 2
    return [kinds[i % len(kinds)] for i in range(18)] + huge


@pytest.mark.parametrize("batch_duration", [0.0, 0.5], ids=["in-bundle", "stateful"])
def test_200_events_in_one_record_or_dead_letter_each_out(pubsub_emulator, bigquery_emulator, image_server,
                                                          unique_name, batch_duration):
    ps = pubsub_emulator
    names, events_sub, records_sub, dead_sub = make_topics(ps, unique_name)
    client = bigquery.Client(project=ps.project, credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": bigquery_emulator.endpoint})
    dataset = unique_name("ds").replace("-", "_")
    client.create_dataset(dataset)
    table = f"{ps.project}:{dataset}.product_embeddings"

    for i in range(4):
        image_server.routes[f"/{i}.jpg"] = Route(body=image_bytes("JPEG", seed=i), headers={"Content-Type": "image/jpeg"})

    config = EmbedJobConfig(
        model=ModelConfig(spec=TINY_CLIP, device="cpu", max_batch_size=16, max_batch_duration_secs=batch_duration),
        images=ImageOptions(FetchConfig(allow_private_hosts=True, retries=0, read_timeout_s=2)),
        streaming=True,
        input_subscription=events_sub,
        output_topic=ps.topic(names["records"]),
        dead_letter_topic=ps.topic(names["dead"]),
        bigquery_table=table,
        bigquery_write_method="STREAMING_INSERTS",
    )
    config.validate("BundleBasedDirectRunner")
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming", "--runner", "BundleBasedDirectRunner"]))
    embed.build_pipeline(pipeline, config)

    good = [
        {"event_id": f"g{n}", "product_id": f"p{n}", "op": "upsert", "version": n, "shop_id": f"s{n % 3}",
         "title": f"product {n}", "image_urls": [image_server.url(f"{n % 4}.jpg")]}
        for n in range(180)
    ]
    bad = bad_messages(image_server.url)
    with StreamingJob(pipeline, wake_topic=ps.topic(names["events"])):
        publisher = pubsub_v1.PublisherClient()
        futures = [publisher.publish(ps.topic(names["events"]), json.dumps(e).encode(), event_id=e["event_id"])
                   for e in good]
        futures += [publisher.publish(ps.topic(names["events"]), message, event_id=f"bad-{n}")
                    for n, message in enumerate(bad)]
        for future in futures:
            future.result(timeout=30)
        started = time.monotonic()
        records = pull_all(records_sub, len(good), timeout_s=120)
        # An unfetchable image is reported on its own as well as with its event.
        expected_letters = len(bad) + sum(1 for m in bad if b"missing.jpg" in m)
        letters = pull_all(dead_sub, expected_letters, timeout_s=max(5, 120 - (time.monotonic() - started)))
        # The BigQuery branch runs beside the topic branch: wait for its rows before stopping the job.
        rows = table_rows(client, f"{ps.project}.{dataset}.product_embeddings", len(good), timeout_s=60)

    by_event = {m.attributes["event_id"]: m for m in records}
    assert sorted(by_event) == sorted(e["event_id"] for e in good)
    assert len(records) == len(good)
    first = json.loads(by_event["g7"].data)
    assert by_event["g7"].attributes == {"product_id": "p7", "op": "upsert", "version": "7", "model": TINY_CLIP,
                                         "event_id": "g7"}
    assert len(first["embedding"]) == 64 and np.isclose(np.linalg.norm(first["embedding"]), 1, atol=1e-5)

    event_letters = [json.loads(m.data) for m in letters if not json.loads(m.data)["image_url"]]
    assert len(event_letters) == len(bad)
    assert {d["stage"] for d in event_letters} == {"parse", "validate", "download"}
    assert all(m.attributes["stage"] for m in letters)

    # BigQuery holds the good rows, with the schema of the one record definition.
    bq_table = client.get_table(f"{ps.project}.{dataset}.product_embeddings")
    assert [(f.name, f.field_type, f.mode) for f in bq_table.schema] == [
        (f["name"], f["type"], f["mode"]) for f in bigquery_schema(EmbeddingRecord)["fields"]]
    assert bq_table.time_partitioning.field == "embedded_at" and bq_table.clustering_fields == ["product_id"]
    assert sorted(r["event_id"] for r in rows) == sorted(by_event)
    row = next(r for r in rows if r["event_id"] == "g7")
    np.testing.assert_allclose(row["embedding"], first["embedding"], atol=1e-6)
    assert row["shop_id"] == "s1" and row["version"] == 7 and row["image_count"] == 1


def test_the_cli_runs_against_the_emulators_until_stopped(pubsub_emulator, bigquery_emulator, image_server,
                                                          unique_name, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    ps = pubsub_emulator
    names, events_sub, records_sub, _ = make_topics(ps, unique_name)
    image_server.routes["/a.jpg"] = Route(body=image_bytes("JPEG"), headers={"Content-Type": "image/jpeg"})
    env = {**os.environ, **ps.env(), **bigquery_emulator.env()}
    log = open(tmp_path / "cli.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.embed", "--streaming", "--runner", "BundleBasedDirectRunner",
         "--input_subscription", events_sub, "--output_topic", ps.topic(names["records"]),
         "--dead_letter_topic", ps.topic(names["dead"]), "--model", TINY_CLIP, "--allow_private_hosts"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        publisher = pubsub_v1.PublisherClient()
        event = {"event_id": "cli-1", "product_id": "p", "op": "upsert", "version": 1, "title": "t",
                 "image_urls": [image_server.url("a.jpg")]}
        publisher.publish(ps.topic(names["events"]), json.dumps(event).encode(), event_id="cli-1").result()
        (message,) = pull_all(records_sub, 1, timeout_s=120)
        assert message.attributes["event_id"] == "cli-1"
        time.sleep(2)
        assert process.poll() is None, "a streaming job keeps running until it is stopped"
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    assert process.returncode is not None


def test_the_index_pipeline_follows_the_embeddings_topic(pubsub_emulator, unique_name, tmp_path):
    from pipelines import index
    from search.sharded import ShardedIndex
    from tests.support.index_helpers import live_truth, record

    ps = pubsub_emulator
    names, records_sub, _, _ = make_topics(ps, unique_name)
    topic = ps.topic(names["events"])
    config = index.IndexJobConfig.from_options(PipelineOptions([
        "--streaming", "--input_subscription", records_sub, "--index_dir", str(tmp_path / "index"),
        "--model", TINY_CLIP, "--num_shards", "2",
        "--dead_letter_topic", ps.topic(names["dead"])]))
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming", "--runner", "BundleBasedDirectRunner"]))
    index.build_pipeline(pipeline, config)
    records = [record(f"p{i}", 1, dim=64, model=TINY_CLIP, seed=i) for i in range(40)]
    records += [record("p0", 2, "delete", dim=64, model=TINY_CLIP)]
    with StreamingJob(pipeline, wake_topic=topic):
        publisher = pubsub_v1.PublisherClient()
        for r in records:
            publisher.publish(topic, r.to_json().encode(), event_id=r.event_id).result(timeout=30)
        ShardedIndex.ensure_layout(tmp_path / "index", 2, TINY_CLIP, 64)
        reader = ShardedIndex.open(tmp_path / "index")

        def live():
            reader.refresh()
            return {pid: state for shard in reader.shards for pid, state in shard.live_products().items()}

        # Wait for the final state itself: the live count passes through 39 on its way there.
        deadline = time.monotonic() + 60
        while live() != live_truth(records) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert live() == live_truth(records)
    (top,) = reader.search(np.array(records[5].embedding), k=1)
    assert top.product_id == "p5"
