"""Command-line options of the pipelines, parsed once into frozen, validated configs.

Beam's `PipelineOptions` carries the flags (so Dataflow and Flex Templates see them);
`EmbedJobConfig.from_options` and `IndexJobConfig.from_options` turn them into the typed
objects the transforms take and reject bad combinations at launch, not on a worker: the model
spec and head, names of topics and tables, and (unless it is a dry run) that the input exists
and Pub/Sub answers.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import stat
from pathlib import Path

from apache_beam.options.pipeline_options import (DebugOptions, DirectOptions, PipelineOptions, StandardOptions,
                                                  TestOptions)

import storage
from argtypes import bounded
from model_handlers.backends import check_model, embedding_dim
from model_handlers.config import DEFAULT_MODEL, DEVICES, PRECISIONS, ModelConfig
from pipelines.preflight import PreflightError, check_pubsub
from search.fields import parse_filterable
from search.segment import SEGMENT_KINDS, SegmentParams
from search.sharded import MAX_SHARDS
from search.store import StoreSettings
from media.decode import DEFAULT_MAX_PIXELS
from media.download import FetchConfig
from transforms.bigquery import EMULATOR_ENV, WRITE_METHODS
from transforms.images import ImageOptions
from search.qdrant.collection import API_KEY_ENV, COLLECTION_PATTERN, SECRET_PATTERN, QdrantTarget, url_problem

__all__ = ["EmbedJobConfig", "EmbedOptions", "IndexJobConfig", "IndexOptions", "InvalidOptions", "LaunchOptions",
           "ReembedJobConfig", "ReembedOptions", "SharedOptions", "SinkOptions"]


class InvalidOptions(SystemExit):
    """Flags that do not fit together, refused at launch with argparse's exit status 2; the command line
    prints the message (one line naming the flag)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _flag(value: str) -> bool:
    """Boolean flags take `--flag` or `--flag=true|false` (Flex Templates pass name=value)."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


class SharedOptions(PipelineOptions):
    """Flags both pipelines take. Beam registers every options class on one parser, so a flag may
    be declared once only: the embed and index pipelines read these through `view_as`."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--model",
                            help="open_clip:ARCH[/PRETRAINED] (a tag, or a checkpoint path local or gs://) or "
                                 "packaged:effnet-lite0+minilm. The index pipeline, without it, takes the model its "
                                 "records (or index.json) name.")
        parser.add_argument("--projection",
                            help="A top-tuned head (evaluation.run writes one; local or gs://): records carry "
                                 "tuned vectors under a model id that names it.")
        parser.add_argument("--input_subscription",
                            help="projects/P/subscriptions/S to read (streaming): product events for the embed "
                                 "pipeline, embedding records for the index pipeline.")
        parser.add_argument("--dead_letter_topic", help="projects/P/topics/T for dead letters (streaming).")


