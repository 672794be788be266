"""The embed pipeline: product-change events → embedding records + dead letters.

Files mode (batch):
    python -m pipelines.embed --input_file 'events/*.jsonl' --output_dir out/ [--bigquery_table P:D.T]
Streaming mode:
    python -m pipelines.embed --streaming --input_subscription projects/P/subscriptions/S \
        --output_topic projects/P/topics/T --dead_letter_topic projects/P/topics/D [--bigquery_table P:D.T]
        [--state_table P:D.product_state]

One builder, two sources, the same transforms in between.

Every input line ends as exactly one embedding record or one event-level dead letter;
images that failed for a product that was still embedded are dead-lettered as well.
Every accepted event also leaves its product's source state (transforms.product_state): JSON lines
under OUTPUT_DIR/product_state/ in files mode, and `--state_table` in BigQuery; a new model is
re-embedded from it (pipelines.reembed).
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam.coders import BytesCoder

from model_handlers.config import DEFAULT_MODEL
from pipelines.cli import configure_logging, launch, parse_options
from pipelines.options import EmbedJobConfig, EmbedOptions, SharedOptions
from schemas import DeadLetter, EmbeddingRecord, ProductState
from transforms.bigquery import WriteToBigQueryTable
from transforms.embedding import EmbedProducts
from transforms.events import ParseEvents
from transforms.progress import CountOutcomes, describe_outcomes, read_outcomes
from transforms.pubsub import PublishDeadLetters, PublishRecords, ReadEventMessages
from transforms.sinks import WriteJsonLines

__all__ = ["EmbedOutputs", "build_pipeline", "run", "write_outputs"]


class EmbedOutputs(NamedTuple):
    records: beam.PCollection
    dead_letters: beam.PCollection


def build_pipeline(p: beam.Pipeline, config: EmbedJobConfig) -> EmbedOutputs:
    if config.streaming:
        messages = p | "ReadEvents" >> ReadEventMessages(
            config.input_subscription, config.timestamp_attribute, config.id_label)
    else:
        messages = p | "ReadEvents" >> beam.io.ReadFromText(config.input_file, coder=BytesCoder(), validate=False)
    parsed = messages | "ParseEvents" >> ParseEvents()
    _ = parsed[ParseEvents.DEAD_LETTER] | "CountParseFailures" >> CountOutcomes("dead_letters")
    records, embed_letters = parsed.events | "EmbedProducts" >> EmbedProducts(config.model, config.images)
    state_letters = write_state(parsed.events, config)
    return write_outputs(records, [parsed[ParseEvents.DEAD_LETTER], embed_letters, *state_letters], config)


def write_state(events: beam.PCollection, config: EmbedJobConfig) -> list[beam.PCollection]:
    """Each accepted event's product state, to the JSON lines and the table configured; their dead letters."""
    if not (config.output_dir or config.state_table):
        return []
    states = events | "ProductState" >> beam.Map(ProductState.of_event)
    letters = []
    if config.output_dir:
        letters.append(states | "WriteState" >> WriteJsonLines(f"{config.output_dir.rstrip('/')}/product_state/part"))
    if config.state_table:
        letters.append(states | "StateToBigQuery" >> WriteToBigQueryTable(
            config.state_table, ProductState, config.bigquery_write_method, "recorded_at"))
    for n, failed in enumerate(letters):
        _ = failed | f"CountStateFailures{n}" >> CountOutcomes("dead_letters")
    return letters


def write_outputs(records: beam.PCollection, dead_letters: list[beam.PCollection],
                  config: EmbedJobConfig) -> EmbedOutputs:
    """Records to every configured sink; `dead_letters` and the sinks' own to the dead-letter sinks.
    The embed and the re-embed pipelines end in the same sinks."""
    sink_letters = []
    if config.output_dir:
        sink_letters.append(records | "WriteEmbeddings" >> WriteJsonLines(f"{config.output_dir.rstrip('/')}/embeddings/part"))
    if config.output_topic:
        sink_letters.append(records | "PublishEmbeddings" >> PublishRecords(config.output_topic))
    if config.bigquery_table:
        sink_letters.append(records | "EmbeddingsToBigQuery" >> WriteToBigQueryTable(
            config.bigquery_table, EmbeddingRecord, config.bigquery_write_method, "embedded_at"))
    for n, letters in enumerate(sink_letters):
        _ = letters | f"CountSinkFailures{n}" >> CountOutcomes("dead_letters")
    dead_letters = [*dead_letters, *sink_letters] | "AllDeadLetters" >> beam.Flatten()
    # Dead letters are the last resort: a dead letter that can't be written fails the job loudly.
    if config.output_dir:
        _ = dead_letters | "WriteDeadLetters" >> WriteJsonLines(f"{config.output_dir.rstrip('/')}/dead_letter/part")
    if config.dead_letter_topic:
        _ = dead_letters | "PublishDeadLetters" >> PublishDeadLetters(config.dead_letter_topic)
    if config.bigquery_dead_letter_table:
        _ = dead_letters | "DeadLettersToBigQuery" >> WriteToBigQueryTable(
            config.bigquery_dead_letter_table, DeadLetter, config.bigquery_write_method, "failed_at")
    return EmbedOutputs(records, dead_letters)


def summarize(result, config: EmbedJobConfig) -> str:
    """The closing line: what came out, and where it went."""
    where = [f"{config.output_dir.rstrip('/')}/{{embeddings,dead_letter}}/"] if config.output_dir else []
    where += [name for name in (config.output_topic, config.bigquery_table, config.state_table) if name]
    return describe_outcomes(read_outcomes(result)) + (f"; written to {', '.join(where)}" if where else "")


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None):
    options = parse_options(argv, "python -m pipelines.embed", __doc__.strip().splitlines()[0],
                            (SharedOptions, EmbedOptions), defaults={"model": DEFAULT_MODEL})
    config = EmbedJobConfig.from_options(options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    return launch(pipeline, options, "embed", lambda result: summarize(result, config))


if __name__ == "__main__":
    configure_logging()
    run()
