"""The RunInference ModelHandler: batches of products (uint8 images + text) → fused vectors.

It stores only the picklable `ModelConfig`; `load_model()` builds the backend on the worker.
A batch is counted in products; all images of the batch go through the image tower in
chunks of `image_batch_size`, all texts through the text tower in one pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers.backend import EmbeddingBackend
from model_handlers.backends import load_backend
from model_handlers.config import ModelConfig

__all__ = ["EmbeddingRequest", "ProductEmbeddingHandler"]


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    """One product's inputs. `key` travels through untouched (the handler knows no events)."""

    key: Any
    images: tuple[np.ndarray, ...]
    text: str

    def __post_init__(self):
        if not self.images and not self.text:
            raise ValueError("an embedding request needs images or text")


class ProductEmbeddingHandler(ModelHandler[EmbeddingRequest, PredictionResult, EmbeddingBackend]):
    def __init__(self, config: ModelConfig):
        super().__init__(
            min_batch_size=config.min_batch_size,
            max_batch_size=config.max_batch_size,
            max_batch_duration_secs=config.max_batch_duration_secs or None,
            large_model=config.share_model_across_processes,
        )
        self.config = config

    def load_model(self) -> EmbeddingBackend:
        return load_backend(self.config)

    def run_inference(
        self,
        batch: Sequence[EmbeddingRequest],
        model: EmbeddingBackend,
        inference_args: Optional[dict[str, Any]] = None,
    ) -> Iterable[PredictionResult]:
        Metrics.distribution("embed", "batch_size").update(len(batch))
        Metrics.distribution("embed", "batch_images").update(sum(len(request.images) for request in batch))
        vectors = model.embed_products([(request.images, request.text) for request in batch])
        return [PredictionResult(request, result, self._model_id()) for request, result in zip(batch, vectors)]

    def _model_id(self) -> str:
        """From the config, not the model: a model shared across processes (`large_model`) is a proxy
        that forwards method calls only, so `model.model_id` (a property) failed every batch."""
        if getattr(self, "_id", None) is None:
            self._id = self.config.model_id
        return self._id

    def get_num_bytes(self, batch: Sequence[EmbeddingRequest]) -> int:
        return sum(sum(image.nbytes for image in request.images) + len(request.text) for request in batch)

    def get_metrics_namespace(self) -> str:
        return "embed"