class LaunchOptions(PipelineOptions):
    """How the command line waits for a job (pipelines.cli)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--wait", type=_flag, nargs="?", const=True, default=False,
                            help="On a remote runner (Dataflow), wait for the job to finish instead of "
                                 "returning once it is submitted. Local runs always wait.")


class EmbedOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        io = parser.add_argument_group("files mode (batch)")
        io.add_argument("--input_file", help="Glob of JSON-lines event files (batch mode).")
        io.add_argument("--output_dir", help="Directory (local or gs://) for embeddings/ and dead_letter/.")

        stream = parser.add_argument_group("streaming mode (--streaming)")
        stream.add_argument("--output_topic", help="projects/P/topics/T for embedding records (JSON + attributes).")
        stream.add_argument("--timestamp_attribute",
                            help="Message attribute holding the event time (ms since epoch or RFC 3339); "
                                 "none: the publish time.")
        stream.add_argument("--id_label",
                            help="Message attribute Dataflow deduplicates on (e.g. event_id). Dataflow only: "
                                 "the DirectRunner cannot deduplicate.")
        # Records wait up to this long for a fuller batch: past minutes it is no longer a streaming job.
        stream.add_argument("--max_batch_duration_secs", type=bounded(float, 0, 300, "seconds"), default=0.0,
                            help="> 0 turns on stateful batching across bundles: fuller batches on bursty "
                                 "topics, at up to this much added latency; 0: in-bundle batching.")

        bq = parser.add_argument_group("BigQuery (both modes)")
        bq.add_argument("--bigquery_table", help="P:DATASET.TABLE for embedding records (created if needed).")
        bq.add_argument("--bigquery_dead_letter_table", help="P:DATASET.TABLE for dead letters.")
        bq.add_argument("--state_table",
                        help="P:DATASET.product_state for each product's source state (one row per accepted "
                             "event; what pipelines.reembed re-embeds from). Files mode also writes it as "
                             "JSON lines under OUTPUT_DIR/product_state/.")
        bq.add_argument("--bigquery_write_method", default="auto", choices=("auto",) + WRITE_METHODS,
                        help="auto: the Storage Write API on Dataflow, streaming inserts elsewhere "
                             "(and always against an emulator).")

        model = parser.add_argument_group("model")
        model.add_argument("--device", default="auto", choices=DEVICES, help="Where the model runs.")
        model.add_argument("--precision", default="fp32", choices=PRECISIONS,
                           help="fp16/bf16 run under autocast on the device.")
        # Batches are held in memory and run as one forward pass: 4096 products (up to 8 images each) or
        # 4096 images (~2.5 GB of fp32 224x224 pixels) is past what one accelerator takes at once.
        model.add_argument("--min_batch_size", type=bounded(int, 1, 4096), default=1,
                           help="Fewest products per inference batch.")
        model.add_argument("--max_batch_size", type=bounded(int, 1, 4096), default=32,
                           help="Most products per inference batch.")
        model.add_argument("--image_batch_size", type=bounded(int, 1, 4096), default=64,
                           help="Images per forward pass.")
        model.add_argument("--share_model_across_processes", type=_flag, nargs="?", const=True, default=False,
                           help="One model per machine shared by all SDK processes (less memory, less throughput).")
        model.add_argument("--image_weight", type=bounded(float, 0, 1, low_open=True, high_open=True), default=0.5,
                           help="Weight of the image part in the fused vector (0..1, exclusive).")

        images = parser.add_argument_group("images")
        images.add_argument("--allow_private_hosts", type=_flag, nargs="?", const=True, default=False,
                            help="Allow image hosts on loopback (local runs and tests only); private and link-local stay refused.")
        # Each download in flight may hold up to --max_image_bytes: 1024 of the default 20 MB is 20 GB
        # per worker process already. One image body is held whole (1 GiB at most) and decoded (1 Gpx is
        # ~3 GB of RGB). A request slower than 10 minutes is dead; more than 10 retries (with backoff)
        # only delays the dead letter.
        images.add_argument("--max_concurrent_downloads", type=bounded(int, 1, 1024), default=16,
                            help="Images downloading at once per worker process; bounds image memory.")
        images.add_argument("--max_image_bytes", type=bounded(int, 1, 1 << 30), default=FetchConfig.max_bytes,
                            help="Largest image body accepted, in bytes.")
        images.add_argument("--max_image_pixels", type=bounded(int, 1, 1_000_000_000), default=DEFAULT_MAX_PIXELS,
                            help="Largest image accepted, in pixels (decompression-bomb guard).")
        images.add_argument("--download_timeout_secs", type=bounded(float, 0.1, 600, "seconds"),
                            default=FetchConfig.read_timeout_s, help="Connect and read timeout of one image request.")
        images.add_argument("--download_retries", type=bounded(int, 0, 10), default=FetchConfig.retries,
                            help="Retries on 5xx and timeouts, with exponential backoff.")


class ReembedOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        source = parser.add_argument_group("re-embed source (one of)")
        source.add_argument("--source", help="bigquery:P:DATASET.product_state (the table the embed pipeline's "
                                             "--state_table fills, or its latest-state view).")
        source.add_argument("--source_dir", help="A directory of product-state JSON lines (files mode writes them "
                                                 "under OUTPUT_DIR/product_state/).")


class IndexOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        # --model, --projection, --input_subscription and --dead_letter_topic come from SharedOptions.
        parser.add_argument("--index_dir", help="Directory of the index (one store per shard): a local path, or "
                                                "gs://... (any filesystem Beam knows), mirrored from local stores.")
        parser.add_argument("--cache_dir", help="With a remote --index_dir: where this worker keeps the shards' "
                                                "local stores (none: a directory under the system temp dir).")
        parser.add_argument("--input_dir", help="Directory of JSON-lines records (batch), e.g. out/embeddings.")
        parser.add_argument("--dead_letter_dir", help="Where refused records go in batch mode (JSON lines).")
        # Every shard is a store (SQLite + segment files) that the job creates up front and every search
        # replica opens and asks on each query: 3000 took two minutes just to create empty. 1024 shards
        # of ~1M products each is past any catalogue one index serves; resharding is a new index anyway.
        parser.add_argument("--num_shards", type=bounded(int, 1, MAX_SHARDS),
                            help="Stores the index is split into (none: index.json's count, or 1 for a new index).")
        # A commit's records are held in memory and written as one segment (100,000 768-d vectors ~300 MB).
        parser.add_argument("--commit_batch_size", type=bounded(int, 1, 100_000), default=1000,
                            help="Records per commit at most (a shard's records of a bundle are one commit).")
        parser.add_argument("--commit_batching", choices=("auto", "bundle", "stateful"), default="auto",
                            help="How a shard's records become commits: per bundle (no timers: the local "
                                 "runners), or stateful, keyed by shard through GroupIntoBatches, acked by "
                                 "Dataflow only once checkpointed (auto: stateful on a remote runner).")
        # A record is not searchable before its batch commits: minutes would not be streaming any more.
        parser.add_argument("--commit_max_delay_secs", type=bounded(float, 0.01, 300, "seconds"), default=1.0,
                            help="Stateful batching: the longest a record waits for its shard's batch to fill.")
        parser.add_argument("--segment_kind", choices=SEGMENT_KINDS,
                            help="What compaction builds, fixed when the index is made (none: the index's, or "
                                 "hnsw for a new one): hnsw (float vectors in the graph), hnsw_sq8 (8-bit "
                                 "scalar-quantised graph, ~0.3x the memory) or ivf_pq (IVF with PQ codes, ~0.05x); "
                                 "the compressed kinds re-score their candidates with the float vectors on disk.")
        # FAISS's useful ranges: M beyond 256 only costs memory; efConstruction beyond 4096 only build
        # time; nprobe is capped by the lists a segment has (at most 65,536, search.segment).
        parser.add_argument("--hnsw_m", type=bounded(int, 2, 256), default=16,
                            help="HNSW graph degree (FAISS M) of new segments.")
        parser.add_argument("--hnsw_ef_construction", type=bounded(int, 1, 4096), default=512,
                            help="HNSW build breadth (efConstruction) of new segments.")
        parser.add_argument("--ivf_nprobe", type=bounded(int, 1, 65_536), default=32,
                            help="ivf_pq only: inverted lists probed per search, fixed when the index is made.")
        parser.add_argument("--filterable", default="",
                            help="Attributes queries may filter and facet on, fixed when the index is made: "
                                 "name[:type],... with type keyword (the default; also matched as keywords), "
                                 "float, int or bool, e.g. brand,category,price:float,in_stock:bool.")


class SinkOptions(PipelineOptions):
    """Where the index pipeline writes: the FAISS index (IndexOptions' --index_dir) or a Qdrant collection.
    A class of their own: the index Flex Template (deploy/flex_templates.py) lists IndexOptions, and will
    take these once it launches the Qdrant sink."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--sink", choices=SINKS, default="faiss",
                            help="Where the records go: faiss (the sharded FAISS index in --index_dir) or qdrant "
                                 "(a Qdrant collection, last writer wins in the engine: --collection with "
                                 "--qdrant_url or --qdrant_path).")
        qdrant = parser.add_argument_group("Qdrant sink (--sink qdrant)")
        qdrant.add_argument("--collection", help="The Qdrant collection, made from the index layout flags if missing.")
        qdrant.add_argument("--qdrant_url", help="A Qdrant server, http(s)://HOST[:PORT]; the API key comes from "
                                                 "--qdrant_api_key_secret or the QDRANT_API_KEY environment variable.")
        qdrant.add_argument("--qdrant_path", help="A local directory instead of a server: qdrant-client's local mode "
                                                  "(local runners, one process; tests and demos).")
        qdrant.add_argument("--qdrant_api_key_secret",
                            help="projects/P/secrets/S[/versions/V]: the Secret Manager secret holding the API key, "
                                 "read by the workers (none: QDRANT_API_KEY, if set, on a local runner).")
        # A request slower than 10 minutes is dead; more than 10 retries (with backoff up to 30 s each)
        # only delays the bundle's failure, which Beam retries anyway.
        qdrant.add_argument("--qdrant_timeout_secs", type=bounded(int, 1, 600), default=10,
                            help="Timeout of one request to the Qdrant server, in seconds.")
        qdrant.add_argument("--qdrant_shards", type=bounded(int, 0, 1024), default=0,
                            help="A new collection's shards (0: the engine's default, one per node); fixed when "
                                 "it is made. A multiple of the node count lets the engine spread them evenly.")
        qdrant.add_argument("--qdrant_replication_factor", type=bounded(int, 0, 16), default=0,
                            help="A new collection's copies of each shard (0: the engine's default, 1; 2 keeps "
                                 "serving through a node's loss).")
        qdrant.add_argument("--qdrant_retries", type=bounded(int, 0, 10), default=5,
                            help="Retries of a transient failure (connection, timeout, 429, 5xx), with exponential "
                                 "backoff, before the bundle fails and Beam retries it.")


