"""Model outputs and deletes → `EmbeddingRecord`s (docs/ARCHITECTURE.md §4)."""

from __future__ import annotations

import numpy as np

from model_handlers.backend import ProductVectors
from schemas import MAX_MODEL_TEXT_CHARS, EmbeddingRecord, ProductEvent, utc_now, vector

__all__ = ["embedding_record", "vectorless_record"]

_NO_VECTORS = ProductVectors(np.zeros(0), np.zeros(0), np.zeros(0), 0)


def embedding_record(event: ProductEvent, vectors: ProductVectors, model_id: str, image_url: str) -> EmbeddingRecord:
    """`image_url` is the first image that made it into the vector, for display downstream."""
    return EmbeddingRecord(
        product_id=event.product_id,
        shop_id=event.shop_id,
        op=event.op,
        version=event.version,
        event_id=event.event_id,
        embedding=vector(vectors.embedding),
        image_embedding=vector(vectors.image_embedding),
        text_embedding=vector(vectors.text_embedding),
        image_count=vectors.image_count,
        title=event.title,
        image_url=image_url,
        model=model_id,
        event_time=event.event_time or utc_now(),
        embedded_at=utc_now(),
        text_chars=len(event.text) if vectors.text_embedding.size else 0,
        description=event.description[:MAX_MODEL_TEXT_CHARS],
        attributes=dict(event.attributes),
    )


def vectorless_record(event: ProductEvent, model_id: str) -> EmbeddingRecord:
    """A delete or an attribute patch carries no vectors (the index keeps a patched product's); the
    model id says which index it applies to."""
    return embedding_record(event, _NO_VECTORS, model_id, image_url="")
