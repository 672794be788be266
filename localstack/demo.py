"""`make demo`: the whole loop on the local stand-ins, events to search results.

Starts the Pub/Sub emulator, bqemulator and an image server on 127.0.0.1, creates the topics,
subscriptions and dataset, runs `pipelines.embed --streaming` and `pipelines.index --streaming`
on the DirectRunner, publishes a catalogue of real product photos (Fashion-MNIST) at a steady
rate plus one broken event of each kind, reads the output topic, the dead-letter topic and the
BigQuery table back, prints counts and freshness (publish → output topic), then starts the
search service on the index and prints a few text queries with their top results and the URL
of the search page. Everything it started is stopped, also on Ctrl-C.

`--backend qdrant` (`make demo BACKEND=qdrant`): the index job writes a Qdrant collection instead
(`--sink qdrant`, qdrant-client's local mode in <out>/qdrant: the job, the wait and the search
service share one process and so one client), and the search service serves it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import shutil
import signal
import threading
import time
import urllib.parse
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from localstack.bigquery_emulator import BigQueryEmulator
from localstack.image_server import ImageServer, Route
from localstack.pubsub_emulator import PubSubEmulator
from localstack.streaming import StreamingJob
from model_handlers.backends import check_model
from model_handlers.config import DEFAULT_MODEL, ModelConfig
from pipelines import embed
from pipelines.options import EmbedJobConfig
from media.download import FetchConfig
from sample_catalogue.products import broken_events, build_catalogue
from transforms.images import ImageOptions

__all__ = ["DemoReport", "run_streaming_demo"]


@dataclasses.dataclass
class DemoReport:
    model: str
    backend: str
    rate: float
    published: int
    broken: int
    records: int
    images: int
    event_letters: dict[str, int]
    image_letters: int
    bigquery_rows: int
    freshness_ms: list[float]
    transport_ms: list[float]
    seconds: float
    batch_sizes: dict = dataclasses.field(default_factory=dict)  # RunInference batches: count, mean, max
    indexed: int = 0
    searchable_ms: list[float] = dataclasses.field(default_factory=list)  # publish → found through the router
    queries: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    page_url: str = ""
    images_dir: str = ""  # the catalogue's photos, kept after the demo; the index's image URLs name images_url
    images_url: str = ""

    @staticmethod
    def percentile(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")


class _Collector(threading.Thread):
    """Pulls a subscription until stopped, keeping every message."""

    def __init__(self, subscription: str):
        super().__init__(daemon=True, name=f"pull-{subscription.rsplit('/', 1)[1]}")
        self.subscription = subscription
        self.messages: list = []
        self.received_ms: list[float] = []
        self._stop_event = threading.Event()

    def run(self):
        from google.cloud import pubsub_v1

        with pubsub_v1.SubscriberClient() as subscriber:
            while not self._stop_event.is_set():
                response = subscriber.pull(subscription=self.subscription, max_messages=200, timeout=5)
                if response.received_messages:
                    subscriber.acknowledge(subscription=self.subscription,
                                           ack_ids=[m.ack_id for m in response.received_messages])
                    now = time.time() * 1000.0
                    self.messages.extend(m.message for m in response.received_messages)
                    self.received_ms.extend(now for _ in response.received_messages)

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=15)


def _millis(message_time) -> float:
    return message_time.timestamp() * 1000.0


def _freshness(message, received_ms: float) -> float:
    """Input publish time (the record's event_time) → a consumer of the output topic has it."""
    event_time = json.loads(message.data)["event_time"]
    return received_ms - dt.datetime.fromisoformat(event_time.replace("Z", "+00:00")).timestamp() * 1000.0


class _SearchableProbe(threading.Thread):
    """Asks the router, every `every_s`, for each record seen on the output topic and not yet found
    (its own vector, k=1) until the product comes back at that version: publish → searchable."""

    def __init__(self, records: _Collector, url: str, every_s: float = 0.25):
        super().__init__(daemon=True, name="searchable-probe")
        self.records, self.url, self.every_s = records, url, every_s
        self.found_ms: dict[str, float] = {}
        self.pending: dict[str, tuple] = {}
        self._stop_event = threading.Event()

    def run(self):
        import requests

        seen = 0
        with requests.Session() as http:
            while not self._stop_event.is_set():
                for message in self.records.messages[seen:]:
                    record = json.loads(message.data)
                    if record["product_id"] != "warm-up" and record["op"] == "upsert":
                        published = dt.datetime.fromisoformat(record["event_time"].replace("Z", "+00:00"))
                        self.pending[record["product_id"]] = (record["version"], record["embedding"],
                                                              published.timestamp() * 1000.0)
                seen = len(self.records.messages)
                for product, (version, vector, published_ms) in list(self.pending.items()):
                    hits = http.post(f"{self.url}/v1/search", json={"vector": vector, "k": 1}, timeout=10).json()
                    top = (hits.get("results") or [{}])[0]
                    if top.get("product_id") == product and top.get("version", -1) >= version:
                        self.found_ms[product] = time.time() * 1000.0 - published_ms
                        del self.pending[product]
                self._stop_event.wait(self.every_s)

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.found_ms) < count and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=15)