SINKS = ("faiss", "qdrant")
QDRANT_FLAGS = ("collection", "qdrant_url", "qdrant_path", "qdrant_api_key_secret")
LOCAL_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "FnApiRunner", "PrismRunner")
# Resource names as Pub/Sub and BigQuery define them; the Flex Template metadata uses the same patterns.
TOPIC_PATTERN = r"^projects/[a-z][-a-z0-9]{4,61}[a-z0-9]/topics/[A-Za-z][-\w.~+%]{2,254}$"
SUBSCRIPTION_PATTERN = r"^projects/[a-z][-a-z0-9]{4,61}[a-z0-9]/subscriptions/[A-Za-z][-\w.~+%]{2,254}$"
TABLE_PATTERN = r"^[a-z][-a-z0-9]{4,61}[a-z0-9][:.][A-Za-z0-9_]{1,1024}\.[-\w ]{1,1024}$"
_TOPIC, _SUBSCRIPTION, _TABLE = re.compile(TOPIC_PATTERN), re.compile(SUBSCRIPTION_PATTERN), re.compile(TABLE_PATTERN)


@dataclasses.dataclass(frozen=True)
class EmbedJobConfig:
    model: ModelConfig
    images: ImageOptions
    input_file: str | None = None
    output_dir: str | None = None
    streaming: bool = False
    input_subscription: str | None = None
    output_topic: str | None = None
    dead_letter_topic: str | None = None
    timestamp_attribute: str | None = None
    id_label: str | None = None
    bigquery_table: str | None = None
    bigquery_dead_letter_table: str | None = None
    bigquery_write_method: str = "STREAMING_INSERTS"
    state_table: str | None = None

    @classmethod
    def from_options(cls, options: PipelineOptions, preflight: bool = True, backfill: bool = False) -> "EmbedJobConfig":
        """`preflight`: also ask whether the input exists and Pub/Sub answers (never on a dry run).
        `backfill`: the sinks of pipelines.reembed, whose input is product state, not events."""
        o = options.view_as(EmbedOptions)
        shared = options.view_as(SharedOptions)
        try:
            model = ModelConfig(
                spec=shared.model or DEFAULT_MODEL,
                device=o.device,
                precision=o.precision,
                min_batch_size=o.min_batch_size,
                max_batch_size=o.max_batch_size,
                image_batch_size=o.image_batch_size,
                share_model_across_processes=o.share_model_across_processes,
                image_weight=o.image_weight,
                max_batch_duration_secs=o.max_batch_duration_secs,
                projection=shared.projection or "",
            )
            check_model(model.spec, model.projection, check_remote=not options.view_as(TestOptions).dry_run)
            for flag, value, least in (("download_timeout_secs", o.download_timeout_secs, 1e-9),
                                       ("max_image_bytes", o.max_image_bytes, 1), ("download_retries", o.download_retries, 0),
                                       ("max_concurrent_downloads", o.max_concurrent_downloads, 1)):
                if value < least:
                    raise ValueError(f"--{flag} must be {'positive' if least else 'at least 0'}, got {value}")
            fetch = FetchConfig(
                connect_timeout_s=min(5.0, o.download_timeout_secs),
                read_timeout_s=o.download_timeout_secs,
                max_bytes=o.max_image_bytes,
                retries=o.download_retries,
                allow_private_hosts=o.allow_private_hosts,
                max_concurrent_downloads=o.max_concurrent_downloads,
            )
            if o.max_image_pixels <= 0:
                raise ValueError("max_image_pixels must be positive")
        except ValueError as e:
            raise SystemExit(f"invalid options: {e}") from e
        runner = options.view_as(StandardOptions).runner or "DirectRunner"
        threads = options.view_as(DebugOptions).number_of_worker_harness_threads
        if threads is not None and threads < 1:
            raise SystemExit("invalid options: --number_of_worker_harness_threads must be at least 1")
        config = cls(
            model=model,
            images=ImageOptions(fetch, o.max_image_pixels),
            input_file=o.input_file,
            output_dir=o.output_dir,
            streaming=bool(options.view_as(StandardOptions).streaming),
            input_subscription=shared.input_subscription,
            output_topic=o.output_topic,
            dead_letter_topic=shared.dead_letter_topic,
            timestamp_attribute=o.timestamp_attribute,
            id_label=o.id_label,
            bigquery_table=o.bigquery_table,
            bigquery_dead_letter_table=o.bigquery_dead_letter_table,
            bigquery_write_method=_write_method(o.bigquery_write_method, runner),
            state_table=o.state_table,
        )
        config.validate(runner, backfill)
        if o.device == "cuda" and runner in LOCAL_RUNNERS:
            check_local_cuda()
        if preflight:
            config.preflight(remote=not options.view_as(TestOptions).dry_run)
        return config

    def preflight(self, remote: bool = True) -> None:
        """What can only be checked by looking: the input exists, the output can be written, and
        (`remote`: not in a dry run) Pub/Sub and object storage answer within seconds."""
        try:
            if self.input_file and (remote or not storage.is_remote(self.input_file)):
                check_input_matches(self.input_file, "--input_file")
            if self.output_dir:
                check_writable_dir(self.output_dir, "--output_dir")
            if (self.streaming or self.output_topic) and remote:
                check_pubsub(self.input_subscription, (self.output_topic, self.dead_letter_topic))
        except PreflightError as e:
            raise SystemExit(f"cannot start: {e}") from e

    def validate(self, runner: str = "DirectRunner", backfill: bool = False) -> None:
        """Rejects combinations that would only fail later, on a worker."""
        problems = []
        if backfill:
            if self.streaming:
                problems.append("a backfill is a batch job: drop --streaming (changes during it come through the "
                                "new model's streaming embed job)")
            for flag in ("input_file", "input_subscription", "timestamp_attribute", "id_label", "state_table"):
                if getattr(self, flag):
                    problems.append(f"--{flag} is not an option of a backfill")
            if not (self.output_topic or self.output_dir or self.bigquery_table):
                problems.append("give where the records go: --output_topic, --output_dir or --bigquery_table")
        elif self.streaming:
            for flag in ("input_subscription", "output_topic", "dead_letter_topic"):
                if not getattr(self, flag):
                    problems.append(f"--{flag} is required with --streaming")
            for flag in ("input_file", "output_dir"):
                if getattr(self, flag):
                    problems.append(f"--{flag} is for the files mode; streaming writes to topics and BigQuery")
            if self.bigquery_write_method == "FILE_LOADS":
                problems.append("--bigquery_write_method FILE_LOADS is for batch; streaming uses "
                                "STORAGE_WRITE_API or STREAMING_INSERTS")
        else:
            for flag in ("input_file", "output_dir"):
                if not getattr(self, flag):
                    problems.append(f"--{flag} is required (or pass --streaming with Pub/Sub options)")
            for flag in ("input_subscription", "output_topic", "dead_letter_topic", "timestamp_attribute", "id_label"):
                if getattr(self, flag):
                    problems.append(f"--{flag} needs --streaming")
        if not self.streaming and self.model.max_batch_duration_secs:
            problems.append("--max_batch_duration_secs (stateful batching) needs --streaming")
        if self.id_label and runner in LOCAL_RUNNERS:
            problems.append(f"--id_label is Dataflow-only: the {runner} cannot deduplicate on it (and stalls)")
        for flag, pattern in (("input_subscription", _SUBSCRIPTION), ("output_topic", _TOPIC),
                              ("dead_letter_topic", _TOPIC), ("bigquery_table", _TABLE),
                              ("bigquery_dead_letter_table", _TABLE), ("state_table", _TABLE)):
            value = getattr(self, flag)
            if value and not pattern.match(value):
                problems.append(f"--{flag} {value!r} is not a valid name")
        if problems:
            raise SystemExit("invalid options: " + "; ".join(problems))


