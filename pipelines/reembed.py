"""The re-embed backfill: every live product's latest source state → records of a new model.

    python -m pipelines.reembed --source bigquery:P:DATASET.product_state | --source_dir DIR \
        --model SPEC [--projection HEAD] (--output_topic projects/P/topics/T | --output_dir DIR) [...]

Product state (transforms.product_state) is folded to one current state per product (deleted
products and patch-only ones left out), checked again as an event, and sent through the embed
pipeline's own transforms and sinks: the same batching, the same dead letters. A rollout
(docs/DEPLOY.md §5) starts the new model's streaming embed job first, then runs this: a change made
during the backfill reaches the new index through that job, and the index keeps the newer version
whichever arrives last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Only what parsing the options needs is imported here: the pipeline's transforms (the model libraries
# among them) are imported once the options are accepted, so a bad flag or --help answers in a moment.
from model_handlers.config import DEFAULT_MODEL
from pipelines.cli import configure_logging, launch, parse_options
from pipelines.options import EmbedOptions, ReembedJobConfig, ReembedOptions, SharedOptions

if TYPE_CHECKING:
    import apache_beam as beam

    from pipelines.embed import EmbedOutputs

__all__ = ["build_pipeline", "run"]


def build_pipeline(p: beam.Pipeline, config: ReembedJobConfig) -> EmbedOutputs:
    import apache_beam as beam

    from pipelines.embed import write_outputs
    from schemas import Stage
    from transforms.dead_letter import from_beam_failure
    from transforms.embedding import EmbedProducts
    from transforms.events import ParseEvents
    from transforms.product_state import LatestStates, ReadProductState
    from transforms.progress import CountOutcomes

    states, unreadable = p | "ReadState" >> ReadProductState(config.source)
    messages, unwritable = (states
                            | "LatestStates" >> LatestStates()
                            | "AsEvents" >> beam.Map(lambda state: state.event_json()).with_exception_handling())
    unwritable = unwritable | "Unwritable" >> beam.FlatMap(lambda f: from_beam_failure(Stage.PARSE, f))
    events = messages | "ParseEvents" >> ParseEvents()
    for n, letters in enumerate((unreadable, unwritable, events[ParseEvents.DEAD_LETTER])):
        _ = letters | f"CountParseFailures{n}" >> CountOutcomes("dead_letters")
    records, embed_letters = events.events | "EmbedProducts" >> EmbedProducts(config.embed.model, config.embed.images)
    return write_outputs(records, [unreadable, unwritable, events[ParseEvents.DEAD_LETTER], embed_letters],
                         config.embed)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None):
    options = parse_options(argv, "python -m pipelines.reembed", __doc__.strip().splitlines()[0],
                            (SharedOptions, EmbedOptions, ReembedOptions), defaults={"model": DEFAULT_MODEL})
    config = ReembedJobConfig.from_options(options)
    import apache_beam as beam

    from pipelines.embed import summarize as summarize_embed

    pipeline = test_pipeline or beam.Pipeline(options=options)
    build_pipeline(pipeline, config)
    return launch(pipeline, options, "reembed", lambda result: f"from {config.source}: "
                  + summarize_embed(result, config.embed))


if __name__ == "__main__":
    configure_logging()
    run()
