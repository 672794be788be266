"""Turns a search request's text, image URL or vector into a query vector of the index's space.

The same backend and fusion as the embed pipeline (docs/ARCHITECTURE.md §8): a text query is a product with
only a title, an image query a product with only that image. Query images are fetched through
the same guarded downloader and decoder as product images. An index of vectors from a model this
product does not run (a team's own embedder, `acme:custom-64`) is served for vector queries only.
"""

from __future__ import annotations

import numpy as np

from model_handlers.backends import load_backend
from model_handlers.config import ModelConfig, ModelSpec
from media.decode import decode_image
from media.download import FetchConfig, ImageFetcher

__all__ = ["QueryEmbedder", "QueryError", "runs_here"]


def runs_here(spec: str) -> bool:
    """Whether a backend of this product serves the model spec `spec`."""
    try:
        ModelSpec.parse(spec)
    except ValueError:
        return False
    return True


class QueryError(ValueError):
    """The query can't be turned into a vector (bad vector, unfetchable image); a 4xx."""


class QueryEmbedder:
    def __init__(self, model: str, dim: int, device: str = "auto", fetch: FetchConfig = FetchConfig(),
                 projection: str = ""):
        """Loads `model`'s backend, or none when no backend of this product serves it (vector queries only)."""
        self.model = model
        self.backend = load_backend(ModelConfig(spec=model, device=device, projection=projection)) \
            if runs_here(model) else None
        if self.backend is not None and self.backend.embedding_dim != dim:
            raise ValueError(f"{model} makes {self.backend.embedding_dim}-d vectors, the index holds {dim}-d")
        self.dim = dim
        self.fetch_timeout_s = fetch.total_timeout_s
        self._fetcher = ImageFetcher(fetch)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The query kinds this embedder answers."""
        return ("text", "image_url", "vector") if self.backend is not None else ("vector",)

    def require_backend(self, kind: str):
        if self.backend is None:
            raise QueryError(f"{kind} queries need the index's model, {self.model}, which this service cannot "
                             f"run (no backend of this product serves it): send a vector query instead")
        return self.backend

    def text(self, text: str) -> np.ndarray:
        backend = self.require_backend("text")
        if not text.strip():
            raise QueryError("text is empty")
        return backend.embed_query(text=text)

    def image_url(self, url: str, deadline: float | None = None) -> np.ndarray:
        """`deadline`: a `time.monotonic()` instant the download must end by."""
        self.require_backend("image_url")
        try:
            pixels = decode_image(self._fetcher.fetch(url, deadline), self.backend.preprocess)
        except (OSError, ValueError) as e:
            raise QueryError(f"cannot use image {url[:200]}: {e}") from e
        return self.backend.embed_query(image=pixels)

    def vector(self, values: list[float]) -> np.ndarray:
        vector = np.asarray(values, np.float32)
        if vector.shape != (self.dim,):
            raise QueryError(f"vector has {vector.size} values, the index holds {self.dim}-d vectors")
        if not np.all(np.isfinite(vector)) or not np.any(vector):
            raise QueryError("vector must be finite and not all zero")
        # In float64: the float32 norm of tiny values ([1e-45] * d) underflows to 0 and of huge
        # ones overflows; any direction that float32 can hold is a valid query.
        wide = vector.astype(np.float64)
        return (wide / np.linalg.norm(wide)).astype(np.float32)