_STATE_SOURCE = re.compile(r"^bigquery:" + TABLE_PATTERN[1:])


@dataclasses.dataclass(frozen=True)
class ReembedJobConfig:
    """The backfill: product state from `source` (`bigquery:P:D.T`, or a directory of JSON lines) through
    the embed pipeline's transforms and sinks (`embed`)."""

    source: str
    embed: EmbedJobConfig

    @classmethod
    def from_options(cls, options: PipelineOptions, preflight: bool = True) -> "ReembedJobConfig":
        o = options.view_as(ReembedOptions)
        if bool(o.source) == bool(o.source_dir):
            raise SystemExit("invalid options: give exactly one of --source bigquery:P:DATASET.TABLE and "
                             "--source_dir DIR")
        if o.source and not _STATE_SOURCE.match(o.source):
            raise SystemExit(f"invalid options: --source {o.source!r} is not bigquery:PROJECT:DATASET.TABLE")
        embed = EmbedJobConfig.from_options(options, preflight, backfill=True)
        if preflight and o.source_dir and not options.view_as(TestOptions).dry_run:
            try:
                check_input_matches(f"{glob.escape(o.source_dir.rstrip('/'))}/*.jsonl", "--source_dir")
            except PreflightError as e:
                raise SystemExit(f"cannot start: {e}") from e
        return cls(source=o.source or o.source_dir, embed=embed)


