"""Turns every failure output of the pipeline into `DeadLetter` records (docs/ARCHITECTURE.md §5).

Beam's `with_exception_handling` emits `(element, (type, repr, traceback))`; RunInference's
emits the failed batch as the element. Both become one dead letter per event: the event inside
whatever a stage carries is found by `event_of`, to which each carrier type registers itself
(`FetchedProduct` in transforms.images, the inference request and result in transforms.embedding).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Iterable

from schemas import DeadLetter, EmbeddingRecord, ProductEvent, Stage

if TYPE_CHECKING:  # the image stage imports torch; writing dead letters must not
    from transforms.images import FetchedProduct

__all__ = ["event_of", "from_beam_failure", "image_dead_letters", "not_created", "nothing_left"]


@functools.singledispatch
def event_of(item: Any) -> ProductEvent | None:
    """The event a stage's element carries, or None (a raw message, a record)."""
    return None


@event_of.register
def _(event: ProductEvent) -> ProductEvent:
    return event


def from_beam_failure(stage: str, failure: tuple[Any, tuple]) -> Iterable[DeadLetter]:
    element, (error_type, error_repr, _traceback) = failure
    error_type = getattr(error_type, "__name__", str(error_type))
    for item in element if isinstance(element, list) else [element]:
        event = event_of(item)
        if event is not None:
            yield DeadLetter.of_event(stage, error_type, error_repr, event)
        elif isinstance(item, EmbeddingRecord):  # a record the sink could not write
            yield DeadLetter.of_record(stage, error_type, error_repr, item)
        else:  # a message that never became an object
            yield DeadLetter.of_payload(stage, error_type, error_repr,
                                        item if isinstance(item, (bytes, str)) else repr(item))


def image_dead_letters(product: FetchedProduct) -> Iterable[DeadLetter]:
    """One record per failed image; these come in addition to the product's own outcome."""
    for failure in product.failures:
        yield DeadLetter.of_event(failure.stage, failure.error_type, failure.error, product.event, image_url=failure.url)


def nothing_left(product: FetchedProduct) -> DeadLetter:
    """The event-level dead letter of an upsert whose every image failed and that has no text."""
    first = product.failures[0]
    return DeadLetter.of_event(
        first.stage, first.error_type,
        f"all {len(product.failures)} images failed and there is no text; first: {first.error}", product.event)


def not_created(records: Iterable[EmbeddingRecord], what: str) -> Iterable[DeadLetter]:
    """Deletes and patches for an index (`what`: "index", "collection") no upsert has made yet: nothing to
    apply them to, and no dimension to make it with. They stay replayable as dead letters."""
    for record in records:
        yield DeadLetter.of_record(
            Stage.SINK, "IndexNotCreated",
            f"a {record.op} for {'an' if what[0] in 'aeiou' else 'a'} {what} that does not exist yet: its dimension "
            f"comes from the first upsert (or --model); replay this record once the {what} exists", record)
