"""open_clip models: CLIP image and text towers in one space (`open_clip:ARCH[/PRETRAINED]`).

PRETRAINED is an open_clip tag (fetched by open_clip from its hub) or a checkpoint path,
local or on any filesystem Beam knows (gs://...), copied to a local cache first. With no
PRETRAINED the weights are a seeded random init: deterministic across workers, for tests.
The JSON configs in `model_configs/` (e.g. `tiny-clip-test`) are registered with open_clip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from model_handlers.backend import EmbeddingBackend
from model_handlers.config import ModelSpec
from model_handlers.preprocess import ImagePreprocess

__all__ = ["OpenClipBackend", "check_open_clip_weights", "open_clip_embed_dim", "open_clip_preprocess"]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


def _open_clip():
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def _is_checkpoint_path(pretrained: str) -> bool:
    return "://" in pretrained or pretrained.startswith(("/", ".")) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def open_clip_preprocess(spec: ModelSpec) -> ImagePreprocess:
    """The model's inference preprocessing, read from its config without loading weights.

    Same precedence as `open_clip.create_model`: defaults, then the model config's
    `preprocess_cfg`, then the pretrained tag's; the size is the vision tower's.
    """
    open_clip = _open_clip()
    model_cfg = open_clip.get_model_config(spec.name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {spec.name!r}")
    cfg = dataclasses.asdict(open_clip.transform.PreprocessCfg())
    cfg.update({k: v for k, v in model_cfg.get("preprocess_cfg", {}).items() if k in cfg})
    if spec.pretrained and not _is_checkpoint_path(spec.pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(spec.name, spec.pretrained)
        if not tag_cfg:
            raise ValueError(f"open_clip knows no pretrained tag {spec.pretrained!r} for {spec.name}")
        cfg.update({k: v for k, v in tag_cfg.items() if k in cfg})
    cfg["size"] = model_cfg["vision_cfg"]["image_size"]
    return _preprocess_from_cfg(cfg)


def open_clip_embed_dim(spec: ModelSpec) -> int:
    model_cfg = _open_clip().get_model_config(spec.name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {spec.name!r}")
    return int(model_cfg["embed_dim"])


def _preprocess_from_cfg(cfg: dict) -> ImagePreprocess:
    size = cfg["size"]
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"non-square model input {size} is not supported")
        size = size[0]
    return ImagePreprocess(
        resize_size=int(size),
        crop_size=int(size),
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
    )


def check_open_clip_weights(spec: ModelSpec, check_remote: bool = True) -> None:
    """ValueError unless the spec's weights can be had: a known tag, or a checkpoint that exists
    (a remote one only with `check_remote`, since that needs the object store)."""
    open_clip_preprocess(spec)  # a known architecture and, for a tag, a known tag
    if not spec.pretrained or not _is_checkpoint_path(spec.pretrained):
        return
    path = spec.pretrained
    if "://" not in path:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ValueError(f"checkpoint {path} does not exist or is not a readable file")
    elif check_remote:
        from apache_beam.io.filesystems import FileSystems

        try:
            found = FileSystems.exists(path)
        except Exception as e:  # each filesystem raises its own errors: all mean "cannot check"
            raise ValueError(f"cannot reach checkpoint {path}: {e}") from e
        if not found:
            raise ValueError(f"checkpoint {path} does not exist")


def _local_checkpoint(path: str) -> str:
    """A local path for `path`; remote files are copied once into a cache keyed by their URL."""
    if "://" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    from apache_beam.io.filesystems import FileSystems

    cache = Path(os.environ.get("EMBED_MODEL_CACHE", Path(tempfile.gettempdir()) / "embed-model-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / (hashlib.sha256(path.encode()).hexdigest()[:16] + "-" + os.path.basename(path))
    if not target.exists():
        partial = target.with_suffix(target.suffix + f".{os.getpid()}.part")
        with FileSystems.open(path) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink, 8 * 1024 * 1024)
        os.replace(partial, target)
    return str(target)


class OpenClipBackend(EmbeddingBackend):
    shared_space = True

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(**kwargs)
        open_clip = _open_clip()
        self.model_id = str(spec)
        self.preprocess = open_clip_preprocess(spec)
        pretrained = spec.pretrained or None
        if pretrained and _is_checkpoint_path(pretrained):
            pretrained = _local_checkpoint(pretrained)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(spec.name, pretrained=pretrained, device=self.device)
        model.eval().requires_grad_(False)
        actual = _preprocess_from_cfg(model.visual.preprocess_cfg)
        if actual != self.preprocess:
            raise RuntimeError(f"{spec}: decoder preprocessing {self.preprocess} differs from the model's {actual}")
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(spec.name)
        self.image_dim = self.text_dim = int(model.visual.output_dim)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens)