@dataclasses.dataclass(frozen=True)
class IndexJobConfig:
    """The index job. `model` and `dim` are None/0 until known: from `--model`, else from the
    index's `index.json` (the collection's layout), else from the first record the job receives (see
    UpdateIndex). `sink`: faiss, the index in `index_dir`, or qdrant, the collection `qdrant` names
    (then `index_dir` is empty and `num_shards` 1)."""

    index_dir: str
    num_shards: int
    settings: StoreSettings
    model: str | None = None
    dim: int = 0
    streaming: bool = False
    input_dir: str | None = None
    input_subscription: str | None = None
    dead_letter_dir: str | None = None
    dead_letter_topic: str | None = None
    commit_batch_size: int = 1000
    cache_dir: str | None = None
    stateful_commits: bool = False
    commit_max_delay_secs: float = 1.0
    projection: str = ""  # the head the records' vectors went through (kept with the index)
    sink: str = "faiss"
    qdrant: QdrantTarget | None = None

    @property
    def destination(self) -> str:
        """What the job writes, in words: the index directory, or the Qdrant collection and where it is."""
        return self.qdrant.where if self.qdrant else self.index_dir

    @classmethod
    def from_options(cls, options: PipelineOptions, preflight: bool = True) -> "IndexJobConfig":
        """`preflight`: also ask whether the input exists and Pub/Sub answers (never on a dry run)."""
        o = options.view_as(IndexOptions)
        sink = options.view_as(SinkOptions)
        shared = options.view_as(SharedOptions)
        streaming = bool(options.view_as(StandardOptions).streaming)
        dry_run = bool(options.view_as(TestOptions).dry_run)
        remote_runner = (options.view_as(StandardOptions).runner or "DirectRunner") not in LOCAL_RUNNERS
        sink_problems = _sink_problems(o, sink, options, remote_runner)
        if sink_problems:
            raise InvalidOptions("invalid options: " + "; ".join(sink_problems))
        problems = []
        if sink.sink == "faiss" and not o.index_dir:
            problems.append("--index_dir is required")
        if streaming and not shared.input_subscription:
            problems.append("--input_subscription is required with --streaming")
        if not streaming and not o.input_dir:
            problems.append("--input_dir is required (or pass --streaming with --input_subscription)")
        if (o.num_shards is not None and o.num_shards < 1) or o.commit_batch_size < 1:
            problems.append("--num_shards and --commit_batch_size must be >= 1")
        if not o.commit_max_delay_secs > 0:
            problems.append("--commit_max_delay_secs must be > 0")
        if o.hnsw_m < 2 or o.hnsw_m > 256 or o.hnsw_ef_construction < 1:
            problems.append("--hnsw_m must be 2..256 and --hnsw_ef_construction >= 1")
        if o.ivf_nprobe < 1:
            problems.append("--ivf_nprobe must be >= 1")
        try:
            filterable = parse_filterable(o.filterable)
        except ValueError as e:
            problems.append(f"--filterable: {e}")
        if remote_runner and o.index_dir and not storage.is_remote(o.index_dir):
            problems.append(f"--index_dir {o.index_dir} is a path on each worker's own disk: on a remote runner "
                            f"the index must be on object storage (gs://...), where search replicas read it")
        if remote_runner and o.commit_batching == "bundle" and sink.sink == "faiss":
            problems.append("--commit_batching bundle on a remote runner: commits would follow bundles, not the "
                            "per-shard state Dataflow checkpoints before it acks; use stateful (or auto)")
        if shared.projection and not shared.model:
            problems.append("--projection needs --model (the model the head was trained on)")
        model, dim = None, 0
        if shared.model:
            try:
                check_model(shared.model, shared.projection or "", check_remote=not dry_run)
                model = ModelConfig(spec=shared.model, projection=shared.projection or "").model_id
                dim = embedding_dim(shared.model, shared.projection or "")
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise SystemExit("invalid options: " + "; ".join(problems))
        # An existing index (collection) decides what --model and --num_shards leave open (reading a
        # remote one needs the object store or the server, which a dry run does not reach).
        target = None
        if sink.sink == "qdrant":
            target = QdrantTarget(collection=sink.collection, url=sink.qdrant_url or "", path=sink.qdrant_path or "",
                                  api_key_secret=sink.qdrant_api_key_secret or "", timeout_s=sink.qdrant_timeout_secs,
                                  retries=sink.qdrant_retries, shards=sink.qdrant_shards,
                                  replication=sink.qdrant_replication_factor)
            where = target.where
            layout = None if dry_run else _existing_collection(target)
        else:
            where = o.index_dir
            layout = None if dry_run else _existing_layout(o.index_dir)
        if layout:
            if o.num_shards and o.num_shards != layout["num_shards"]:
                raise SystemExit(f"invalid options: --num_shards {o.num_shards}, but {o.index_dir} has "
                                 f"{layout['num_shards']} shard(s) (resharding is a new index)")
            if model is not None and layout["dim"] and (model, dim) != (layout["model"], layout["dim"]):
                raise SystemExit(f"invalid options: --model makes {model} ({dim}-d) vectors, but {where} "
                                 f"indexes {layout['model']} ({layout['dim']}-d)")
            kind = layout.get("segment_kind", "hnsw")
            if o.segment_kind and o.segment_kind != kind:
                raise SystemExit(f"invalid options: --segment_kind {o.segment_kind}, but {where} is an index "
                                 f"of {kind} segments (a kind is fixed when the index is made: build a new one)")
            declared = parse_filterable(layout.get("filterable", []))
            if o.filterable and set(filterable) != set(declared):  # the same fields in another order are the same
                raise SystemExit(f"invalid options: --filterable {o.filterable}, but {where} filters on "
                                 f"{','.join(map(str, declared)) or 'no attributes'} (fixed when the index is made)")
            if layout["dim"]:  # 0: made from a delete by an earlier version; the first upsert repairs it
                model, dim = layout["model"], layout["dim"]
            filterable = declared
        else:
            kind = o.segment_kind or "hnsw"
        num_shards = o.num_shards or (layout or {}).get("num_shards", 1)
        config = cls(index_dir=o.index_dir or "", num_shards=num_shards,
                     settings=StoreSettings(segment=SegmentParams(kind, o.hnsw_m, o.hnsw_ef_construction, o.ivf_nprobe),
                                            filterable=filterable), model=model, dim=dim,
                     streaming=streaming, input_dir=o.input_dir, input_subscription=shared.input_subscription,
                     dead_letter_dir=o.dead_letter_dir, dead_letter_topic=shared.dead_letter_topic,
                     commit_batch_size=o.commit_batch_size, cache_dir=o.cache_dir,
                     stateful_commits=sink.sink == "faiss" and (o.commit_batching == "stateful" or
                                                             o.commit_batching == "auto" and remote_runner),
                     commit_max_delay_secs=o.commit_max_delay_secs, projection=shared.projection or "",
                     sink=sink.sink, qdrant=target)
        if preflight:
            config.preflight(remote=not dry_run)
        return config

    @property
    def input_files(self) -> str:
        """The glob of the record files under `input_dir` that the batch job reads; the directory's own
        glob characters escaped (a directory `sale[2024]` is that directory, not a character class)."""
        return f"{glob.escape(self.input_dir.rstrip('/'))}/*.jsonl"

    def preflight(self, remote: bool = True) -> None:
        """As the embed job's: input, writable output, and (`remote`) Pub/Sub and object storage."""
        try:
            if self.input_dir and (remote or not storage.is_remote(self.input_dir)):
                check_input_dir(self.input_dir, self.input_files, "--input_dir")
            for flag, path in (("--index_dir", self.index_dir), ("--dead_letter_dir", self.dead_letter_dir),
                               ("--qdrant_path", self.qdrant.path if self.qdrant else "")):
                if path:
                    check_writable_dir(path, flag)
            if self.streaming and remote:
                check_pubsub(self.input_subscription, (self.dead_letter_topic,))
        except PreflightError as e:
            raise SystemExit(f"cannot start: {e}") from e


