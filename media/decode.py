"""Image bytes → the model's uint8 RGB pixels, fast and safe (docs/ARCHITECTURE.md §7).

- The pixel count and the aspect ratio are read from the header and capped before anything is
  decoded (bombs, 100000x1 slivers); Pillow's own guard stays the outer bound. Memory per decode
  is the decoded image (at most `max_pixels` x 4 bytes, less after a reduced-scale JPEG decode)
  plus a few crops' worth: no intermediate is larger than 4 crops, whatever the aspect ratio.
- JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the target is that much smaller
  (libjpeg's DCT scaling via `Image.draft`): most of the speed-up on large photos.
- EXIF orientation is applied; every mode (CMYK, palette, alpha, 16-bit, grayscale,
  animation) becomes RGB, transparency composited on white as a storefront shows it.
- Resize and crop follow the model's own preprocessing geometry (torchvision's `Resize(int)`
  then `CenterCrop`), so only normalisation is left for the device; after a reduced-scale
  decode only the crop's source region, rounded to whole pixels, is resampled by torch's uint8
  antialiased kernel (a vectorised port of Pillow's filters: within a level of Pillow's output
  on the same region, about 3.5× faster on AVX2/AVX-512 CPUs).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model_handlers.preprocess import ImagePreprocess

__all__ = ["DecodeError", "decode_image", "resample", "DEFAULT_MAX_PIXELS", "MAX_ASPECT_RATIO"]

DEFAULT_MAX_PIXELS = 50_000_000
# Longer side over shorter: beyond this an image is no product photo, and would crop to a sliver.
MAX_ASPECT_RATIO = 25.0
# Past this many crops' worth of resized pixels, only the crop's source box is resampled.
_MAX_RESIZED_AREA = 4
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_WHITE = (255, 255, 255)


class DecodeError(ValueError):
    """The bytes are not an image this decoder accepts (corrupt, truncated, too many pixels)."""


def decode_image(data: bytes, spec: ImagePreprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Returns a C-contiguous uint8 array of shape (crop, crop, 3)."""
    try:
        # The cap is checked here, from the header. Pillow's own guard (an error past twice its
        # MAX_IMAGE_PIXELS) stays the outer bound; it is not turned up with `catch_warnings`,
        # which swaps the process's warning filters and is not thread-safe.
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(f"image is {width}x{height} pixels, over the {max_pixels}-pixel cap")
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            raise DecodeError(f"image is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO:g}:1")
        if image.format == "JPEG":
            # Keeps both sides at least the target (the shorter side is what Resize needs).
            image.draft("RGB", (spec.resize_size, spec.resize_size))
        image.load()
        reduced = image.size != (width, height)
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
        image = _to_rgb(image)
        image = _resize_and_crop(image, spec, region_only=reduced)
    except DecodeError:
        raise
    except UnidentifiedImageError as e:  # its message names an in-memory buffer, which says nothing
        raise DecodeError("cannot decode image: not a format Pillow reads (or not an image)") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from e
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        # 16- and 32-bit grayscale: Pillow's convert() clips instead of scaling.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    elif mode == "L" and "transparency" in image.info or mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_and_crop(image: Image.Image, spec: ImagePreprocess, region_only: bool = False) -> Image.Image | np.ndarray:
    """The model's Resize then CenterCrop. With `region_only`, only the crop's source region is
    resampled, its box rounded to whole source pixels (a shift of under half a source pixel; a
    mean difference of about half a level): used once reduced-scale decoding has already made
    the pixels approximate."""
    width, height = image.size
    if spec.resize_mode == "squash":
        size = (spec.resize_size, spec.resize_size)
    elif width <= height:
        size = (spec.resize_size, int(spec.resize_size * height / width))
    else:
        size = (int(spec.resize_size * width / height), spec.resize_size)
    crop = spec.crop_size
    top = int(round((size[1] - crop) / 2.0))
    left = int(round((size[0] - crop) / 2.0))
    if size == image.size:
        return image.crop((left, top, left + crop, top + crop))
    sx, sy = width / size[0], height / size[1]
    if region_only and top >= 0 and left >= 0:
        box = (round(left * sx), round(top * sy), min(width, round((left + crop) * sx)),
               min(height, round((top + crop) * sy)))
        return resample(np.array(image.crop(box)), crop, spec.interpolation)
    if top >= 0 and left >= 0 and size[0] * size[1] > _MAX_RESIZED_AREA * crop * crop:
        # A very long image: resampling only the crop's source box (same scale, same filter
        # centres as the whole resize, within a level of it) bounds memory by the crop, where
        # resizing the whole of a 20000x1 image would ask for 5120000x256 pixels.
        box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
        return image.resize((crop, crop), _RESAMPLE[spec.interpolation], box=box)
    return image.resize(size, _RESAMPLE[spec.interpolation]).crop((left, top, left + crop, top + crop))


def resample(pixels: np.ndarray, crop: int, interpolation: str) -> np.ndarray:
    """HWC uint8 → (crop, crop, 3) uint8 with Pillow's antialiased filter, in torch's AVX2 kernel.

    Runs on the calling thread only (no intra-op pool), so download threads don't contend
    with the model's threads for it."""
    import torch  # here, not at the top: the decoder's limits and options are read without torch

    # A channels-last NCHW view of the HWC pixels (no copy): the kernel then writes channels-last
    # too, so the result is HWC-contiguous without another copy.
    source = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(source, size=(crop, crop), mode=interpolation, antialias=True)
    return out[0].permute(1, 2, 0).numpy()
