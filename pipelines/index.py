"""The index pipeline: embedding records → the sharded FAISS index that search queries.

Batch (a backfill from the embed pipeline's files):
    python -m pipelines.index --input_dir out/embeddings --index_dir index/ [--num_shards 4]
Streaming (the embeddings topic):
    python -m pipelines.index --streaming --input_subscription projects/P/subscriptions/S \
        --index_dir index/ [--dead_letter_topic projects/P/topics/D]
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam

from pipelines.cli import configure_logging, launch, parse_options
from pipelines.options import IndexJobConfig, IndexOptions, SharedOptions
from schemas import Stage
from transforms.dead_letter import from_beam_failure
from transforms.index_updater import UpdateIndex, parse_record
from transforms.progress import CountOutcomes, describe_outcomes, read_outcomes
from transforms.pubsub import PublishDeadLetters, ReadEventMessages
from transforms.sinks import WriteJsonLines

__all__ = ["IndexJobConfig", "IndexOutputs", "build_pipeline", "run"]


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
    _ = records | "CountRecords" >> CountOutcomes("records")
    _ = dead_letters | "CountDeadLetters" >> CountOutcomes("dead_letters")
    return IndexOutputs(updated.commits, dead_letters)


def summarize(result, config: IndexJobConfig) -> str:
    """The closing line: what was read, what the index now holds, and where."""
    from search.sharded import ShardedIndex

    line = describe_outcomes(read_outcomes(result))
    try:
        stats = ShardedIndex.open(config.index_dir).stats()
    except (OSError, ValueError) as e:
        return f"{line}; the index at {config.index_dir} cannot be opened: {e}"
    return (f"{line}; {config.index_dir} holds {stats['live_docs']} live products in {stats['num_shards']} "
            f"shards ({stats['model']}, {stats['dim']}-d)")


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None):
    options = parse_options(argv, "python -m pipelines.index", __doc__.strip().splitlines()[0],
                            (SharedOptions, IndexOptions))
    config = IndexJobConfig.from_options(options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    return launch(pipeline, options, "index", lambda result: summarize(result, config))


if __name__ == "__main__":
    configure_logging()
    run()
