"""The index pipeline: embedding records → the sharded FAISS index that search queries.

Batch (a backfill from the embed pipeline's files):
    python -m pipelines.index --input_dir out/embeddings --index_dir index/ [--num_shards 4]
Streaming (the embeddings topic):
    python -m pipelines.index --streaming --input_subscription projects/P/subscriptions/S \
        --index_dir index/ [--dead_letter_topic projects/P/topics/D]
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from model_handlers.backends import embedding_dim
from model_handlers.projection import model_id
from pipelines.options import SharedOptions
from schemas import Stage
from search.store import HnswParams, StoreSettings
from transforms.dead_letter import from_beam_failure
from transforms.index_updater import UpdateIndex, parse_record
from transforms.pubsub import PublishDeadLetters, ReadEventMessages
from transforms.sinks import WriteJsonLines

__all__ = ["IndexJobConfig", "IndexOptions", "build_pipeline", "run"]


class IndexOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        # --model, --input_subscription and --dead_letter_topic come from SharedOptions.
        parser.add_argument("--index_dir", help="Directory of the index (one store per shard): a local path, or "
                                                "gs://... (any filesystem Beam knows), mirrored from local stores.")
        parser.add_argument("--cache_dir", help="With a remote --index_dir: where this worker keeps the shards' "
                                                "local stores (default: a directory under the system temp dir).")
        parser.add_argument("--input_dir", help="Directory of JSON-lines records (batch), e.g. out/embeddings.")
        parser.add_argument("--dead_letter_dir", help="Where refused records go in batch mode (JSON lines).")
        parser.add_argument("--num_shards", type=int, default=1, help="Stores the index is split into.")
        parser.add_argument("--commit_batch_size", type=int, default=1000,
                            help="Records per commit at most (a shard's records of a bundle are one commit).")
        parser.add_argument("--hnsw_m", type=int, default=16)
        parser.add_argument("--hnsw_ef_construction", type=int, default=512)


class IndexJobConfig(NamedTuple):
    index_dir: str
    model: str
    dim: int
    num_shards: int
    streaming: bool
    input_dir: str | None
    input_subscription: str | None
    dead_letter_dir: str | None
    dead_letter_topic: str | None
    commit_batch_size: int
    settings: StoreSettings
    cache_dir: str | None = None

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "IndexJobConfig":
        o = options.view_as(IndexOptions)
        shared = options.view_as(SharedOptions)
        streaming = bool(options.view_as(StandardOptions).streaming)
        problems = []
        if not o.index_dir:
            problems.append("--index_dir is required")
        if streaming and not shared.input_subscription:
            problems.append("--input_subscription is required with --streaming")
        if not streaming and not o.input_dir:
            problems.append("--input_dir is required (or pass --streaming with --input_subscription)")
        if o.num_shards < 1 or o.commit_batch_size < 1:
            problems.append("--num_shards and --commit_batch_size must be >= 1")
        try:
            model = model_id(shared.model, shared.projection or "")
            dim = embedding_dim(shared.model, shared.projection or "")
        except ValueError as e:
            problems.append(str(e))
            model, dim = shared.model, 0
        if problems:
            raise SystemExit("invalid options: " + "; ".join(problems))
        return cls(o.index_dir, model, dim, o.num_shards, streaming, o.input_dir, shared.input_subscription,
                   o.dead_letter_dir, shared.dead_letter_topic, o.commit_batch_size,
                   StoreSettings(hnsw=HnswParams(o.hnsw_m, o.hnsw_ef_construction)), o.cache_dir)


class IndexOutputs(NamedTuple):
    commits: beam.PCollection
    dead_letters: beam.PCollection


def build_pipeline(p: beam.Pipeline, config: IndexJobConfig) -> IndexOutputs:
    if config.streaming:
        raw = p | "ReadRecords" >> ReadEventMessages(config.input_subscription)
    else:
        raw = p | "ReadRecords" >> beam.io.ReadFromText(f"{config.input_dir.rstrip('/')}/*.jsonl")
    records, unreadable = raw | "ParseRecords" >> beam.Map(parse_record).with_exception_handling()
    updated = records | "UpdateIndex" >> UpdateIndex(
        config.index_dir, config.model, config.dim, config.num_shards, config.commit_batch_size, config.settings,
        cache_dir=config.cache_dir)
    parse_letters = unreadable | "ParseFailures" >> beam.FlatMap(lambda f: from_beam_failure(Stage.PARSE, f))
    dead_letters = (parse_letters, updated[UpdateIndex.DEAD_LETTER]) | "AllDeadLetters" >> beam.Flatten()
    if config.dead_letter_dir:
        _ = dead_letters | "WriteDeadLetters" >> WriteJsonLines(f"{config.dead_letter_dir.rstrip('/')}/part")
    if config.dead_letter_topic:
        _ = dead_letters | "PublishDeadLetters" >> PublishDeadLetters(config.dead_letter_topic)
    return IndexOutputs(updated.commits, dead_letters)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None):
    options = PipelineOptions(argv)
    config = IndexJobConfig.from_options(options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    result = pipeline.run()
    result.wait_until_finish()
    return result


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
