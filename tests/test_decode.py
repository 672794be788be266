import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from model_handlers.backends import image_preprocess
from model_handlers.backends import PACKAGED_PREPROCESS
from model_handlers.backend import normalize_on_device
from model_handlers.preprocess import ImagePreprocess
from tests.conftest import TINY_CLIP, image_bytes
from media.decode import DecodeError, decode_image, resample

CLIP_224 = ImagePreprocess(224, 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def open_clip_reference(data: bytes, size: int) -> np.ndarray:
    """open_clip's own inference transform, minus normalisation, as uint8."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(size=size), is_train=False)
    resize_and_crop = open_clip.transform.Compose(transform.transforms[:2])
    return np.asarray(resize_and_crop(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("size", [(640, 480), (300, 700), (224, 224), (97, 180)])
def test_matches_open_clips_own_resize_and_crop_exactly(size):
    data = image_bytes("PNG", size=size)
    ours = decode_image(data, CLIP_224)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, open_clip_reference(data, 224))


def test_reduced_scale_jpeg_decoding_stays_close_to_the_full_decode():
    data = image_bytes("JPEG", size=(2400, 1800), quality=92)
    fast = decode_image(data, CLIP_224).astype(np.float64)
    full = open_clip_reference(data, 224).astype(np.float64)
    assert fast.shape == full.shape
    assert np.abs(fast - full).mean() < 3.0


@pytest.mark.parametrize("size", [(2400, 1800), (1800, 2400)])
def test_after_a_reduced_decode_only_the_crop_region_is_resampled_to_nearly_the_same_pixels(size):
    data = image_bytes("JPEG", size=size, quality=92)
    reduced = Image.open(io.BytesIO(data))
    reduced.draft("RGB", (256, 256))
    reduced.load()
    assert reduced.size == (size[0] // 4, size[1] // 4)
    w, h = reduced.size
    resized = reduced.resize((256 * w // h, 256) if w > h else (256, 256 * h // w), Image.Resampling.BICUBIC)
    left, top = round((resized.width - 224) / 2), round((resized.height - 224) / 2)
    whole = np.asarray(resized.crop((left, top, left + 224, top + 224))).astype(int)
    region = decode_image(data, PACKAGED_PREPROCESS).astype(int)
    # The region's box is rounded to whole pixels: a sub-pixel shift, not a visible change.
    assert np.abs(region - whole).max() <= 4 and np.abs(region - whole).mean() < 0.5


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_region_resampler_reproduces_pillows_filter(interpolation):
    pixels = np.asarray(Image.open(io.BytesIO(image_bytes("JPEG", size=(400, 300), quality=92))).convert("RGB"))
    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    pillow = np.asarray(Image.fromarray(pixels).resize((224, 224), filters[interpolation], box=(50, 0, 350, 300)))
    ours = resample(np.array(pixels[:, 50:350]), 224, interpolation)
    diff = np.abs(ours.astype(int) - pillow.astype(int))
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    assert diff.max() <= 3 and diff.mean() < 0.02  # rounding of the intermediate pass, on a few pixels


def test_packaged_geometry_is_resize_256_crop_224():
    out = decode_image(image_bytes("PNG", size=(512, 384)), PACKAGED_PREPROCESS)
    assert out.shape == (224, 224, 3)


def test_exif_orientation_is_applied():
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100] = 255  # left half white, landscape
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    square = ImagePreprocess(64, 64, (0.5,) * 3, (0.5,) * 3, resize_mode="squash")
    out = decode_image(buffer.getvalue(), square).mean(axis=2)
    # After rotating clockwise, the white left half is on top.
    assert out[:24].mean() > 200 and out[-24:].mean() < 50


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16", "I"])
def test_every_mode_becomes_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode.startswith("I") else "PNG")
    base = Image.open(io.BytesIO(image_bytes("PNG", size=(80, 60))))
    if mode.startswith("I"):
        gray = np.asarray(base.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(gray.astype(np.uint16 if mode == "I;16" else np.int32))
        assert image.mode == mode
    else:
        image = base.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    out = decode_image(buffer.getvalue(), CLIP_224)
    assert out.shape == (224, 224, 3)
    if mode.startswith("I"):
        expected = np.asarray(base.convert("L").resize((224, 224)), dtype=np.float64)
        # 16-bit is scaled to 8-bit, not clipped to white.
        assert abs(out[..., 0].mean() - expected.mean()) < 8


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    out = decode_image(buffer.getvalue(), CLIP_224)
    assert out.min() == 255


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0] * 256)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    assert decode_image(buffer.getvalue(), CLIP_224).min() == 255


def test_animations_use_the_first_frame():
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((0, 0, 255), (255, 0, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buffer.getvalue(), CLIP_224)
    assert out[..., 2].mean() > 200 and out[..., 0].mean() < 50


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas: the bomb shape, without the memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_from_the_header():
    # Ours or Pillow's own guard, whichever trips first: either way nothing is decoded.
    with pytest.raises(DecodeError, match="pixel cap|decompression bomb"):
        decode_image(png_header_claiming(30_000, 30_000), CLIP_224)
    with pytest.raises(DecodeError, match="pixel cap"):
        decode_image(png_header_claiming(8_000, 8_000), CLIP_224)
    with pytest.raises(DecodeError, match="pixel cap"):
        decode_image(image_bytes("PNG", size=(300, 300)), CLIP_224, max_pixels=50_000)


def sliver_png(width: int, height: int) -> bytes:
    """A real, tiny PNG of an absurd shape (a 100000x1 one is under 500 bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_slivers_are_refused_from_the_header_with_bounded_memory():
    """100000x1 passes a 10^5-pixel cap; resizing its short side to 256 would ask for ~26 GB. It is
    refused by its aspect ratio before anything is decoded, and the process barely grows."""
    import subprocess
    import sys

    code = """
import io, resource, sys
from PIL import Image
from model_handlers.backends import PACKAGED_PREPROCESS
from media.decode import DecodeError, decode_image
images = []
for size in ((100_000, 1), (1, 100_000)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buffer, "PNG", optimize=True)
    images.append(buffer.getvalue())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for data in images:
    try:
        decode_image(data, PACKAGED_PREPROCESS, max_pixels=100_000)
        print("decoded")
    except DecodeError as e:
        print("refused:", e)
print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "refused: image is 100000x1 pixels, an aspect ratio over 25:1"
    assert lines[1] == "refused: image is 1x100000 pixels, an aspect ratio over 25:1"
    assert int(lines[2].split()[1]) < 100 * 1024  # KB of peak resident growth


@pytest.mark.parametrize("size", [(2400, 100), (100, 2400), (1200, 60)])
def test_long_images_under_the_limit_match_the_whole_resize_with_memory_bounded_by_the_crop(size):
    data = image_bytes("PNG", size=size)
    ours = decode_image(data, PACKAGED_PREPROCESS)
    source = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = source.size
    scale = 256 / min(width, height)
    full = source.resize((max(256, int(width * scale)), max(256, int(height * scale))), Image.Resampling.BICUBIC)
    left, top = round((full.width - 224) / 2), round((full.height - 224) / 2)
    reference = np.asarray(full.crop((left, top, left + 224, top + 224))).astype(int)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours.astype(int) - reference).max() <= 1  # within a level of the whole resize


@pytest.mark.parametrize("data", [b"", b"hello, not an image", image_bytes("JPEG")[:600], image_bytes("PNG")[:300]])
def test_garbage_and_truncated_files_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_image(data, CLIP_224)


def test_the_decoder_uses_the_backends_geometry():
    assert image_preprocess(TINY_CLIP).crop_size == 64
    assert image_preprocess("packaged:effnet-lite0+minilm") == PACKAGED_PREPROCESS


def test_normalisation_on_device_matches_the_float_reference():
    import torch

    for height, width in ((6, 8), (8, 6), (5, 5)):  # the constants are laid out along a row
        pixels = np.random.default_rng(width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        out = normalize_on_device(torch.from_numpy(pixels), CLIP_224, torch.device("cpu"))
        expected = (pixels.transpose(0, 3, 1, 2) / 255.0 - np.array(CLIP_224.mean)[:, None, None]) / np.array(
            CLIP_224.std)[:, None, None]
        assert out.shape == (2, 3, height, width) and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)  # the frozen tower's layout, no copy
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)
    with pytest.raises(TypeError):
        normalize_on_device(torch.zeros(1, 8, 8, 3), CLIP_224, torch.device("cpu"))


def test_decoding_leaves_the_process_warning_filters_alone(monkeypatch):
    """`warnings.catch_warnings` swaps the filters of the whole process: with sixteen download
    threads decoding at once, one thread's exit would drop another's filter, or leave it behind."""
    seen = []
    transpose = ImageOps.exif_transpose

    def recording(image, **kwargs):
        seen.append(list(warnings.filters))
        return transpose(image, **kwargs)

    monkeypatch.setattr(ImageOps, "exif_transpose", recording)
    before = list(warnings.filters)
    decode_image(image_bytes("JPEG"), CLIP_224)
    assert seen == [before] and warnings.filters == before
