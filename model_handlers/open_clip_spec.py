"""What an `open_clip:ARCH[/PRETRAINED]` spec means, known without loading its weights.

The architecture's config and a pretrained tag's preprocessing come from open_clip's own tables
(`open_clip` and torch are imported on the first call, not on import); a checkpoint path is
checked to exist. The JSON configs in `model_configs/` (e.g. `tiny-clip-test`) are registered
with open_clip here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import storage
from model_handlers.config import ModelSpec
from model_handlers.preprocess import ImagePreprocess

__all__ = ["check_open_clip_weights", "is_checkpoint_path", "open_clip", "open_clip_embed_dim",
           "open_clip_preprocess", "preprocess_from_cfg"]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


def open_clip():
    """The open_clip module, with this project's model configs registered."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def is_checkpoint_path(pretrained: str) -> bool:
    return storage.is_remote(pretrained) or pretrained.startswith(("/", ".")) or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def open_clip_preprocess(spec: ModelSpec) -> ImagePreprocess:
    """The model's inference preprocessing, read from its config without loading weights.

    Same precedence as `open_clip.create_model`: defaults, then the model config's
    `preprocess_cfg`, then the pretrained tag's; the size is the vision tower's.
    """
    oc = open_clip()
    model_cfg = oc.get_model_config(spec.name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {spec.name!r}")
    cfg = dataclasses.asdict(oc.transform.PreprocessCfg())
    cfg.update({k: v for k, v in model_cfg.get("preprocess_cfg", {}).items() if k in cfg})
    if spec.pretrained and not is_checkpoint_path(spec.pretrained):
        tag_cfg = oc.get_pretrained_cfg(spec.name, spec.pretrained)
        if not tag_cfg:
            raise ValueError(f"open_clip knows no pretrained tag {spec.pretrained!r} for {spec.name}")
        cfg.update({k: v for k, v in tag_cfg.items() if k in cfg})
    cfg["size"] = model_cfg["vision_cfg"]["image_size"]
    return preprocess_from_cfg(cfg)


def open_clip_embed_dim(spec: ModelSpec) -> int:
    model_cfg = open_clip().get_model_config(spec.name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {spec.name!r}")
    return int(model_cfg["embed_dim"])


def preprocess_from_cfg(cfg: dict) -> ImagePreprocess:
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
    if not spec.pretrained or not is_checkpoint_path(spec.pretrained):
        return
    path = spec.pretrained
    if not storage.is_remote(path):
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ValueError(f"checkpoint {path} does not exist or is not a readable file")
    elif check_remote:
        try:
            if not storage.exists(path):
                raise ValueError(f"checkpoint {path} does not exist")
        except storage.Unreachable as e:
            raise ValueError(f"checkpoint: {e}") from e
