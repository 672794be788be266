"""The embed pipeline: product-change events → embedding records + dead letters.

    python -m pipelines.embed --input_file 'events/*.jsonl' --output_dir out/ \
        [--model packaged:effnet-lite0+minilm] [--allow_private_hosts] [--runner DirectRunner]

Every input line ends as exactly one embedding record or one event-level dead letter;
images that failed for a product that was still embedded are dead-lettered as well.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import EmbedJobConfig
from transforms.embedding import EmbedProducts
from transforms.events import ParseEvents
from transforms.sinks import WriteJsonLines

__all__ = ["EmbedOutputs", "build_pipeline", "run"]


class EmbedOutputs(NamedTuple):
    records: beam.PCollection
    dead_letters: beam.PCollection


def build_pipeline(p: beam.Pipeline, config: EmbedJobConfig) -> EmbedOutputs:
    messages = p | "ReadEvents" >> beam.io.ReadFromText(config.input_file, coder=BytesCoder())
    parsed = messages | "ParseEvents" >> ParseEvents()
    records, embed_letters = parsed.events | "EmbedProducts" >> EmbedProducts(config.model, config.images)
    output_dir = config.output_dir.rstrip("/")
    sink_letters = records | "WriteEmbeddings" >> WriteJsonLines(f"{output_dir}/embeddings/part")
    dead_letters = (
        (parsed[ParseEvents.DEAD_LETTER], embed_letters, sink_letters) | "AllDeadLetters" >> beam.Flatten()
    )
    # A dead letter that can't be written would be lost: let that fail the job loudly.
    _ = dead_letters | "WriteDeadLetters" >> WriteJsonLines(f"{output_dir}/dead_letter/part")
    return EmbedOutputs(records, dead_letters)


def summarize(result) -> dict[str, int]:
    """The pipeline's counters (namespace `embed`), for the CLI's closing line."""
    counters = result.metrics().query(MetricsFilter().with_namespace("embed"))["counters"]
    totals: dict[str, int] = {}
    for counter in counters:
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    return totals


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None):
    options = PipelineOptions(argv)
    config = EmbedJobConfig.from_options(options)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    result = pipeline.run()
    result.wait_until_finish()
    logging.info("embed pipeline finished: %s", summarize(result))
    return result


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
