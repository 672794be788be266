"""Model spec → backend: the one place that knows which class serves which spec."""

from __future__ import annotations

import logging

from model_handlers.allocator import warn_without_tcmalloc
from model_handlers.backend import EmbeddingBackend
from model_handlers.config import ModelConfig, ModelSpec
from model_handlers.preprocess import ImagePreprocess
from model_handlers.projection import load_projection

__all__ = ["check_model", "embedding_dim", "image_preprocess", "load_backend"]

_log = logging.getLogger(__name__)


def image_preprocess(spec: str | ModelSpec) -> ImagePreprocess:
    """The pixels the model wants, known without loading it (the decoder runs before the model)."""
    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.backend == "packaged":
        from model_handlers.packaged_backend import PACKAGED_PREPROCESS

        return PACKAGED_PREPROCESS
    from model_handlers.open_clip_backend import open_clip_preprocess

    return open_clip_preprocess(spec)


def embedding_dim(spec: str | ModelSpec, projection: str = "") -> int:
    """The dimension of the fused vectors a spec (and head) produces, known without loading the model."""
    spec = ModelSpec.parse(spec) if isinstance(spec, str) else spec
    image_dim = load_projection(projection).dim_out if projection else None
    if spec.backend == "packaged":
        from model_handlers.packaged_backend import PackagedBackend

        return (image_dim or PackagedBackend.image_dim) + PackagedBackend.text_dim
    from model_handlers.open_clip_backend import open_clip_embed_dim

    return image_dim or open_clip_embed_dim(spec)


def check_model(spec: str, projection: str = "", check_remote: bool = True) -> None:
    """ValueError naming what is wrong, unless `spec` (and its head) can be loaded: run at launch, so
    a typo fails in a second on the launcher instead of in `setup()` on every worker."""
    parsed = ModelSpec.parse(spec)
    if parsed.backend == "open_clip":
        from model_handlers.open_clip_backend import check_open_clip_weights

        check_open_clip_weights(parsed, check_remote)
    embedding_dim(parsed, projection)
    if projection:
        load_projection(projection).check_model(spec)


def load_backend(config: ModelConfig) -> EmbeddingBackend:
    spec = config.model_spec
    kwargs = dict(
        device=config.device,
        precision=config.precision,
        image_batch_size=config.image_batch_size,
        image_weight=config.image_weight,
    )
    if spec.backend == "packaged":
        from model_handlers.packaged_backend import PackagedBackend

        backend = PackagedBackend(**kwargs)
    else:
        from model_handlers.open_clip_backend import OpenClipBackend

        backend = OpenClipBackend(spec, **kwargs)
    if backend.device.type == "cpu":
        warn_without_tcmalloc(_log)
    return backend.project(load_projection(config.projection)) if config.projection else backend
