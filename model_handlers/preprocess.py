"""What a model wants its pixels to look like, as data taken from the model itself.

Backends build an `ImagePreprocess` from their own preprocessing definition (open_clip's
`preprocess_cfg`, the EfficientNet-Lite reference transform); the decoder shapes uint8
pixels by it on the CPU and `model_handlers.backend.normalize_on_device` finishes the job on
the model's device, so the host sends a quarter of the bytes a float tensor would need
(docs/ARCHITECTURE.md §7). Plain data: reading it imports no torch.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ImagePreprocess"]

RESIZE_MODES = ("shortest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Resize then centre-crop to `crop_size`, then `(pixel/255 - mean) / std`.

    `resize_size` is the shorter side after resizing for `shortest` (torchvision's
    `Resize(int)`), or both sides for `squash`.
    """

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not supported (supported: {RESIZE_MODES})")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not supported (supported: {INTERPOLATIONS})")
        if self.crop_size > self.resize_size:
            raise ValueError("crop_size must not exceed resize_size")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
