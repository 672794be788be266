"""The index pipeline: embedding records → the sharded FAISS index that search queries (or a Qdrant collection).

Batch (a backfill from the embed pipeline's files):
    python -m pipelines.index --input_dir out/embeddings --index_dir index/ [--num_shards 4]
Streaming (the embeddings topic):
    python -m pipelines.index --streaming --input_subscription projects/P/subscriptions/S \
        --index_dir index/ [--dead_letter_topic projects/P/topics/D]
Into a Qdrant collection instead (last writer wins in the engine; docs/ARCHITECTURE.md §18):
    python -m pipelines.index ... --sink qdrant --collection products (--qdrant_url URL | --qdrant_path DIR)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter

from pipelines.cli import configure_logging, is_dry_run, launch, parse_options
from pipelines.options import IndexJobConfig, IndexOptions, InvalidOptions, SharedOptions, SinkOptions
from schemas import Stage
from transforms.dead_letter import from_beam_failure
from transforms.index_updater import UpdateIndex, parse_record
from transforms.progress import CountOutcomes, describe_outcomes, read_outcomes
from transforms.pubsub import PublishDeadLetters, ReadEventMessages
from transforms.qdrant_sink import WriteToQdrant
from transforms.sinks import WriteJsonLines

__all__ = ["IndexJobConfig", "IndexOutputs", "build_pipeline", "run"]


class IndexOutputs(NamedTuple):
    commits: beam.PCollection
    dead_letters: beam.PCollection


def build_pipeline(p: beam.Pipeline, config: IndexJobConfig) -> IndexOutputs:
    if config.streaming:
        raw = p | "ReadRecords" >> ReadEventMessages(config.input_subscription)
    else:
        raw = p | "ReadRecords" >> beam.io.ReadFromText(config.input_files, validate=False)
    records, unreadable = raw | "ParseRecords" >> beam.Map(parse_record).with_exception_handling()
    if config.sink == "qdrant":
        updated = records | "WriteToQdrant" >> WriteToQdrant(
            config.qdrant, config.model, config.dim, config.settings, config.commit_batch_size, config.projection)
    else:
        updated = records | "UpdateIndex" >> UpdateIndex(
            config.index_dir, config.model, config.dim, config.num_shards, config.commit_batch_size, config.settings,
            cache_dir=config.cache_dir, stateful=config.stateful_commits, max_delay_secs=config.commit_max_delay_secs,
            finish_compactions=not config.streaming)
    parse_letters = unreadable | "ParseFailures" >> beam.FlatMap(lambda f: from_beam_failure(Stage.PARSE, f))
    # Counted where they are made (a local runner runs what follows a Flatten only at the end).
    _ = records | "CountRecords" >> CountOutcomes("records")
    _ = parse_letters | "CountParseFailures" >> CountOutcomes("dead_letters")
    _ = updated[UpdateIndex.DEAD_LETTER] | "CountRefusals" >> CountOutcomes("dead_letters")
    dead_letters = (parse_letters, updated[UpdateIndex.DEAD_LETTER]) | "AllDeadLetters" >> beam.Flatten()
    if config.dead_letter_dir:
        _ = dead_letters | "WriteDeadLetters" >> WriteJsonLines(f"{config.dead_letter_dir.rstrip('/')}/part")
    if config.dead_letter_topic:
        _ = dead_letters | "PublishDeadLetters" >> PublishDeadLetters(config.dead_letter_topic)
    return IndexOutputs(updated.commits, dead_letters)


def keep_head(index_dir: str, projection: str) -> None:
    """Copies the head the records went through into the index (projection.pt): a search service that
    follows an alias to this index loads it from there (search.server --alias)."""
    import storage
    from search.sharded import HEAD_FILE

    if not storage.is_remote(index_dir):
        Path(index_dir).mkdir(parents=True, exist_ok=True)
    try:
        storage.create_only(f"{index_dir.rstrip('/')}/{HEAD_FILE}", storage.read_bytes(projection))
    except storage.AlreadyExists:
        pass  # kept by an earlier run: the model id, checked against index.json, says it is the same head


def layout_from_input(config: IndexJobConfig) -> IndexJobConfig:
    """A backfill into a new index without `--model`: the model and dimension of the input's first
    upsert, read before the job starts. The job's commits could otherwise meet a shard's batch of
    deletes before any upsert (a shuffled backfill, batches per shard) with no dimension to make the
    index with. Reads the files in order until an upsert; the whole input only when it holds none."""
    from apache_beam.io.filesystems import FileSystems

    if config.streaming or config.model is not None:
        return config
    for match in FileSystems.match([config.input_files]):
        for metadata in sorted(match.metadata_list, key=lambda m: m.path):
            with FileSystems.open(metadata.path) as lines:
                for line in lines:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue  # a dead letter of the job's own parse step
                    if isinstance(record, dict) and record.get("op") == "upsert" and record.get("embedding") \
                            and isinstance(record.get("model"), str) and isinstance(record["embedding"], list):
                        return dataclasses.replace(config, model=record["model"], dim=len(record["embedding"]))
    return config


def summarize(result, config: IndexJobConfig) -> str:
    """The closing line: what was read, what the index now holds, and where."""
    from search.sharded import ShardedIndex

    applied = {name: 0 for name in ("upserted", "deleted", "ignored")}
    for counter in result.metrics().query(MetricsFilter().with_namespace("index"))["counters"]:
        if counter.key.metric.name in applied:
            applied[counter.key.metric.name] += counter.committed or 0
    if config.stateful_commits:
        # A local runner reports no metrics from the batches GroupIntoBatches flushes when the input
        # ends: the counts would be short, so they are not given (the index's own count follows).
        applied_text = "records read (committed in stateful per-shard batches)"
    else:
        applied_text = "records read ({upserted} upserted, {deleted} deleted, {ignored} stale or repeated)".format(
            **applied)
    line = describe_outcomes(read_outcomes(result), records=applied_text)
    if config.qdrant is not None:
        return f"{line}; {_describe_collection(config)}"
    try:
        stats = ShardedIndex.open(config.index_dir).stats()
    except (OSError, ValueError) as e:
        return f"{line}; the index at {config.index_dir} cannot be opened: {e}"
    shards = f"{stats['num_shards']} shard{'s' if stats['num_shards'] != 1 else ''}"
    return (f"{line}; {config.index_dir} holds {stats['live_docs']} live products in {shards} "
            f"({stats['model']}, {stats['dim']}-d, {stats['segment_kind']} segments)")


def _describe_collection(config: IndexJobConfig) -> str:
    """What the collection holds now (live products: tombstones are not counted)."""
    from search.qdrant.collection import connected

    try:
        with connected(config.qdrant) as collection:
            layout = collection.layout()
            live = collection.count_live()
    except Exception as e:  # the summary of a finished job: say why, do not fail it
        return f"{config.destination} cannot be read: {type(e).__name__}: {e}"
    if layout is None:
        return f"{config.destination} was not made (no upsert gave its dimension)"
    return (f"{config.destination} holds {live} live products ({layout['model']}, {layout['dim']}-d, "
            f"{layout['segment_kind']} layout)")


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None):
    options = parse_options(argv, "python -m pipelines.index", __doc__.strip().splitlines()[0],
                            (SharedOptions, IndexOptions, SinkOptions))
    try:
        config = IndexJobConfig.from_options(options)
    except InvalidOptions as e:  # exit status 2, as argparse's refusals; the line is ours to print
        print(e, file=sys.stderr, flush=True)
        raise
    if not is_dry_run(options):
        config = layout_from_input(config)
    if config.projection and config.sink == "faiss" and not is_dry_run(options):
        keep_head(config.index_dir, config.projection)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    return launch(pipeline, options, "index", lambda result: summarize(result, config))


if __name__ == "__main__":
    configure_logging()
    run()
