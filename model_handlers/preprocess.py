"""What a model wants its pixels to look like, as data taken from the model itself.

Backends build an `ImagePreprocess` from their own preprocessing definition (open_clip's
`preprocess_cfg`, the EfficientNet-Lite reference transform); the decoder shapes uint8
pixels by it on the CPU and `normalize_on_device` finishes the job on the model's device,
so the host sends a quarter of the bytes a float tensor would need (DESIGN §6).
"""

from __future__ import annotations

import dataclasses
import functools

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
    """uint8 NHWC on the host → normalised float NCHW on `device` (a channels-last view).

    The copy is made from pinned memory and non-blocking when the device is a GPU, so the
    transfer overlaps with the previous batch's compute. `(x/255 - mean)/std` is one
    multiply-add, `x * scale + shift`, in place on the float pixels, with the per-channel
    constants laid out along a whole row of pixels, so the kernel runs over rows of W×3
    contiguous values; broadcasting them per channel over NCHW runs 3 values at a time and took
    7-10x as long on the CPU.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    else:
        pixels = pixels.to(device)
    scale, shift = _row_affine(spec, pixels.shape[2], device, dtype)
    x = pixels.to(dtype)
    torch.addcmul(shift, x, scale, out=x)
    return x.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=32)
def _row_affine(spec: ImagePreprocess, width: int, device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (width, 3): `x * scale + shift == (x/255 - mean)/std` for one row."""
    mean = torch.tensor(spec.mean, dtype=torch.float64)
    std = torch.tensor(spec.std, dtype=torch.float64)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    return (scale.repeat(width).view(width, 3).to(device, dtype), shift.repeat(width).view(width, 3).to(device, dtype))
