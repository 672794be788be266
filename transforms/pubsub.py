"""Pub/Sub in and out: event messages in, records and dead letters out as JSON with attributes.

Output attributes let subscribers filter and deduplicate without parsing the body: records
carry `product_id`, `op`, `version`, `model`, `event_id` (a redelivered event gives the same
`event_id` and `version`, so consumers can drop duplicates); dead letters carry `stage`,
`error_type`, `event_id`.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub, WriteToPubSub

from schemas import DeadLetter, EmbeddingRecord
from transforms.sinks import Serialize

__all__ = ["PublishDeadLetters", "PublishRecords", "ReadEventMessages", "dead_letter_message", "record_message"]


def record_message(record: EmbeddingRecord) -> PubsubMessage:
    attributes = {
        "product_id": record.product_id,
        "op": record.op,
        "version": str(record.version),
        "model": record.model,
        "event_id": record.event_id,
    }
    return PubsubMessage(record.to_json().encode("utf-8"), attributes)


def dead_letter_message(letter: DeadLetter) -> PubsubMessage:
    attributes = {"stage": letter.stage, "error_type": letter.error_type, "event_id": letter.event_id}
    return PubsubMessage(letter.to_json().encode("utf-8"), attributes)


class ReadEventMessages(beam.PTransform):
    """The event subscription → raw message bodies (bytes), timestamped as configured."""

    def __init__(self, subscription: str, timestamp_attribute: str | None = None, id_label: str | None = None):
        super().__init__()
        self._read = ReadFromPubSub(subscription=subscription, with_attributes=True,
                                    timestamp_attribute=timestamp_attribute, id_label=id_label)

    def expand(self, p):
        return p | "Read" >> self._read | "Body" >> beam.Map(lambda message: message.data)


class PublishRecords(beam.PTransform):
    """Publishes records; returns the dead letters of those that could not be serialised."""

    def __init__(self, topic: str):
        super().__init__()
        self._topic = topic

    def expand(self, records):
        messages, dead_letters = records | "ToMessage" >> Serialize(record_message)
        _ = messages | "Publish" >> WriteToPubSub(self._topic, with_attributes=True)
        return dead_letters


class PublishDeadLetters(beam.PTransform):
    def __init__(self, topic: str):
        super().__init__()
        self._topic = topic

    def expand(self, letters):
        messages = letters | "ToMessage" >> beam.Map(dead_letter_message)
        return messages | "Publish" >> WriteToPubSub(self._topic, with_attributes=True)
