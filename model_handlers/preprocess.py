"""What a model wants its pixels to look like, as data taken from the model itself.

Backends build an `ImagePreprocess` from their own preprocessing definition (open_clip's
`preprocess_cfg`, the EfficientNet-Lite reference transform); the decoder shapes uint8
pixels by it on the CPU and `normalize_on_device` finishes the job on the model's device,
so the host sends a quarter of the bytes a float tensor would need (DESIGN §6).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["ImagePreprocess", "normalize_on_device"]

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


def normalize_on_device(pixels: torch.Tensor, spec: ImagePreprocess, device: torch.device, dtype=torch.float32):
    """uint8 NHWC on the host → normalised float NCHW on `device`.

    The copy is made from pinned memory and non-blocking when the device is a GPU, so the
    transfer overlaps with the previous batch's compute.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    else:
        pixels = pixels.to(device)
    x = pixels.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    mean = torch.tensor(spec.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