def _transport_floor(ps: PubSubEmulator, publisher, samples: int = 50) -> list[float]:
    """The baseline: publish → a consumer has it, through the emulator with no pipeline between."""
    ps.create_topic("transport-floor")
    collector = _Collector(ps.create_subscription("transport-floor", "transport-floor"))
    collector.start()
    for _ in range(samples):
        publisher.publish(ps.topic("transport-floor"), b"x").result(timeout=10)
        time.sleep(0.02)
    collector.wait_for(samples, 30)
    collector.stop()
    return [received - _millis(m.publish_time) for m, received in zip(collector.messages, collector.received_ms)]


DEMO_QUERIES = ("leather ankle boot", "canvas sneaker", "tote bag", "summer dress")
# What the demo index lets a storefront filter and facet on (the catalogue's attributes).
DEMO_FILTERABLE = "brand,category,material,price:float,in_stock:bool"


def _demo_settings():
    from search.fields import parse_filterable
    from search.store import StoreSettings

    return StoreSettings(filterable=parse_filterable(DEMO_FILTERABLE))


COLLECTION = "products"  # --backend qdrant: the collection in <out>/qdrant


def _qdrant_target(out: Path):
    from search.qdrant.collection import QdrantTarget

    return QdrantTarget(collection=COLLECTION, path=str(out / "qdrant"))


def _index_job(ps: PubSubEmulator, out: Path, model: str, backend: str = "faiss") -> StreamingJob:
    """The index pipeline on the embeddings topic, with dead letters of its own."""
    from pipelines import index

    ps.create_topic("index-dlq")
    subscription = ps.create_subscription("product-embeddings", "index-pipeline")
    where = (["--sink", "qdrant", "--collection", COLLECTION, "--qdrant_path", str(out / "qdrant")]
             if backend == "qdrant" else ["--index_dir", str(out / "index"), "--num_shards", "2"])
    config = index.IndexJobConfig.from_options(PipelineOptions([
        "--streaming", "--input_subscription", subscription, *where, "--model", model,
        "--dead_letter_topic", ps.topic("index-dlq"), "--filterable", DEMO_FILTERABLE]))
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming", "--runner", "BundleBasedDirectRunner"]))
    index.build_pipeline(pipeline, config)
    return StreamingJob(pipeline, wake_topic=ps.topic("product-embeddings"))


