"""Turns every failure output of the pipeline into `DeadLetter` records (DESIGN §5).

Beam's `with_exception_handling` emits `(element, (type, repr, traceback))`; RunInference's
emits the failed batch as the element. Both become one dead letter per event.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from schemas import DeadLetter, EmbeddingRecord, ProductEvent
from transforms.images import FetchedProduct

__all__ = ["from_beam_failure", "image_dead_letters", "nothing_left"]


def from_beam_failure(stage: str, failure: tuple[Any, tuple]) -> Iterable[DeadLetter]:
    element, (error_type, error_repr, _traceback) = failure
    elements = element if isinstance(element, list) else [element]
    for item in elements:
        event = _event_of(item)
        if event is not None:
            ids, payload = (event.event_id, event.product_id), event.to_json()
        elif isinstance(item, EmbeddingRecord):  # a record the sink could not write
            ids, payload = (item.event_id, item.product_id), json.dumps(item.to_dict())
        elif isinstance(item, (bytes, str)):  # a message that never became an object
            ids, payload = ("", ""), item.decode("utf-8", "backslashreplace") if isinstance(item, bytes) else item
        else:
            ids, payload = ("", ""), repr(item)
        yield DeadLetter(
            stage=stage,
            error_type=getattr(error_type, "__name__", str(error_type)),
            error=error_repr,
            payload=payload,
            event_id=ids[0],
            product_id=ids[1],
        )


def _event_of(item: Any) -> ProductEvent | None:
    """Finds the event inside whatever a stage carries (an event, a request, a prediction)."""
    for _ in range(3):
        if isinstance(item, ProductEvent):
            return item
        item = getattr(item, "key", None) or getattr(item, "example", None) or getattr(item, "event", None)
    return None


def image_dead_letters(product: FetchedProduct) -> Iterable[DeadLetter]:
    """One record per failed image; these come in addition to the product's own outcome."""
    for failure in product.failures:
        yield DeadLetter(
            stage=failure.stage,
            error_type=failure.error_type,
            error=failure.error,
            payload=product.event.to_json(),
            event_id=product.event.event_id,
            product_id=product.event.product_id,
            image_url=failure.url,
        )


def nothing_left(product: FetchedProduct) -> DeadLetter:
    """The event-level dead letter of an upsert whose every image failed and that has no text."""
    first = product.failures[0]
    return DeadLetter(
        stage=first.stage,
        error_type=first.error_type,
        error=f"all {len(product.failures)} images failed and there is no text; first: {first.error}",
        payload=product.event.to_json(),
        event_id=product.event.event_id,
        product_id=product.event.product_id,
    )
