"""`EmbedProducts`: validated events → embedding records and dead letters, nothing lost.

    deletes ───────────────────────────────────────────────► delete records
    upserts ─► FetchImages ─► ToRequests ─► RunInference ─► records
                   │              │              └─ failed batches ─► dead letters (inference)
                   │              └─ no image left and no text ─────► dead letters (download/decode)
                   └─ each failed image ────────────────────────────► dead letters (image_url set)
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference

from model_handlers.config import ModelConfig
from model_handlers.handler import EmbeddingRequest, ProductEmbeddingHandler
from schemas import ProductEvent, Stage
from transforms.dead_letter import event_of, from_beam_failure, image_dead_letters, nothing_left
from transforms.images import FetchedProduct, FetchImages, ImageOptions
from transforms.progress import CountOutcomes
from transforms.records import embedding_record, vectorless_record

__all__ = ["EmbedProducts"]

NOTHING_LEFT = "nothing_left"


class _Product(NamedTuple):
    """What travels through RunInference as the request key."""

    event: ProductEvent
    image_url: str


event_of.register(_Product, lambda product: product.event)
event_of.register(EmbeddingRequest, lambda request: event_of(request.key))
event_of.register(PredictionResult, lambda prediction: event_of(prediction.example))


class _ToRequestFn(beam.DoFn):
    def process(self, product: FetchedProduct):
        event = product.event
        if not product.images and not event.text:
            yield beam.pvalue.TaggedOutput(NOTHING_LEFT, nothing_left(product))
            return
        failed = {failure.url for failure in product.failures}
        shown = next((url for url in event.image_urls if url not in failed), "")
        yield EmbeddingRequest(key=_Product(event, shown), images=product.images, text=event.text)


class _ToRecordFn(beam.DoFn):
    def __init__(self):
        self._embedded = Metrics.counter("embed", "records_ok")

    def process(self, prediction: PredictionResult):
        product: _Product = prediction.example.key
        self._embedded.inc()
        yield embedding_record(product.event, prediction.inference, prediction.model_id, product.image_url)


class EmbedProducts(beam.PTransform):
    """`ProductEvent`s → (`EmbeddingRecord`s, `DeadLetter`s), each counted (transforms.progress)."""

    def __init__(self, model_config: ModelConfig, image_options: ImageOptions = ImageOptions(),
                 handler: ProductEmbeddingHandler | None = None):
        """`handler` replaces the one built from `model_config` (tests pass fakes here)."""
        super().__init__()
        self._model_config = model_config
        self._image_options = image_options
        self._handler = handler or ProductEmbeddingHandler(model_config)

    def expand(self, events):
        # Deletes and attribute patches skip the model. (The step names are from before patches: a
        # running job is updated in place only when they stay.)
        deletes, upserts = events | "SplitDeletes" >> beam.Partition(
            lambda event, _: 1 if event.needs_vectors else 0, 2)
        delete_records = deletes | "DeleteRecords" >> beam.Map(vectorless_record, self._model_config.model_id)

        fetched = upserts | "FetchImages" >> FetchImages(
            self._model_config.spec, self._image_options, self._model_config.max_batch_size)
        image_letters = fetched | "ImageFailures" >> beam.FlatMap(image_dead_letters)
        # The steps around RunInference fail into the dead letters like the model itself: a bad
        # element is one dead letter, never a bundle retried for ever.
        requests = fetched | "ToRequests" >> beam.ParDo(_ToRequestFn()).with_exception_handling(
            main_tag="requests", dead_letter_tag="failed")
        predictions, failed = (
            requests.requests
            | "RunInference" >> RunInference(self._handler).with_exception_handling()
        )
        upserts = predictions | "ToRecords" >> beam.ParDo(_ToRecordFn()).with_exception_handling(
            main_tag="records", dead_letter_tag="failed")
        failures = [
            requests.failed | "RequestFailures" >> beam.FlatMap(lambda f: from_beam_failure(Stage.INFERENCE, f)),
            failed.failed_inferences | "InferenceFailures" >> beam.FlatMap(
                lambda f: from_beam_failure(Stage.INFERENCE, f)),
            upserts.failed | "RecordFailures" >> beam.FlatMap(lambda f: from_beam_failure(Stage.INFERENCE, f)),
        ]
        record_branches = {"Deletes": delete_records, "Upserts": upserts.records}
        letter_branches = {"Images": image_letters, "NothingLeft": requests[NOTHING_LEFT],
                           **{f"Failures{n}": f for n, f in enumerate(failures)}}
        # Counted where they are made: a local runner runs what follows a Flatten only after the
        # stage before it has finished, so a count there would never show progress.
        for name, branch in record_branches.items():
            _ = branch | f"Count{name}" >> CountOutcomes("records")
        for name, branch in letter_branches.items():
            _ = branch | f"Count{name}" >> CountOutcomes("dead_letters")
        records = tuple(record_branches.values()) | "AllRecords" >> beam.Flatten()
        dead_letters = tuple(letter_branches.values()) | "AllDeadLetters" >> beam.Flatten()
        return records, dead_letters