def _wait_indexed(out: Path, model: str, dim: int, count: int, timeout_s: float, backend: str = "faiss") -> int:
    if backend == "qdrant":
        from search.qdrant.collection import connected

        deadline = time.monotonic() + timeout_s
        with connected(_qdrant_target(out)) as collection:
            while True:
                live = collection.count_live() if collection.layout() else 0
                if live >= count or time.monotonic() > deadline:
                    return live
                time.sleep(0.5)
    from search.sharded import ShardedIndex

    index_dir = out / "index"
    ShardedIndex.ensure_layout(index_dir, 2, model, dim, _demo_settings())
    reader = ShardedIndex.open(index_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        reader.refresh()
        live = reader.stats()["live_docs"]
        if live >= count or time.monotonic() > deadline:
            return live
        time.sleep(0.5)


def run_streaming_demo(products: int, rate: float, model: str, out: Path, *, say=print,
                       search: bool = True, serve: bool = False, burst: int = 1,
                       max_batch_duration_secs: float = 0.0, dataset: str = "embeddings",
                       router: bool = False, backend: str = "faiss") -> DemoReport:
    """`burst` events are published together every `burst / rate` seconds (1: a steady stream).
    `router`: also serve the index as a deployment does (a replica per shard, `search.router` in
    front) and measure publish → searchable through it for every product.

    Give each run in one process its own `dataset`: Beam's BigQuery sink remembers the tables it
    created per process, and a fresh emulator does not have them.
    """
    shutil.rmtree(out, ignore_errors=True)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(ImageServer(out / "images"))
        server.routes["/not-an-image.txt"] = Route(body=b"hello", headers={"Content-Type": "text/plain"})
        catalogue = build_catalogue(out / "images", server.url(""), products)
        broken = broken_events(server.url(""))
        say(f"catalogue:  {len(catalogue)} Fashion-MNIST products + {len(broken)} broken events, "
            f"images at {server.url('')}")
        ps = stack.enter_context(PubSubEmulator(log_dir=out / "logs"))
        bq = stack.enter_context(BigQueryEmulator(log_dir=out / "logs"))
        say(f"emulators:  Pub/Sub at {ps.host}, BigQuery at {bq.endpoint}")
        for name in ("product-events", "product-embeddings", "product-events-dlq"):
            ps.create_topic(name)
        events_sub = ps.create_subscription("product-events", "embed-pipeline")
        records = _Collector(ps.create_subscription("product-embeddings", "demo-records"))
        letters = _Collector(ps.create_subscription("product-events-dlq", "demo-dead-letters"))
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery, pubsub_v1

        bq_client = bigquery.Client(project=ps.project, credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": bq.endpoint})
        bq_client.create_dataset(dataset)

        config = EmbedJobConfig(
            model=ModelConfig(spec=model, max_batch_duration_secs=max_batch_duration_secs),
            images=ImageOptions(FetchConfig(allow_private_hosts=True, retries=1)),
            streaming=True,
            input_subscription=events_sub,
            output_topic=ps.topic("product-embeddings"),
            dead_letter_topic=ps.topic("product-events-dlq"),
            bigquery_table=f"{ps.project}:{dataset}.product_embeddings",
            bigquery_dead_letter_table=f"{ps.project}:{dataset}.dead_letter",
        )
        config.validate("BundleBasedDirectRunner")
        pipeline = beam.Pipeline(options=PipelineOptions(["--streaming", "--runner", "BundleBasedDirectRunner"]))
        embed.build_pipeline(pipeline, config)
        publisher = pubsub_v1.PublisherClient()
        transport = _transport_floor(ps, publisher)
        for collector in (records, letters):
            collector.start()
            stack.callback(collector.stop)
        probe = None
        if search:
            stack.enter_context(_index_job(ps, out, model, backend))
        if search and router:
            from localstack.search_stack import SearchStack
            from model_handlers.backends import embedding_dim
            from search.sharded import ShardedIndex

            ShardedIndex.ensure_layout(out / "index", 2, model, embedding_dim(model), _demo_settings())
            replicas = stack.enter_context(SearchStack(out / "index", 2, out / "logs"))
            say(f"search:     a replica per shard and search.router at {replicas.url}")
            probe = _SearchableProbe(records, replicas.url)
            probe.start()
            stack.callback(probe.stop)
        job = stack.enter_context(StreamingJob(pipeline, wake_topic=ps.topic("product-events")))
        say(f"pipelines:  pipelines.embed --streaming with {model}"
            + (" and pipelines.index --streaming" if search else "") + " on the BundleBasedDirectRunner")

        # Warm-up: the model loads on the first batch; freshness is measured after it.
        warm = dict(catalogue[0].event, event_id="warm-up", product_id="warm-up")
        publisher.publish(ps.topic("product-events"), json.dumps(warm).encode(), event_id="warm-up").result()
        records.wait_for(1, 300)
        warmed = len(records.messages)
        say(f"warm-up:    model loaded, first record out; publishing at {rate:g} events/s ...")

        started = told = time.monotonic()
        lines = [json.dumps(p.event).encode() for p in catalogue]
        every = max(1, len(lines) // (len(broken) + 1))
        for n, message in enumerate(lines):
            if time.monotonic() - told >= 10:  # a line every 10 s, so a long publish is never silent
                told = time.monotonic()
                say(f"            {n} of {len(lines)} events published, {len(records.messages) - warmed} records "
                    f"out, {len(letters.messages)} dead letters")
            publisher.publish(ps.topic("product-events"), message, event_id=catalogue[n].event["event_id"])
            if n % every == 0 and broken:
                publisher.publish(ps.topic("product-events"), broken.pop(0), event_id=f"broken-{n}")
            if (n + 1) % burst == 0:
                time.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
        for message in broken:
            publisher.publish(ps.topic("product-events"), message, event_id="broken-tail")
        records.wait_for(warmed + len(catalogue), 120)
        letters.wait_for(10 + 3, 30)
        if probe:
            probe.wait_for(len(catalogue), 60)
        seconds = time.monotonic() - started
        count_rows = (f"SELECT COUNT(*) AS n FROM `{ps.project}.{dataset}.product_embeddings` "
                      "WHERE event_id != 'warm-up'")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            bq_rows = next(iter(bq_client.query(count_rows).result()))["n"]
            if bq_rows >= len(catalogue):
                break
            time.sleep(1)
        job.stop()

        out_records = [(m, t) for m, t in zip(records.messages, records.received_ms)
                       if m.attributes.get("event_id") != "warm-up"]
        decoded_letters = [json.loads(m.data) for m in letters.messages]
        queries, indexed, page_url = {}, 0, ""
        if search:
            from model_handlers.backends import embedding_dim

            dim = embedding_dim(model)
            indexed = _wait_indexed(out, model, dim, len(out_records) + 1, 60, backend)
            queries, page_url = _search(out, model, dim, serve, say, server.url(""), backend)
        event_letters = [d for d in decoded_letters if not d["image_url"] and d["payload"] != "wake-up"]
        return DemoReport(
            model=model,
            backend=backend,
            rate=rate,
            published=len(catalogue),
            broken=len(broken_events(server.url(""))),
            records=len(out_records),
            images=sum(json.loads(m.data)["image_count"] for m, _ in out_records),
            event_letters=dict(collections.Counter(d["stage"] for d in event_letters)),
            image_letters=sum(1 for d in decoded_letters if d["image_url"]),
            bigquery_rows=int(bq_rows),
            freshness_ms=[_freshness(m, received) for m, received in out_records],
            transport_ms=transport,
            seconds=seconds,
            batch_sizes=_batch_sizes([json.loads(m.data) for m, _ in out_records]),
            indexed=indexed,
            searchable_ms=sorted(probe.found_ms.values()) if probe else [],
            queries=queries,
            page_url=page_url,
            images_dir=str(out / "images"),
            images_url=server.url(""),
        )


def _batch_sizes(records: list[dict], gap_ms: float = 5.0) -> dict:
    """RunInference batches, recovered from the records: a batch's records are stamped within a
    millisecond of each other, and batches are an inference apart (tens of ms on this CPU). The
    pipeline's own `batch_size` metric is not readable after a DirectRunner streaming job is
    cancelled."""
    stamps = sorted(dt.datetime.fromisoformat(r["embedded_at"].replace("Z", "+00:00")).timestamp() * 1000
                    for r in records)
    sizes, size = [], 0
    for previous, current in zip([None] + stamps, stamps):
        if previous is not None and current - previous > gap_ms:
            sizes.append(size)
            size = 0
        size += 1
    if size:
        sizes.append(size)
    return {"batches": len(sizes), "mean": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
            "max": max(sizes, default=0)}


def _search(out: Path, model: str, dim: int, serve: bool, say, images_url: str, backend: str = "faiss"
            ) -> tuple[dict, str]:
    """Starts the search service on the index (or the collection) and runs the demo queries over HTTP."""
    import requests

    from background_server import BackgroundServer
    from search.query.embedder import QueryEmbedder
    from search.server import create_app

    if backend == "qdrant":
        from search.qdrant.index import QdrantIndex

        index = QdrantIndex.open(_qdrant_target(out))
    else:
        from search.sharded import ShardedIndex

        index = ShardedIndex.open(out / "index")
    app = create_app(index, QueryEmbedder(model, dim, fetch=FetchConfig(allow_private_hosts=True)))
    with BackgroundServer(app) as service:
        queries = {}
        for text in DEMO_QUERIES:
            response = requests.post(f"{service.url}/v1/search", json={"text": text, "k": 3}, timeout=60)
            response.raise_for_status()
            queries[text] = response.json()["results"]
        if serve:
            say(f"search page: {service.url}/  (images from {images_url}; Ctrl-C to stop)")
            threading.Event().wait()
        return queries, f"{service.url}/"


def print_report(report: DemoReport, say=print) -> None:
    p = DemoReport.percentile
    say(f"records:    {report.records} of {report.published} products on the output topic "
        f"({report.images} images, {report.images / report.seconds:.1f} images/s)")
    say(f"BigQuery:   {report.bigquery_rows} rows in embeddings.product_embeddings")
    say(f"dead:       {sum(report.event_letters.values())} of {report.broken} broken events: "
        + ", ".join(f"{k}={v}" for k, v in sorted(report.event_letters.items()))
        + f"; plus {report.image_letters} failed-image reports")
    say(f"freshness:  publish -> output topic p50 {p(report.freshness_ms, 50):.0f} ms, "
        f"p99 {p(report.freshness_ms, 99):.0f} ms at {report.rate:g} events/s "
        f"(Pub/Sub alone, publish -> consumer: p50 {p(report.transport_ms, 50):.0f} ms)")
    if report.searchable_ms:
        say(f"searchable: publish -> found through the router p50 {p(report.searchable_ms, 50):.0f} ms, "
            f"p99 {p(report.searchable_ms, 99):.0f} ms ({len(report.searchable_ms)} of {report.published} products)")
    if report.queries:
        where = (f"Qdrant collection {COLLECTION} (local mode, <out>/qdrant)" if report.backend == "qdrant"
                 else "2 shards")
        say(f"index:      {report.indexed} live products in {where} (the catalogue + the warm-up product); "
            "through the query service (keywords and vectors, fused by rank):")
        for text, hits in report.queries.items():
            say(f"  {text!r}: " + "; ".join(f"{h['title']} ({h['attributes'].get('material', '?')}, "
                                            f"{h['attributes'].get('price', 0):.2f})" for h in hits))
        serve = (f"--backend qdrant --qdrant_path <out>/qdrant --collection {COLLECTION}" if report.backend == "qdrant"
                 else "--index_dir <out>/index")
        say(f"search page: {report.page_url} while it runs; `make demo SERVE=1` keeps it up, or afterwards: "
            f"python -m search.server {serve}")
        if report.images_url:
            # The image server stops with the demo; its photos stay on disk, at the paths the index's
            # image URLs name. Without a server there, the page shows a placeholder for each image.
            say(f"             with the product images (the index's image URLs name {report.images_url}): "
                f"python -m localstack.static_server --directory {report.images_dir} "
                f"--port {urllib.parse.urlsplit(report.images_url).port}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m localstack.demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="out/demo", help="where records, dead letters and the index go")
    parser.add_argument("--products", type=int, default=300, help="Fashion-MNIST products to publish")
    parser.add_argument("--rate", type=float, default=5.0, help="events per second")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model spec both pipelines and search use")
    parser.add_argument("--serve", action="store_true", help="keep the search page up until Ctrl-C")
    parser.add_argument("--backend", choices=("faiss", "qdrant"), default="faiss",
                        help="where the index job writes and search reads: the FAISS index, or a Qdrant collection "
                             "(local mode)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.products < 1 or args.rate <= 0:
        parser.error("--products must be at least 1 and --rate positive")
    try:
        check_model(args.model)  # before minutes of emulator start-up
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.WARNING)
    # Ctrl-C and `kill` both unwind the ExitStack, which stops everything the demo started
    # (SIGINT is ignored by default in background jobs, so set it explicitly).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run_streaming_demo(args.products, args.rate, args.model, Path(args.output_dir).resolve(),
                                    serve=args.serve, backend=args.backend)
    except KeyboardInterrupt:
        print("interrupted: emulators, image server and pipeline stopped")
        raise SystemExit(130)
    print_report(report)


if __name__ == "__main__":
    main()