def _sink_problems(o: IndexOptions, sink: SinkOptions, options: PipelineOptions,
                   remote_runner: bool) -> list[str]:
    """The sink's flags that do not fit together (InvalidOptions, exit 2): the Qdrant flags without
    `--sink qdrant`; with it, the collection and exactly one of a server and a local directory, and
    none of the FAISS index's own flags."""
    if sink.sink != "qdrant":
        given = [f"--{flag}" for flag in QDRANT_FLAGS if getattr(sink, flag)]
        return [f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --sink qdrant"] if given else []
    problems = []
    if not sink.collection:
        problems.append("--collection is required with --sink qdrant")
    elif not re.match(COLLECTION_PATTERN, sink.collection):
        problems.append(f"--collection {sink.collection!r} is not a valid name (letters, digits, _ . -; at most 255)")
    if sink.qdrant_url and sink.qdrant_path:
        problems.append("--qdrant_url and --qdrant_path exclude each other: the collection is on a server or in a "
                        "local directory")
    elif not (sink.qdrant_url or sink.qdrant_path):
        problems.append("--qdrant_url URL or --qdrant_path DIR is required with --sink qdrant")
    for flag in ("index_dir", "cache_dir", "num_shards"):
        if getattr(o, flag) is not None:
            problems.append(f"--{flag} is for --sink faiss: the Qdrant sink writes to --collection")
    if o.commit_batching == "stateful":
        problems.append("--commit_batching stateful is for --sink faiss: the Qdrant sink writes per bundle (every "
                        "write is conditional, so a replayed bundle changes nothing)")
    if sink.qdrant_url and (problem := url_problem(sink.qdrant_url)):
        problems.append(f"--qdrant_url {problem}")
    if sink.qdrant_api_key_secret:
        if sink.qdrant_path:
            problems.append("--qdrant_api_key_secret is for --qdrant_url: a local directory takes no API key")
        elif not re.match(SECRET_PATTERN, sink.qdrant_api_key_secret):
            problems.append(f"--qdrant_api_key_secret {sink.qdrant_api_key_secret!r} is not "
                            f"projects/P/secrets/S[/versions/V]")
    elif sink.qdrant_url and remote_runner and os.environ.get(API_KEY_ENV):
        problems.append(f"--qdrant_api_key_secret is needed on a remote runner: {API_KEY_ENV} is set here, but the "
                        f"workers do not see this machine's environment")
    if sink.qdrant_path and remote_runner:
        problems.append(f"--qdrant_path {sink.qdrant_path} is a directory on each worker's own disk: on a remote runner "
                        f"use --qdrant_url")
    if sink.qdrant_path and options.view_as(DirectOptions).direct_running_mode == "multi_processing":
        problems.append("--qdrant_path is opened by one process at a time (qdrant-client's local mode locks it): "
                        "not with --direct_running_mode multi_processing; use --qdrant_url")
    return problems


def _existing_collection(target: QdrantTarget) -> dict | None:
    """The collection's layout, or None when there is none yet; asked of the server (or the local
    directory) at launch, so an unreachable server, a refused API key or a collection of other vectors
    is one line before the job starts."""
    from search.qdrant.collection import LayoutMismatch, QdrantUnavailable, connected, describe_failure

    try:
        if target.path:
            check_writable_dir(target.path, "--qdrant_path")
        with connected(target) as collection:
            return collection.layout()
    except PreflightError as e:
        raise SystemExit(f"cannot start: {e}") from e
    except LayoutMismatch as e:
        raise SystemExit(f"invalid options: --collection: {e}") from e
    except QdrantUnavailable as e:
        raise SystemExit(f"cannot start: {e}") from e
    except Exception as e:
        raise SystemExit(f"cannot start: {describe_failure(e, target)}") from e


def _existing_layout(index_dir: str) -> dict | None:
    from search.sharded import ShardedIndex

    try:
        return ShardedIndex.layout(index_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot start: cannot read {index_dir}/index.json: {e}") from e


def check_input_matches(pattern: str, flag: str) -> None:
    """PreflightError unless the glob matches at least one file (Beam would raise deep in the graph)."""
    try:
        if not storage.match(pattern):
            raise PreflightError(f"{flag}: {pattern} matches no files")
    except storage.Unreachable as e:
        raise PreflightError(f"{flag}: {e}") from e


def check_input_dir(directory: str, pattern: str, flag: str) -> None:
    """PreflightError unless a local `directory` can be listed and holds `*.jsonl` files that are all
    regular files this process can read: Beam would fail on an unreadable one with a long traceback,
    and read a directory or a FIFO named *.jsonl as no records. `pattern` (the glob the job reads)
    is matched instead for object storage."""
    if storage.is_remote(directory):
        check_input_matches(pattern, flag)
        return
    try:
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries if entry.name.endswith(".jsonl"))
    except FileNotFoundError as e:
        raise PreflightError(f"{flag} {directory} does not exist") from e
    except NotADirectoryError as e:
        raise PreflightError(f"{flag} {directory} is a file, not the directory of *.jsonl files to read") from e
    except OSError as e:
        raise PreflightError(f"{flag} {directory} cannot be read: {e.strerror or e}") from e
    if not names:
        raise PreflightError(f"{flag}: {directory.rstrip('/')}/*.jsonl matches no files")
    for name in names:
        path = os.path.join(directory, name)
        try:
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise PreflightError(f"{flag}: {path} is a directory, not a file of records")
            if not stat.S_ISREG(mode):
                raise PreflightError(f"{flag}: {path} is not a regular file (a FIFO, socket or device is not "
                                     f"read as records)")
            with open(path, "rb"):
                pass
        except OSError as e:
            raise PreflightError(f"{flag}: cannot read {path}: {e.strerror or e}") from e


def check_writable_dir(path: str, flag: str) -> None:
    """PreflightError unless a local `path` is a directory this process can write, or can create
    (object storage is checked by writing to it, on the workers)."""
    if storage.is_remote(path):
        return
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise PreflightError(f"{flag} {path} is a file, not a directory")
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{flag} {path} cannot be written ({existing} is not a writable directory)")


def check_local_cuda() -> None:
    """A local runner runs the model on this machine: --device cuda needs a GPU here."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("invalid options: --device cuda, but torch sees no CUDA device on this machine "
                         "(a local runner runs the model here; use --device auto or cpu)")


def _write_method(requested: str, runner: str) -> str:
    emulated = bool(os.environ.get(EMULATOR_ENV))
    if requested == "auto":
        return "STORAGE_WRITE_API" if runner == "DataflowRunner" and not emulated else "STREAMING_INSERTS"
    if requested == "STORAGE_WRITE_API" and emulated:
        raise SystemExit(f"invalid options: {EMULATOR_ENV} is set and the emulator has no Storage Write API; "
                         "use STREAMING_INSERTS")
    return requested
