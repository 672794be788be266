"""open_clip models: CLIP image and text towers in one space (`open_clip:ARCH[/PRETRAINED]`).

PRETRAINED is an open_clip tag (fetched by open_clip from its hub) or a checkpoint path,
local or on any filesystem Beam knows (gs://...), copied to a local cache first. With no
PRETRAINED the weights are a seeded random init: deterministic across workers, for tests.
The JSON configs in `model_configs/` (e.g. `tiny-clip-test`) are registered with open_clip.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

import storage
from model_handlers.backend import EmbeddingBackend
from model_handlers.config import ModelSpec
from model_handlers.open_clip_spec import is_checkpoint_path, open_clip, open_clip_preprocess, preprocess_from_cfg

__all__ = ["OpenClipBackend"]

def _local_checkpoint(path: str) -> str:
    """A local path for `path`; remote files are copied once into a cache keyed by their URL."""
    if not storage.is_remote(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    cache = Path(os.environ.get("EMBED_MODEL_CACHE", Path(tempfile.gettempdir()) / "embed-model-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / (hashlib.sha256(path.encode()).hexdigest()[:16] + "-" + os.path.basename(path))
    if not target.exists():
        storage.copy_to_local(path, target)
    return str(target)


class OpenClipBackend(EmbeddingBackend):
    shared_space = True

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(**kwargs)
        oc = open_clip()
        self.spec = str(spec)
        self.preprocess = open_clip_preprocess(spec)
        pretrained = spec.pretrained or None
        if pretrained and is_checkpoint_path(pretrained):
            pretrained = _local_checkpoint(pretrained)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = oc.create_model(spec.name, pretrained=pretrained, device=self.device)
        model.eval().requires_grad_(False)
        actual = preprocess_from_cfg(model.visual.preprocess_cfg)
        if actual != self.preprocess:
            raise RuntimeError(f"{spec}: decoder preprocessing {self.preprocess} differs from the model's {actual}")
        self.model = model
        self.tokenizer = oc.get_tokenizer(spec.name)
        self.image_dim = self.text_dim = int(model.visual.output_dim)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)

