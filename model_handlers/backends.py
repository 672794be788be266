"""Model spec → backend, as data: which class serves which spec, and what is known without loading it.

`REGISTRY` maps a spec's backend name to its class (imported only when a model loads), its
image preprocessing and its vector dimensions: the decoder, the index and the launch-time checks
read those without weights, and without torch for the packaged model (open_clip's come from
open_clip's own tables). A new backend is one entry here and one class.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import TYPE_CHECKING, Callable

from model_handlers import open_clip_spec
from model_handlers.config import ModelConfig, ModelSpec
from model_handlers.preprocess import ImagePreprocess

if TYPE_CHECKING:
    from model_handlers.backend import EmbeddingBackend

__all__ = ["PACKAGED_DIMS", "PACKAGED_PREPROCESS", "REGISTRY", "Backend", "check_model", "embedding_dim",
           "image_preprocess", "load_backend"]

_log = logging.getLogger(__name__)

# The reference EfficientNet-Lite eval transform (tensorflow/tpu efficientnet/lite):
# centre crop of 224/(224+32) of the shorter side, bicubic, then (x - 127) / 128.
PACKAGED_PREPROCESS = ImagePreprocess(
    resize_size=256,
    crop_size=224,
    mean=(127.0 / 255.0,) * 3,
    std=(128.0 / 255.0,) * 3,
    resize_mode="shortest",
    interpolation="bicubic",
)
PACKAGED_DIMS = (1280, 384)  # EfficientNet-Lite0's pooled features, MiniLM's sentence vector


@dataclasses.dataclass(frozen=True)
class Backend:
    module: str  # where the EmbeddingBackend subclass lives
    cls: str
    preprocess: Callable[[ModelSpec], ImagePreprocess]
    dims: Callable[[ModelSpec], tuple[int, int]]  # (image, text) vector dimensions
    shared_space: bool  # one space for images and text (fused by a weighted sum), or two (concatenated)
    check_weights: Callable[[ModelSpec, bool], None] = lambda spec, check_remote: None

    def load_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


def _open_clip_dims(spec: ModelSpec) -> tuple[int, int]:
    dim = open_clip_spec.open_clip_embed_dim(spec)
    return dim, dim


REGISTRY: dict[str, Backend] = {
    "packaged": Backend("model_handlers.packaged_backend", "PackagedBackend", lambda spec: PACKAGED_PREPROCESS,
                        lambda spec: PACKAGED_DIMS, shared_space=False),
    "open_clip": Backend("model_handlers.open_clip_backend", "OpenClipBackend", open_clip_spec.open_clip_preprocess,
                         _open_clip_dims, shared_space=True, check_weights=open_clip_spec.check_open_clip_weights),
}


def _parsed(spec: str | ModelSpec) -> ModelSpec:
    return ModelSpec.parse(spec) if isinstance(spec, str) else spec


def image_preprocess(spec: str | ModelSpec) -> ImagePreprocess:
    """The pixels the model wants, known without loading it (the decoder runs before the model)."""
    spec = _parsed(spec)
    return REGISTRY[spec.backend].preprocess(spec)


def embedding_dim(spec: str | ModelSpec, projection: str = "") -> int:
    """The dimension of the fused vectors a spec (and head) produces, known without loading the model."""
    spec = _parsed(spec)
    entry = REGISTRY[spec.backend]
    image_dim, text_dim = entry.dims(spec)
    if projection:
        from model_handlers.projection import load_projection  # torch: only when a head is used

        image_dim = load_projection(projection).dim_out
    return image_dim if entry.shared_space else image_dim + text_dim


def check_model(spec: str, projection: str = "", check_remote: bool = True) -> None:
    """ValueError naming what is wrong, unless `spec` (and its head) can be loaded: run at launch, so
    a typo fails in a second on the launcher instead of in `setup()` on every worker."""
    parsed = _parsed(spec)
    REGISTRY[parsed.backend].check_weights(parsed, check_remote)
    embedding_dim(parsed, projection)
    if projection:
        ModelConfig(spec=spec, projection=projection).model_id  # reads the head, checks it was trained on spec


def load_backend(config: ModelConfig) -> EmbeddingBackend:
    from model_handlers.allocator import warn_without_tcmalloc
    from model_handlers.projection import load_projection

    spec = config.model_spec
    backend = REGISTRY[spec.backend].load_class()(
        spec, device=config.device, precision=config.precision, image_batch_size=config.image_batch_size,
        image_weight=config.image_weight)
    if backend.device.type == "cpu":
        warn_without_tcmalloc(_log)
    return backend.project(load_projection(config.projection)) if config.projection else backend
